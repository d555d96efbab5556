import ase.db
import ase.io
import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator

from skntk.io import example_path, get_labels, iter_structures, read_structures, split_by


def _labelled(name, energy, seed):
    atoms = molecule(name)
    forces = np.random.default_rng(seed).normal(size=(len(atoms), 3))
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms, forces


def test_sources_agree(tmp_path):
    a, fa = _labelled("H2O", -14.2, 0)
    b, fb = _labelled("CH4", -24.0, 1)
    path = tmp_path / "x.extxyz"
    ase.io.write(path, [a, b])
    with ase.db.connect(tmp_path / "x.db") as db:
        db.write(a)
        db.write(b)
    for source in ([a, b], iter([a, b]), path, str(path), tmp_path / "x.db"):
        got = read_structures(source)
        assert [s.get_chemical_formula() for s in got] == ["H2O", "CH4"]
        energies, forces = get_labels(got)
        np.testing.assert_allclose(energies, [-14.2, -24.0])
        np.testing.assert_allclose(forces[1], fb)
    assert len(read_structures(a)) == 1
    assert len(read_structures(path, index="1:")) == 1


def test_iter_is_lazy(tmp_path):
    path = tmp_path / "x.extxyz"
    ase.io.write(path, [molecule("H2O")] * 3)
    it = iter_structures(path)
    assert next(it).get_chemical_formula() == "H2O"


def test_ref_keys_and_explicit_key():
    atoms = molecule("H2O")
    atoms.info["REF_energy"] = -3.0
    atoms.arrays["REF_forces"] = np.ones((3, 3))
    atoms.info["my_e"] = 7.0
    e, f = get_labels([atoms])
    assert e[0] == -3.0 and f[0].sum() == 9.0
    assert get_labels([atoms], energy_key="my_e")[0][0] == 7.0


def test_errors_name_the_structure(tmp_path):
    good, _ = _labelled("H2O", -1.0, 0)
    with pytest.raises(ValueError, match=r"X\[1\] \(CH4\) has no energy"):
        get_labels([good, molecule("CH4")])
    nof = molecule("CH4")
    nof.info["energy"] = 1.0
    with pytest.raises(ValueError, match=r"X\[0\] \(CH4\) has no forces"):
        get_labels([nof], require_forces=True)
    with pytest.raises(TypeError, match="structure 1 is a str"):
        read_structures([good, "CH4"])
    with pytest.raises(FileNotFoundError, match="no structure file"):
        read_structures(tmp_path / "missing.extxyz")
    with pytest.raises(TypeError, match="got int"):
        read_structures(3)


def test_bundled_example_split_by_sid():
    frames = read_structures(example_path())
    assert len(frames) == 108
    energies, forces = get_labels(frames, require_forces=True)
    assert np.all(np.isfinite(energies))
    sids = sorted({a.info["sid"] for a in frames})
    inside, outside = split_by(frames, "sid", sids[:2])
    assert len(inside) + len(outside) == len(frames)
    assert {frames[i].info["sid"] for i in inside} == set(sids[:2])
    assert not {frames[i].info["sid"] for i in outside} & set(sids[:2])
    with pytest.raises(KeyError, match="no info"):
        split_by([molecule("H2O")], "sid", ["x"])


def test_forces_shape_checked():
    bad = molecule("CH4")
    bad.info["energy"] = 1.0
    bad.new_array("REF_forces", np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"forces of shape \(5, 2\); expected \(5, 3\)"):
        get_labels([bad])

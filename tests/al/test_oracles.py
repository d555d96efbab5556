"""Tests of skntk.al.oracles: PoolOracle and CalculatorOracle."""

import dataclasses

import numpy as np
import pytest
from ase import Atoms
from ase.build import fcc111, molecule
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from skntk.al.oracles import CalculatorOracle, LabelResult, PoolOracle


def make_slab(metal="Cu", seed=0, sid=0):
    """A small rattled fcc(111) slab with OC20-style ``sid``/``frame``/``fixed`` and FixAtoms."""
    slab = fcc111(metal, size=(2, 2, 2), vacuum=4.0)
    slab.rattle(0.05, seed=seed)
    bottom = slab.positions[:, 2] < slab.positions[:, 2].mean()
    slab.arrays["fixed"] = bottom.astype(int)
    slab.set_constraint(FixAtoms(mask=bottom))
    slab.info.update(sid=sid, frame=seed)
    return slab


def make_cluster(seed=0):
    rng = np.random.default_rng(seed)
    pos = np.array([[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0, 0, 2.5]]) + rng.normal(0, 0.05, (4, 3))
    return Atoms("Cu3Pt", positions=pos)


def snapshot(atoms):
    """Everything about a structure the oracles must leave untouched."""
    return (atoms.positions.copy(), atoms.numbers.copy(), atoms.cell.array.copy(),
            {k: np.array(v, copy=True) for k, v in atoms.info.items()},
            {k: v.copy() for k, v in atoms.arrays.items()},
            [c.todict() for c in atoms.constraints], atoms.calc)


def assert_unchanged(atoms, snap):
    pos, num, cell, info, arrays, cons, calc = snap
    np.testing.assert_array_equal(atoms.positions, pos)
    np.testing.assert_array_equal(atoms.numbers, num)
    np.testing.assert_array_equal(atoms.cell.array, cell)
    assert set(atoms.info) == set(info)
    for k, v in info.items():
        np.testing.assert_array_equal(atoms.info[k], v)
    assert set(atoms.arrays) == set(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(atoms.arrays[k], v)
    assert [c.todict() for c in atoms.constraints] == cons
    assert atoms.calc is calc


class FlakyCalculator(Calculator):
    """Harmonic toy calculator that fails on demand (``info["fail"]``) for the tests.

    ``fail="raise"`` raises like an unconverged SCF, ``"nan_energy"`` / ``"nan_forces"`` return
    non-finite values. ``n_calls`` counts calculations on this object (state that must not leak).
    """

    implemented_properties = ["energy", "forces"]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.n_calls = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.n_calls += 1
        mode = self.atoms.info.get("fail")
        if mode == "raise":
            raise RuntimeError("SCF not converged after 250 iterations")
        pos = self.atoms.positions
        energy = 0.5 * float((pos**2).sum()) + self.n_calls  # n_calls leaks into the energy
        forces = -pos.copy()
        if mode == "nan_energy":
            energy = float("nan")
        if mode == "nan_forces":
            forces[1, 0] = np.inf
        self.results = {"energy": energy, "forces": forces}


# -- CalculatorOracle ----------------------------------------------------------------------------
def test_emt_labels_equal_direct_calculation():
    structures = [make_slab("Cu", 0, sid=11), make_slab("Pt", 1, sid=12), make_cluster(2)]
    snaps = [snapshot(a) for a in structures]
    results = CalculatorOracle(EMT()).label(structures)

    assert len(results) == len(structures)
    for a, snap, res in zip(structures, snaps, results, strict=True):
        assert isinstance(res, LabelResult) and res.ok and res.error is None
        assert res.seconds >= 0
        ref = a.copy()
        ref.calc = EMT()
        e_ref, f_ref = ref.get_potential_energy(), ref.get_forces()
        out = res.atoms
        assert out is not a
        assert isinstance(out.calc, SinglePointCalculator)
        e, f = out.get_potential_energy(), out.get_forces(apply_constraint=False)
        assert isinstance(e, float) and e == pytest.approx(e_ref, rel=1e-12, abs=1e-12)
        assert f.dtype == np.float64 and f.shape == (len(a), 3)
        np.testing.assert_allclose(f, f_ref, rtol=1e-12, atol=1e-12)
        # metadata preserved on the copy
        np.testing.assert_array_equal(out.positions, a.positions)
        np.testing.assert_equal(out.info, a.info)
        for k in a.arrays:
            np.testing.assert_array_equal(out.arrays[k], a.arrays[k])
        assert [c.todict() for c in out.constraints] == [c.todict() for c in a.constraints]
        assert_unchanged(a, snap)


def test_failures_are_recorded_with_reason():
    structures = [molecule("H2O"), molecule("CH4"), molecule("NH3"), molecule("CO2"),
                  molecule("H2")]
    structures[1].info["fail"] = "raise"
    structures[2].info["fail"] = "nan_energy"
    structures[3].info["fail"] = "nan_forces"
    structures[3].info["sid"] = 42
    snaps = [snapshot(a) for a in structures]
    results = CalculatorOracle(FlakyCalculator()).label(structures)

    assert [r.ok for r in results] == [True, False, False, False, True]
    assert all(r.atoms is None for r in results[1:4])
    assert "structure 1 (CH4)" in results[1].error
    assert "RuntimeError" in results[1].error and "SCF not converged" in results[1].error
    assert "structure 2 (H3N)" in results[2].error and "non-finite energy" in results[2].error
    assert "structure 3 (CO2, sid=42)" in results[3].error
    assert "non-finite forces" in results[3].error and "atom 1" in results[3].error
    for a, snap in zip(structures, snaps, strict=True):
        assert_unchanged(a, snap)
    np.testing.assert_array_equal(results[0].atoms.get_forces(), -structures[0].positions)


def test_calculator_state_does_not_leak():
    calc = FlakyCalculator()
    results = CalculatorOracle(calc).label([molecule("H2O"), molecule("CH4"), molecule("H2O")])
    # every structure sees a fresh copy: one call each, so n_calls adds exactly 1
    for r in results:
        expected = 0.5 * float((r.atoms.positions**2).sum()) + 1
        assert r.atoms.get_potential_energy() == pytest.approx(expected)
    assert calc.n_calls == 0 and calc.atoms is None


def test_n_jobs_2_equals_n_jobs_1():
    structures = [make_slab("Cu", s, sid=s) for s in range(3)] + [make_cluster(5)]
    structures.insert(2, Atoms("Si2", positions=[[0, 0, 0], [0, 0, 2.3]]))  # EMT has no Si
    serial = CalculatorOracle(EMT(), n_jobs=1).label(structures)
    parallel = CalculatorOracle(EMT(), n_jobs=2).label(structures)
    assert [r.ok for r in serial] == [r.ok for r in parallel] == [True, True, False, True, True]
    assert serial[2].error == parallel[2].error and "structure 2 (Si2)" in serial[2].error
    for s, p, a in zip(serial, parallel, structures, strict=True):
        if not s.ok:
            continue
        assert s.atoms.get_potential_energy() == p.atoms.get_potential_energy()
        np.testing.assert_array_equal(s.atoms.get_forces(), p.atoms.get_forces())
        np.testing.assert_equal(p.atoms.info, a.info)
        np.testing.assert_array_equal(p.atoms.positions, a.positions)


def test_unpicklable_calculator_with_n_jobs_raises():
    calc = EMT()
    calc.hook = lambda x: x  # deep-copyable, not picklable
    oracle = CalculatorOracle(calc, n_jobs=2)
    with pytest.raises(TypeError, match="cannot be pickled"):
        oracle.label([make_cluster(0), make_cluster(1)])
    assert CalculatorOracle(calc).label([make_cluster(0)])[0].ok  # n_jobs=1 still works


def test_bad_arguments():
    with pytest.raises(TypeError, match="ASE calculator"):
        CalculatorOracle("EMT")
    with pytest.raises(ValueError, match="n_jobs"):
        CalculatorOracle(EMT(), n_jobs=0)
    with pytest.raises(TypeError, match="not an ase.Atoms"):
        CalculatorOracle(EMT()).label([make_cluster(0), "x"])


def test_label_result_is_frozen():
    res = LabelResult(None, "boom", 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.error = None
    assert not res.ok


def test_tblite_gfn2_on_small_molecules():
    pytest.importorskip("tblite", reason="tblite not installed (pip install 'skntk[oracles]')")
    from tblite.ase import TBLite

    calc = TBLite(method="GFN2-xTB", verbosity=0)
    structures = [molecule("H2O"), molecule("CH4")]
    structures[1].rattle(0.02, seed=0)
    used = structures[0].copy()
    used.calc = calc
    e_direct = used.get_potential_energy()  # the calculator now holds unpicklable state
    f_direct = used.get_forces()

    results = CalculatorOracle(calc).label(structures)
    assert all(r.ok for r in results), [r.error for r in results]
    for r, a in zip(results, structures, strict=True):
        e, f = r.atoms.get_potential_energy(), r.atoms.get_forces()
        assert np.isfinite(e) and f.shape == (len(a), 3) and np.all(np.isfinite(f))
    assert results[0].atoms.get_potential_energy() == pytest.approx(e_direct, abs=1e-8)
    np.testing.assert_allclose(results[0].atoms.get_forces(), f_direct, atol=1e-7)
    assert np.abs(results[1].atoms.get_forces()).max() > 1e-3


# -- PoolOracle ----------------------------------------------------------------------------------
def test_pool_oracle_returns_stored_labels():
    rng = np.random.default_rng(0)
    from_calc = make_slab("Cu", 0, sid=7)
    e0, f0 = -3.5, rng.normal(size=(len(from_calc), 3))
    from_calc.calc = SinglePointCalculator(from_calc, energy=e0, forces=f0)
    from_keys = make_slab("Pt", 1, sid=8)
    e1, f1 = -7.25, rng.normal(size=(len(from_keys), 3))
    from_keys.info["REF_energy"] = e1
    from_keys.arrays["REF_forces"] = f1
    no_energy = make_cluster(3)
    no_energy.info["sid"] = 9
    no_forces = molecule("H2O")
    no_forces.info["REF_energy"] = 1.0
    bad_energy = molecule("CH4")
    bad_energy.info["REF_energy"] = float("nan")
    bad_energy.arrays["REF_forces"] = np.zeros((5, 3))
    structures = [from_calc, from_keys, no_energy, no_forces, bad_energy]
    snaps = [snapshot(a) for a in structures]

    results = PoolOracle().label(structures)
    assert [r.ok for r in results] == [True, True, False, False, False]
    for r, a, (e, f) in zip(results[:2], structures[:2], [(e0, f0), (e1, f1)], strict=True):
        assert r.atoms is not a
        assert r.atoms.get_potential_energy() == e
        np.testing.assert_array_equal(r.atoms.get_forces(apply_constraint=False), f)
        assert r.atoms.get_forces(apply_constraint=False).dtype == np.float64
        np.testing.assert_array_equal(r.atoms.arrays["fixed"], a.arrays["fixed"])
        assert r.atoms.info["sid"] == a.info["sid"] and r.atoms.info["frame"] == a.info["frame"]
        assert [c.todict() for c in r.atoms.constraints] == [c.todict() for c in a.constraints]
    assert "structure 2 (Cu3Pt, sid=9)" in results[2].error
    assert "no energy label" in results[2].error
    assert "structure 3 (H2O)" in results[3].error and "no forces label" in results[3].error
    assert "structure 4 (CH4)" in results[4].error and "non-finite energy" in results[4].error
    for a, snap in zip(structures, snaps, strict=True):
        assert_unchanged(a, snap)
    assert repr(PoolOracle()) == "PoolOracle()"

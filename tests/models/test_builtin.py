"""Tests of the built-in message-passing MLIP: the backend contract (skntk.testing.check_mlip),
cutoff, subsets, training, persistence."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.lj import LennardJones

from skntk.finetune import train_builtin
from skntk.models.builtin import BuiltinMLIP, BuiltinNet
from skntk.testing import check_mlip


@pytest.fixture(scope="module")
def model():
    return BuiltinMLIP([1, 6, 8, 14], cutoff=3.5, n_hidden=12, n_basis=5, n_blocks=2,
                       n_readout=6, dtype=torch.float64, random_state=1)


def ef(model, atoms):
    E, F = model.energy_and_forces(model.collate(atoms))
    return E.detach().numpy(), F.detach().numpy()


@pytest.mark.parametrize("structures", ["generated", "given"])
def test_backend_contract(model, structures):
    """Symmetries, F = -dE/dR, batching, ∂θ by finite differences, embeddings, subsets, state:
    skntk.testing.check_mlip on generated cells (molecule, orthorhombic, triclinic mixed pbc)
    and on given ones (a rattled ethanol and a Si supercell)."""
    X = None
    if structures == "given":
        mol = molecule("CH3CH2OH")
        mol.rattle(0.05, seed=2)
        si = bulk("Si", "diamond", a=5.43) * (1, 1, 2)
        si.rattle(0.1, seed=4)
        X = [mol, si]
    check_mlip(model, X, subsets={"readout": 1e-4, "last_block": 1e-4, "embeddings": 1e-4})


def test_smooth_cutoff_energy_continuous(model):
    cutoff = model.cutoff
    es = []
    for r in [cutoff - 1e-6, cutoff + 1e-6]:
        a = Atoms("OH", positions=[[0, 0, 0], [0, 0, r]])
        es.append(ef(model, [a])[0][0])
    assert es[0] == pytest.approx(es[1], abs=1e-8)


def test_parameter_subsets(model):
    names = {s: [n for n, _ in model.parameters(s)] for s in model.parameter_subsets}
    assert names["readout"] and all(n.startswith("readout.") for n in names["readout"])
    assert all(n.startswith("blocks.1.") for n in names["last_block"])
    assert names["embeddings"] == ["embedding.weight"]
    assert len(names["all"]) == len(list(model.module.parameters()))


def test_unknown_element_and_bad_construction(model):
    with pytest.raises(ValueError, match=r"X\[0\] \(Au\) contains Au \(Z=79\), which "
                                         r"BuiltinMLIP does not cover"):
        model.collate([Atoms("Au")])
    with pytest.raises(ValueError, match="needs species"):
        BuiltinMLIP()
    with pytest.raises(TypeError, match="must be a BuiltinNet"):
        BuiltinMLIP(module=torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="atomic numbers in 1..118"):
        BuiltinNet([0, 1])


def test_same_seed_same_weights_and_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = BuiltinMLIP([1], n_hidden=4, n_blocks=1, random_state=7)
    after = torch.rand(1)
    b = BuiltinMLIP([1], n_hidden=4, n_blocks=1, random_state=7)
    assert torch.equal(expected, after)
    for p, q in zip(a.module.parameters(), b.module.parameters(), strict=True):
        assert torch.equal(p, q)


def test_save_load_roundtrip(model, tmp_path):
    path = model.save(tmp_path / "m.pt")
    loaded = BuiltinMLIP.load(path)
    mols = [molecule("H2O"), bulk("Si", "diamond", a=5.43)]
    np.testing.assert_array_equal(ef(loaded, mols)[0], ef(model, mols)[0])
    assert loaded.dtype == torch.float64 and loaded.cutoff == model.cutoff
    torch.save({"x": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a skntk built-in model file"):
        BuiltinMLIP.load(tmp_path / "bad.pt")


def lj_clusters(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pos = 1.3 * np.array([[0, 0, 0], [1, 0, 0], [0.5, 0.87, 0], [0.5, 0.29, 0.82]])
        a = Atoms("Ar4", positions=pos + rng.normal(scale=0.05, size=pos.shape))
        a.calc = LennardJones(sigma=1.0, epsilon=1.0, rc=3.0, smooth=True)
        a.info["energy"] = a.get_potential_energy()
        a.arrays["forces_ref"] = a.get_forces()
        a.calc = None
        out.append(a)
    return out


def test_fit_learns_lennard_jones_forces():
    train, test = lj_clusters(48, 0), lj_clusters(16, 1)
    m = BuiltinMLIP([18], cutoff=3.0, n_hidden=16, n_basis=6, n_blocks=1, n_readout=8,
                    dtype=torch.float64)
    f_test = np.concatenate([a.arrays["forces_ref"] for a in test])

    def mae():
        return np.abs(ef(m, test)[1] - f_test).mean()

    before = mae()
    m.module.eval()
    reg = train_builtin(m, train, [a.info["energy"] for a in train],
                        [a.arrays["forces_ref"] for a in train], max_epochs=60, batch_size=8,
                        lr=5e-3, patience=60)
    after = mae()
    assert len(reg.history_) >= 10
    assert after < 0.5 * before
    assert after < 0.5 * np.abs(f_test).mean()
    assert not m.module.training  # fit restores the caller's mode


def test_fit_bad_labels():
    train = lj_clusters(4, 0)
    m = BuiltinMLIP([18], n_hidden=4, n_blocks=1)
    with pytest.raises(ValueError, match=r"energies has shape \(3,\); X has 4"):
        train_builtin(m, train, [0.0] * 3, [a.arrays["forces_ref"] for a in train])
    with pytest.raises(ValueError, match=r"forces\[1\] has shape \(3, 3\); X\[1\] has 4 atoms"):
        train_builtin(m, train, [0.0] * 4, [np.zeros((4, 3)), np.zeros((3, 3)),
                                            np.zeros((4, 3)), np.zeros((4, 3))])

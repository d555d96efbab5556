"""Reference energies, copies, saving and the ASE calculator of every MLIP handle.

The ``check_*`` helpers are backend-independent; the backend test modules reuse them (the MACE
one in its own virtualenv). The backend contract itself is :func:`skntk.testing.check_mlip`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skntk.models import load
from skntk.models.builtin import BuiltinMLIP
from skntk.testing import energy_gradients, force_vjp, tiny_structures

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- backend-independent checks --------------------------------------------------------------
def evaluate(model, atoms):
    """Energies (n_structures,) and forces (n_atoms_total, 3) as float64 ndarrays."""
    energy, forces = model.energy_and_forces(model.collate(atoms, "cpu"))
    return (energy.detach().double().numpy().copy(), forces.detach().double().numpy().copy())


def check_reference_energies(model, atoms, *, atol, missing_z):
    """Shifting ref[Z] by δ_Z moves each energy by Σ_Z δ_Z n_Z and leaves forces alone; get after
    set round-trips; an element without a slot is named. Works on (and modifies) a copy."""
    model = model.copy()
    refs = model.reference_energies()
    present = sorted({int(z) for at in atoms for z in at.numbers})
    assert set(present) <= set(refs) <= set(model.species)
    assert all(isinstance(z, int) and isinstance(v, float) for z, v in refs.items())
    e0, f0 = evaluate(model, atoms)
    delta = {z: 0.25 * (k + 1) * (-1) ** k for k, z in enumerate(present)}  # exact in float32
    model.set_reference_energies({z: refs[z] + d for z, d in delta.items()})
    e1, f1 = evaluate(model, atoms)
    expected = [sum(d * np.sum(at.numbers == z) for z, d in delta.items()) for at in atoms]
    np.testing.assert_allclose(e1 - e0, expected, rtol=0, atol=atol)
    np.testing.assert_allclose(f1, f0, rtol=0, atol=max(atol, 1e-6))
    table, _ = model._reference_table()
    new = model.reference_energies()
    for z, d in delta.items():  # round trip, in the table's precision
        assert new[z] == float(torch.tensor(refs[z] + d, dtype=table.dtype))
    untouched = sorted(set(refs) - set(delta))[:5]
    assert all(new[z] == refs[z] for z in untouched)
    with pytest.raises(ValueError, match=rf"no reference energy for .*\(Z={missing_z}\)"):
        model.set_reference_energies({present[0]: 0.0, missing_z: 1.0})
    assert model.reference_energies() == new  # nothing set when one element is refused


def check_copy(model, atoms, *, atol):
    """The copy has the same class, predicts the same and is independent of the original."""
    e0, f0 = evaluate(model, atoms)
    twin = model.copy()
    assert type(twin) is type(model) and twin is not model and twin.module is not model.module
    e1, f1 = evaluate(twin, atoms)
    np.testing.assert_allclose(e1, e0, rtol=1e-6, atol=atol)
    np.testing.assert_allclose(f1, f0, rtol=1e-6, atol=atol)
    name, p = twin.parameters("readout")[-1]
    with torch.no_grad():
        p.add_(0.1)
    assert not torch.equal(p, dict(model.module.named_parameters())[name])
    assert not np.allclose(evaluate(twin, atoms)[0], e0)
    np.testing.assert_array_equal(evaluate(model, atoms)[0], e0)


def modified(model):
    """A copy with shifted references and a changed readout parameter."""
    twin = model.copy()
    refs = twin.reference_energies()
    z = min(refs)
    twin.set_reference_energies({z: refs[z] + 0.5})
    with torch.no_grad():
        twin.parameters("readout")[0][1].mul_(1.05)
    return twin


def check_save_load(model, atoms, path, *, atol):
    """save -> skntk.models.load gives the same class and predictions, modified weights
    included; returns the modified handle and the path its file was saved to."""
    e0, f0 = evaluate(model, atoms)
    twin = modified(model)
    e1, f1 = evaluate(twin, atoms)
    assert not np.allclose(e1, e0)
    out = twin.save(path)
    assert out == type(out)(path) and out.is_file()
    back = load(str(out), device="cpu")
    assert type(back) is type(model)
    e2, f2 = evaluate(back, atoms)
    np.testing.assert_allclose(e2, e1, rtol=1e-7, atol=atol)
    np.testing.assert_allclose(f2, f1, rtol=1e-7, atol=atol)
    assert back.reference_energies() == twin.reference_energies()
    return twin, out


def check_calculator(model, atoms, *, atol):
    """The ASE calculator gives energy_and_forces' numbers for each structure, as float64."""
    for at in atoms:
        (e,), f = evaluate(model, [at])
        at = at.copy()
        at.calc = model.calculator()
        forces = at.get_forces()
        assert forces.dtype == np.float64 and forces.shape == (len(at), 3)
        np.testing.assert_allclose(at.get_potential_energy(), e, rtol=1e-7, atol=atol)
        np.testing.assert_allclose(at.get_potential_energy(force_consistent=True), e,
                                   rtol=1e-7, atol=atol)
        np.testing.assert_allclose(forces, f, rtol=1e-6, atol=atol)


def check_ntk_rows(model, atoms, subset="readout", *, rtol=1e-4):
    """ForceNTKTransformer(kind="joint", exact, unsketched) rows equal plain autograd: the energy
    row is ∂E/∂θ / N and ``w · rows[1:]`` is ``Σ_i w_i·∂F_i/∂θ``. Returns the blocks."""
    from skntk.transformers import ForceNTKTransformer

    ntk = ForceNTKTransformer(model, kind="joint", parameters=subset, n_features=None,
                              force_rows="exact", device="cpu", random_state=0).fit(atoms)
    blocks = ntk.transform(atoms)
    n_atoms = [len(at) for at in atoms]
    assert blocks.offsets.tolist() == np.cumsum([0] + [1 + 3 * n for n in n_atoms]).tolist()
    G_E = energy_gradients(model, atoms, subset)
    scale = np.abs(G_E).max()
    rng = np.random.default_rng(1)
    for i, at in enumerate(atoms):
        rows = blocks.block(i)
        np.testing.assert_allclose(rows[0], G_E[i] / n_atoms[i], atol=rtol * scale)
        w = rng.standard_normal((n_atoms[i], 3))
        ref = force_vjp(model, at, subset, w)
        np.testing.assert_allclose(w.reshape(-1) @ rows[1:], ref, atol=rtol * np.abs(ref).max())
    return blocks


def check_routes(model, atoms, subset="readout", *, rtol=1e-4, forward=True):
    """Every force-row route and graph grouping of ForceNTKTransformer against the exact
    reverse-mode rows (the reference, itself checked by :func:`check_ntk_rows`):

    - ``"forward"`` (when declared; ``forward=False`` skips it) equals ``"exact"``;
    - probe rows are ``Zᵀ (exact force rows) / √s`` for the transformer's own probes, energy rows
      equal;
    - CountSketch rows are the unsketched rows times the dense ``R``;
    - a structure's rows do not depend on its batch: alone, first, last, beside structures of
      other sizes, with one graph per structure and with shared graphs (as on CUDA).
    """
    from skntk import ntk as ntk_mod
    from skntk.transformers import ForceNTKTransformer

    kw = dict(kind="joint", parameters=subset, device="cpu", random_state=0)
    exact = ForceNTKTransformer(model, force_rows="exact", n_features=24, **kw).fit(atoms)
    G = exact.transform(atoms)
    scale = np.abs(G.rows).max()
    if forward and model.supports_torch_func:
        fw = ForceNTKTransformer(model, force_rows="forward", n_features=24, **kw).fit(atoms)
        np.testing.assert_allclose(fw.transform(atoms).rows, G.rows, atol=rtol * scale)
    pr = ForceNTKTransformer(model, force_rows="probes", n_probes=3, n_features=24, **kw)
    Gp = pr.fit(atoms).transform(atoms)
    n = [len(a) for a in atoms]
    Z = ntk_mod.rademacher_probes(n, 3, pr.seed_, n).numpy()
    at = 0
    for i, k in enumerate(n):
        z = Z[:, at:at + k].reshape(3, -1)
        np.testing.assert_allclose(Gp.block(i)[0], G.block(i)[0], atol=rtol * scale)
        np.testing.assert_allclose(Gp.block(i)[1:], z @ G.block(i)[1:] / np.sqrt(3),
                                   atol=rtol * scale)
        at += k
    dense = ForceNTKTransformer(model, force_rows="exact", n_features=None, **kw).fit(atoms)
    R = exact.sketch_.dense().double().numpy()
    np.testing.assert_allclose(dense.transform(atoms).rows @ R, G.rows, atol=rtol * scale)
    mixed = [atoms[-1]] + list(atoms) + [atoms[0]]
    for est in (exact, pr):
        ref = est.transform(atoms)
        for batching in ("shared", "per_structure"):
            est.set_params(batching=batching)
            alone = [est.transform([a]).block(0) for a in atoms]
            together = est.transform(mixed)
            for i in range(len(atoms)):
                np.testing.assert_allclose(alone[i], ref.block(i), atol=rtol * scale)
                np.testing.assert_allclose(together.block(i + 1), ref.block(i),
                                           atol=rtol * scale)


# -- built-in --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def atoms():
    return tiny_structures()


@pytest.fixture(scope="module")
def builtin():
    model = BuiltinMLIP([1, 6, 8, 29], cutoff=4.0, n_hidden=16, n_blocks=2, random_state=1)
    model.set_reference_energies({1: -1.0, 6: -2.0, 8: -3.0, 29: -4.0})
    return model


def test_builtin_routes(builtin, atoms):
    check_routes(builtin, atoms, "all", rtol=1e-5)


def test_builtin_reference_energies(builtin, atoms):
    assert builtin.reference_energies() == {1: -1.0, 6: -2.0, 8: -3.0, 29: -4.0}
    np.testing.assert_array_equal(builtin.module.shifts.numpy(), [-1.0, -2.0, -3.0, -4.0])
    check_reference_energies(builtin, atoms, atol=1e-9, missing_z=7)


def test_builtin_copy(builtin, atoms):
    check_copy(builtin, atoms, atol=0)


def test_builtin_save_load(builtin, atoms, tmp_path):
    twin, path = check_save_load(builtin, atoms, tmp_path / "net.pt", atol=0)
    assert BuiltinMLIP.load(path).reference_energies() == twin.reference_energies()


def test_builtin_calculator(builtin, atoms):
    check_calculator(builtin, atoms, atol=1e-12)


def test_calculator_runs_md_and_bfgs(builtin, atoms):
    from ase import units
    from ase.md.verlet import VelocityVerlet
    from ase.optimize import BFGS

    mol = atoms[0].copy()
    mol.calc = builtin.calculator()
    mol.set_velocities(np.random.default_rng(0).normal(scale=0.01, size=(len(mol), 3)))
    e_start = mol.get_total_energy()
    VelocityVerlet(mol, timestep=0.25 * units.fs).run(10)
    assert np.isfinite(mol.get_total_energy())
    assert abs(mol.get_total_energy() - e_start) < 0.05  # small step: energy conserved

    relax = atoms[0].copy()
    relax.calc = builtin.calculator()
    e0, fmax0 = relax.get_potential_energy(), np.linalg.norm(relax.get_forces(), axis=1).max()
    BFGS(relax, logfile=None).run(fmax=1e-3, steps=30)
    assert relax.get_potential_energy() < e0
    assert np.linalg.norm(relax.get_forces(), axis=1).max() < fmax0


def test_load_sniffs_unknown_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a skntk built-in model file"):
        load(str(path))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(Exception):  # noqa: B017 - torch's own error for a non-torch file
        load(str(text))


def test_handle_without_references_refuses_to_set(builtin):
    from skntk.models.base import MLIP

    class Bare(MLIP):
        species = frozenset({1})
        cutoff = 1.0

        def collate(self, atoms, device="cpu"):
            raise NotImplementedError

    bare = Bare()
    assert bare.reference_energies() == {}
    with pytest.raises(ValueError, match=r"no reference energy for H \(Z=1\)"):
        bare.set_reference_energies({1: 0.0})
    with pytest.raises(NotImplementedError, match="Bare does not implement save"):
        bare.save("x.pt")


# -- SevenNet-0 ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sevennet():
    pytest.importorskip("sevenn", reason="needs the sevennet extra: pip install skntk[sevennet]")
    return load("sevennet-0", device="cpu")


@pytest.mark.sevennet
def test_sevennet_reference_energies(sevennet, atoms):
    refs = sevennet.reference_energies()
    assert set(refs) == set(sevennet.species) and len(refs) == 89
    shift = sevennet.module._modules["rescale_atomic_energy"].shift
    for z, t in sevennet.module.type_map.items():  # Z -> type index, not Z -> Z
        assert refs[z] == float(shift[t])
    check_reference_energies(sevennet, atoms, atol=2e-5, missing_z=84)


@pytest.mark.sevennet
def test_sevennet_copy(sevennet, atoms):
    check_copy(sevennet, atoms, atol=1e-6)


@pytest.mark.sevennet
def test_sevennet_save_load(sevennet, atoms, tmp_path):
    from sevenn.calculator import SevenNetCalculator
    from sevenn.checkpoint import SevenNetCheckpoint

    twin, path = check_save_load(sevennet, atoms, tmp_path / "ckpt.pth", atol=1e-6)
    e, f = evaluate(twin, atoms)
    cp = SevenNetCheckpoint(str(path))  # sevenn's own reader, strict state-dict load
    assert cp.build_model() is not None
    calc = SevenNetCalculator(str(path), device="cpu")
    mol = atoms[0].copy()
    mol.calc = calc
    np.testing.assert_allclose(mol.get_potential_energy(), e[0], atol=1e-4)
    np.testing.assert_allclose(mol.get_forces(), f[:len(mol)], atol=2e-4)


@pytest.mark.sevennet
def test_sevennet_save_needs_config(sevennet, tmp_path):
    bare = load(sevennet.copy().module, device="cpu")
    with pytest.raises(ValueError, match="has no SevenNet config"):
        bare.save(tmp_path / "x.pth")


@pytest.mark.sevennet
def test_sevennet_calculator(sevennet, atoms):
    check_calculator(sevennet, atoms, atol=1e-6)


# -- CHGNet 0.3.0 ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chgnet():
    pytest.importorskip("chgnet", reason="needs the chgnet extra: pip install skntk[chgnet]")
    return load("chgnet-0.3.0", device="cpu")


@pytest.mark.chgnet
def test_chgnet_reference_energies(chgnet, atoms):
    refs = chgnet.reference_energies()
    assert set(refs) == set(range(1, 95))
    weight = chgnet.module.composition_model.fc.weight
    assert refs[8] == float(weight[0, 7])
    check_reference_energies(chgnet, atoms, atol=2e-5, missing_z=95)


@pytest.mark.chgnet
def test_chgnet_copy(chgnet, atoms):
    check_copy(chgnet, atoms, atol=1e-6)


@pytest.mark.chgnet
def test_chgnet_save_load(chgnet, atoms, tmp_path):
    from chgnet.model import CHGNet

    from skntk.models.chgnet import CHGNetMLIP

    twin, path = check_save_load(chgnet, atoms, tmp_path / "chgnet.pth.tar", atol=1e-6)
    own = CHGNetMLIP(CHGNet.from_file(str(path)), device="cpu")  # CHGNet's own reader
    for (n, a), (_, b) in zip(own.module.state_dict().items(),
                              twin.module.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    np.testing.assert_allclose(evaluate(own, atoms)[0], evaluate(twin, atoms)[0], atol=1e-6)


@pytest.mark.chgnet
def test_chgnet_calculator(chgnet, atoms):
    check_calculator(chgnet, atoms, atol=1e-6)

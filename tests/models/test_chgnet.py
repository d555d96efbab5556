"""CHGNet 0.3.0 backend against CHGNet's own ASE calculator, finite differences and symmetry."""

import numpy as np
import pytest
import torch

pytest.importorskip("chgnet", reason="needs the chgnet extra: pip install skntk[chgnet]")

from ase import Atoms  # noqa: E402

from skntk.models import load  # noqa: E402
from skntk.models.chgnet import CHGNetMLIP, periodic_copy  # noqa: E402
from tests.models._checks import (  # noqa: E402
    directional_derivatives,
    energy_gradients,
    force_vjp,
    rotated,
    tiny_structures,
)

pytestmark = [pytest.mark.chgnet, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def model():
    return load("chgnet-0.3.0", device="cpu")


@pytest.fixture(scope="module")
def atoms():
    return tiny_structures()


def test_handle_declares_model(model):
    assert isinstance(model, CHGNetMLIP)
    assert model.cutoff == 6.0
    assert model.species == frozenset(range(1, 95))
    sizes = {s: sum(p.numel() for _, p in model.parameters(s))
             for s in ("readout", "last_block", "all")}
    assert sizes["readout"] == 12545
    names = {n for n, _ in model.parameters("all")}
    assert not any(n.startswith(("site_wise", "composition_model")) for n in names)
    assert sizes["readout"] < sizes["all"] and sizes["last_block"] < sizes["all"]


def test_matches_chgnet_calculator(model, atoms):
    from chgnet.model.dynamics import CHGNetCalculator

    calc = CHGNetCalculator(model=model.module, use_device="cpu")
    batch = model.collate(atoms, "cpu")
    assert batch.ptr.tolist() == [0, 5, 10]
    energy, forces = model.energy_and_forces(batch)
    assert energy.shape == (2,) and forces.shape == (10, 3)
    assert not energy.requires_grad and not forces.requires_grad
    for i, at in enumerate(atoms):
        ref = periodic_copy(at, model.cutoff)  # the molecule goes in a box, the slab unchanged
        ref.calc = calc
        np.testing.assert_allclose(energy[i].item(), ref.get_potential_energy(), rtol=1e-6,
                                   atol=1e-4)
        np.testing.assert_allclose(forces[batch.ptr[i]:batch.ptr[i + 1]].numpy(),
                                   ref.get_forces(), atol=2e-4)
    np.testing.assert_allclose(model.energy(batch).detach().numpy(), energy.numpy(), atol=1e-4)


def test_molecule_box_isolates_images():
    mol = tiny_structures()[0]
    boxed = periodic_copy(mol, 6.0)
    assert boxed.pbc.all() and not mol.pbc.any()
    extent = mol.positions.max(0) - mol.positions.min(0)
    # the gap between periodic images exceeds the cutoff along every axis
    assert np.all(np.diag(boxed.cell) - extent >= 6.0)
    np.testing.assert_allclose(boxed.get_all_distances(), mol.get_all_distances(), atol=1e-12)


def test_thin_vacuum_slab_rejected():
    slab = tiny_structures()[1]
    slab.pbc = [True, True, False]
    slab.cell[2] = [0, 0, 6.0]
    with pytest.raises(ValueError, match=r"X\[3\] \(Cu4O\) is not periodic along cell vector 2"):
        periodic_copy(slab, 6.0, index=3)


@pytest.mark.parametrize("subset, eps", [("readout", 1e-2), (["atom_conv_layers.3.*"], 1e-2)])
def test_parameter_derivatives_match_finite_differences(model, atoms, subset, eps):
    auto, fd = directional_derivatives(model, atoms, subset, eps=eps, seed=3)
    assert np.all(np.abs(auto) > 1e-3)
    np.testing.assert_allclose(auto, fd, rtol=2e-2, atol=2e-3 * np.abs(fd).max())


def test_energy_gradient_kernel_rotation_invariant(model, atoms):
    rot_atoms = [rotated(at, seed=k)[0] for k, at in enumerate(atoms)]
    G = energy_gradients(model, atoms)
    G_rot = energy_gradients(model, rot_atoms)
    K, K_rot = G @ G.T, G_rot @ G_rot.T
    np.testing.assert_allclose(K_rot, K, rtol=1e-4)
    assert abs(K[0, 1]) > 0


def test_force_jacobian_rotation_equivariant(model, atoms):
    mol = atoms[0]
    mol_rot, rot = rotated(mol, seed=7)
    w = np.random.default_rng(0).standard_normal((len(mol), 3))
    a = force_vjp(model, mol, "readout", w)
    b = force_vjp(model, mol_rot, "readout", w @ rot.T)
    np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max())


def test_embeddings_shape_and_invariance(model, atoms):
    h = model.embeddings(model.collate(atoms)).detach().numpy()
    assert h.shape == (10, model.n_embedding) == (10, 64)
    rot_atoms = [rotated(at, seed=k)[0] for k, at in enumerate(atoms)]
    h_rot = model.embeddings(model.collate(rot_atoms)).detach().numpy()
    np.testing.assert_allclose(h_rot, h, atol=1e-4 * np.abs(h).max())
    # the structure-level baseline: per-structure means of the same per-atom features
    from skntk.transformers import EmbeddingTransformer

    emb = EmbeddingTransformer(model).fit(atoms)
    X = emb.transform(atoms)
    assert emb.n_features_out_ == 64 and X.shape == (len(atoms), 64)
    ptr = np.cumsum([0] + [len(a) for a in atoms])
    np.testing.assert_allclose(X, [h[a:b].mean(0) for a, b in zip(ptr[:-1], ptr[1:], strict=True)],
                               rtol=1e-5, atol=1e-6)


def test_unknown_element_names_structure_and_element(model, atoms):
    bad = Atoms("HAm", positions=[[0, 0, 0], [0, 0, 1.8]])
    with pytest.raises(ValueError, match=r"X\[2\] \(HAm\) contains Am \(Z=95\).*chgnet-0.3.0"):
        model.collate([*atoms, bad])


def test_float64_rejected(model):
    with pytest.raises(ValueError, match="dtype=torch.float64 is not supported"):
        CHGNetMLIP(model.module, device="cpu", dtype=torch.float64)


def test_isolated_atom_names_structure(model, atoms):
    lone = Atoms("CO", positions=[[0, 0, 0], [0, 0, 9.0]])
    with pytest.raises(ValueError, match=r"X\[2\] \(CO\) has an atom with no neighbour within 6.0"):
        model.collate([*atoms, lone])


def test_joint_ntk_transformer_end_to_end(model, atoms):
    pytest.importorskip("skntk.transformers")
    from tests.models._checks import check_joint_transformer

    blocks = check_joint_transformer(model, atoms[:1])  # the molecule: keeps CI time low
    assert blocks.kind == "joint" and blocks.rows.shape[0] == 1 + 3 * 5

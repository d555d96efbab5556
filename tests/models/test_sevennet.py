"""SevenNet-0 backend against SevenNet's own ASE calculator, finite differences and symmetry."""

import numpy as np
import pytest
import torch

pytest.importorskip("sevenn", reason="needs the sevennet extra: pip install skntk[sevennet]")

from ase import Atoms  # noqa: E402

from skntk.models import load  # noqa: E402
from skntk.models.sevennet import SevenNetMLIP  # noqa: E402
from tests.models._checks import (  # noqa: E402
    directional_derivatives,
    energy_gradients,
    force_vjp,
    rotated,
    tiny_structures,
)

pytestmark = [pytest.mark.sevennet,
              pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def model():
    return load("sevennet-0", device="cpu")


@pytest.fixture(scope="module")
def atoms():
    return tiny_structures()


def test_handle_declares_model(model):
    assert isinstance(model, SevenNetMLIP)
    assert model.cutoff == 5.0
    assert len(model.species) == 89 and {1, 6, 8, 29} <= model.species
    sizes = {s: sum(p.numel() for _, p in model.parameters(s))
             for s in ("readout", "last_block", "all")}
    assert sizes["readout"] == 8256
    assert sizes["readout"] < sizes["last_block"] < sizes["all"]
    assert sizes["all"] == sum(p.numel() for p in model.module.parameters() if p.requires_grad)
    last = model.parameters("last_block")
    assert last and all(n.startswith("4_") and p.requires_grad for n, p in last)
    frozen = [n for n, p in model.module.named_parameters()
              if n.startswith("4_") and not p.requires_grad]
    assert frozen == ["4_convolution.denominator"]  # a constant, kept out of the subset


def test_matches_sevennet_calculator(model, atoms):
    from sevenn.calculator import SevenNetCalculator

    calc = SevenNetCalculator("7net-0", device="cpu")
    batch = model.collate(atoms, "cpu")
    assert batch.ptr.tolist() == [0, 5, 10]
    energy, forces = model.energy_and_forces(batch)
    assert energy.shape == (2,) and forces.shape == (10, 3)
    assert not energy.requires_grad and not forces.requires_grad
    for i, at in enumerate(atoms):
        ref = at.copy()
        ref.calc = calc
        np.testing.assert_allclose(energy[i].item(), ref.get_potential_energy(), rtol=1e-6,
                                   atol=1e-4)
        np.testing.assert_allclose(forces[batch.ptr[i]:batch.ptr[i + 1]].numpy(),
                                   ref.get_forces(), atol=2e-4)
    np.testing.assert_allclose(model.energy(batch).detach().numpy(), energy.numpy(), atol=1e-4)


def test_force_head_mode_restored(model, atoms):
    head = model.module._modules["force_output"]
    assert not head.training
    _, forces = model.energy_and_forces(model.collate(atoms), create_graph=True)
    assert forces.requires_grad and not head.training


@pytest.mark.parametrize("subset, eps", [
    # the readout is bilinear in θ: along a line E and F are quadratic and central differences
    # are exact for any step, so a large step beats float32 rounding
    ("readout", 0.5),
    (["4_self_interaction_2.*"], 3e-2),
])
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
    # F(Rx)_i = R F(x)_i for every θ, so Σ_i (R w_i)·∂F_i(Rx)/∂θ = Σ_i w_i·∂F_i(x)/∂θ
    mol = atoms[0]
    mol_rot, rot = rotated(mol, seed=7)
    w = np.random.default_rng(0).standard_normal((len(mol), 3))
    a = force_vjp(model, mol, "readout", w)
    b = force_vjp(model, mol_rot, "readout", w @ rot.T)
    np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max())


def test_embeddings_shape_and_invariance(model, atoms):
    h = model.embeddings(model.collate(atoms)).detach().numpy()
    assert h.shape == (10, model.n_embedding) == (10, 128)
    rot_atoms = [rotated(at, seed=k)[0] for k, at in enumerate(atoms)]
    h_rot = model.embeddings(model.collate(rot_atoms)).detach().numpy()
    np.testing.assert_allclose(h_rot, h, atol=1e-4 * np.abs(h).max())


def test_unknown_element_names_structure_and_element(model, atoms):
    bad = Atoms("HPo", positions=[[0, 0, 0], [0, 0, 1.8]])
    with pytest.raises(ValueError, match=r"X\[2\] \(HPo\) contains Po \(Z=84\).*sevennet-0"):
        model.collate([*atoms, bad])


def test_float64_rejected(model):
    with pytest.raises(ValueError, match="dtype=torch.float64 is not supported"):
        SevenNetMLIP(model.module, device="cpu", dtype=torch.float64)


def test_joint_ntk_transformer_end_to_end(model, atoms):
    pytest.importorskip("skntk.transformers")
    from tests.models._checks import check_joint_transformer

    blocks = check_joint_transformer(model, atoms[:1])  # the molecule: keeps CI time low
    assert blocks.kind == "joint" and blocks.rows.shape[0] == 1 + 3 * 5

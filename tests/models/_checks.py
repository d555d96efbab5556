"""Backend-independent checks of the MLIP protocol, shared by the backend test modules.

Written plainly on purpose: parameter derivatives by ``torch.autograd.grad`` against central
finite differences obtained by moving the stored parameters, rotation checks by rotating the
Atoms with ASE.
"""

from __future__ import annotations

import numpy as np
import torch
from ase.build import add_adsorbate, fcc111, molecule
from scipy.spatial.transform import Rotation


def tiny_structures():
    """A 5-atom molecule (non-periodic) and a 5-atom periodic Cu slab with an O adatom."""
    mol = molecule("CH3OH")[:5]  # C, O, H, H, H
    mol.rattle(0.03, seed=1)
    slab = fcc111("Cu", (2, 2, 1), vacuum=7.0)
    add_adsorbate(slab, "O", 1.4, "fcc")
    slab.pbc = True
    slab.rattle(0.03, seed=2)
    return [mol, slab]


def rotated(atoms, seed):
    """A rigidly rotated copy (cell rotated with the atoms) and the rotation matrix (3, 3)."""
    rot = Rotation.random(random_state=seed).as_matrix()
    out = atoms.copy()
    out.positions = atoms.positions @ rot.T
    if atoms.cell.rank == 3:
        out.cell = np.asarray(atoms.cell) @ rot.T
    return out, rot


def flat_grad(output, params, create_graph=False):
    """d(output)/dθ flattened over ``params`` (zeros for unused parameters), shape (P,)."""
    grads = torch.autograd.grad(output, params, retain_graph=True, allow_unused=True,
                                create_graph=create_graph)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for g, p in zip(grads, params, strict=True)])


def energy_gradients(model, atoms, subset="readout"):
    """Energy NTK rows ∂E/∂θ of each structure, ndarray (n_structures, P), float64."""
    params = [p for _, p in model.parameters(subset)]
    batch = model.collate(atoms, "cpu")
    energy = model.energy(batch)
    return np.stack([flat_grad(e, params).double().numpy() for e in energy])


def directional_derivatives(model, atoms, subset, *, n_directions=2, eps=1e-3, seed=0):
    """Compare autograd with central finite differences along random parameter directions.

    For each random unit direction v in the subset and random weights w (energies) and
    W (forces), returns the autograd values w·(∂E/∂θ)v and Σ W∘(∂F/∂θ)v and the same from
    (E(θ+εv) - E(θ-εv)) / 2ε, with ε = ``eps`` times the RMS of the subset's parameters.

    Returns
    -------
    auto, fd : ndarray of shape (n_directions, 2)
        Columns: energy, forces.
    """
    rng = np.random.default_rng(seed)
    named = model.parameters(subset)
    params = [p for _, p in named]
    batch = model.collate(atoms, "cpu")
    energy, forces = model.energy_and_forces(batch, create_graph=True)
    w = torch.as_tensor(rng.standard_normal(energy.shape), dtype=energy.dtype)
    W = torch.as_tensor(rng.standard_normal(forces.shape), dtype=forces.dtype)
    gE = flat_grad((energy * w).sum(), params).double()
    gF = flat_grad((forces * W).sum(), params).double()
    theta = torch.cat([p.detach().reshape(-1) for p in params]).double()
    scale = eps * float(theta.pow(2).mean().sqrt())
    auto, fd = [], []
    for _ in range(n_directions):
        v = torch.as_tensor(rng.standard_normal(theta.numel()))
        v /= v.norm()
        auto.append([float(gE @ v), float(gF @ v)])
        vals = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                off = 0
                saved = []
                for p in params:
                    n = p.numel()
                    saved.append(p.detach().clone())
                    p.add_((sign * scale * v[off:off + n]).reshape(p.shape).to(p.dtype))
                    off += n
            try:
                e, f = model.energy_and_forces(model.collate(atoms, "cpu"))
                vals.append([float((e.double() * w.double()).sum()),
                             float((f.double() * W.double()).sum())])
            finally:
                with torch.no_grad():
                    for p, s in zip(params, saved, strict=True):
                        p.copy_(s)
        fd.append([(vals[0][k] - vals[1][k]) / (2 * scale) for k in range(2)])
    return np.array(auto), np.array(fd)


def force_vjp(model, atoms, subset, weights):
    """Σ_i weights_i · ∂F_i/∂θ for one structure: ndarray (P,), float64."""
    params = [p for _, p in model.parameters(subset)]
    batch = model.collate([atoms], "cpu")
    _, forces = model.energy_and_forces(batch, create_graph=True)
    W = torch.as_tensor(weights, dtype=forces.dtype)
    return flat_grad((forces * W).sum(), params).double().numpy()


def check_backend(model, atoms, subset="readout", *, rtol=1e-3, eps=1e-3, seed=0):
    """Run the finite-difference and rotation checks; raise AssertionError on failure."""
    auto, fd = directional_derivatives(model, atoms, subset, eps=eps, seed=seed)
    np.testing.assert_allclose(auto, fd, rtol=rtol, atol=rtol * np.abs(fd).max())
    return auto, fd


def check_joint_transformer(model, atoms, subset="readout", *, rtol=1e-4):
    """ForceNTKTransformer(kind="joint") end to end on ``model``: exact (unsketched) rows equal
    the plain autograd energy gradient per atom and force Jacobian, energy rows are rotation
    invariant and the force Gram matrix's trace too. Returns the blocks."""
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
        rows = blocks.rows[blocks.offsets[i]:blocks.offsets[i + 1]]
        np.testing.assert_allclose(rows[0], G_E[i] / n_atoms[i], atol=rtol * scale)
        w = rng.standard_normal((n_atoms[i], 3))
        ref = force_vjp(model, at, subset, w)
        np.testing.assert_allclose(w.reshape(-1) @ rows[1:], ref, atol=rtol * np.abs(ref).max())
    rot = [rotated(at, seed=10 + k)[0] for k, at in enumerate(atoms)]
    blocks_rot = ntk.transform(rot)
    for i in range(len(atoms)):
        a = blocks.rows[blocks.offsets[i]:blocks.offsets[i + 1]]
        b = blocks_rot.rows[blocks_rot.offsets[i]:blocks_rot.offsets[i + 1]]
        np.testing.assert_allclose(b[0], a[0], atol=rtol * scale)
        tr_a, tr_b = np.sum(a[1:] ** 2), np.sum(b[1:] ** 2)
        np.testing.assert_allclose(tr_b, tr_a, rtol=10 * rtol)
    return blocks

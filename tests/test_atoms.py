"""Tests of skntk.atoms: validation errors, collation and neighbour pairs against brute force."""

import itertools

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from skntk.atoms import AtomsBatch, as_atoms_list, collate, neighbor_pairs, validate_structures


def brute_force_pairs(atoms, cutoff, n_images=3):
    """All (i, j, S) with |r_j - r_i + S·cell| < cutoff, by enumerating images (plain loops)."""
    pos, cell = atoms.positions, atoms.cell.array
    ranges = [range(-n_images, n_images + 1) if p else range(1) for p in atoms.pbc]
    out = set()
    for S in itertools.product(*ranges):
        for i in range(len(atoms)):
            for j in range(len(atoms)):
                if i == j and not any(S):
                    continue
                d = pos[j] - pos[i] + np.array(S) @ cell
                if np.linalg.norm(d) < cutoff:
                    out.add((i, j, *S))
    return out


@pytest.mark.parametrize("atoms,cutoff", [
    (molecule("CH3CH2OH"), 2.5),
    (bulk("Cu", "fcc", a=3.6), 4.0),
    (bulk("NaCl", "rocksalt", a=5.6) * (1, 1, 2), 4.5),
])
def test_neighbor_pairs_match_brute_force(atoms, cutoff):
    atoms = atoms.copy()
    atoms.rattle(0.05, seed=0)
    i, j, S = neighbor_pairs(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    got = {(a, b, *s) for a, b, s in zip(i.tolist(), j.tolist(), S.tolist(), strict=True)}
    assert got == brute_force_pairs(atoms, cutoff)


def test_slab_partial_pbc_pairs_match_brute_force():
    from ase.build import fcc111
    slab = fcc111("Pt", size=(2, 2, 2), vacuum=5.0)
    slab.pbc = (True, True, False)
    i, j, S = neighbor_pairs(slab.positions, slab.cell.array, slab.pbc, 3.5)
    got = {(a, b, *s) for a, b, s in zip(i.tolist(), j.tolist(), S.tolist(), strict=True)}
    assert got == brute_force_pairs(slab, 3.5)


def test_collate_layout_and_edge_vectors():
    mols = [molecule("H2O"), bulk("Si", "diamond", a=5.43), molecule("CH4")]
    b = collate(mols, cutoff=3.0)
    assert isinstance(b, AtomsBatch)
    assert b.ptr.tolist() == [0, 3, 5, 10]
    assert b.batch.tolist() == [0] * 3 + [1] * 2 + [2] * 5
    assert b.cell.shape == (3, 3, 3) and b.pbc.tolist()[1] == [True] * 3
    assert b.positions.dtype == torch.float64 and b.numbers.dtype == torch.int64
    # no pair crosses structures
    i, j = b.edge_index
    assert torch.equal(b.batch[i], b.batch[j])
    # edge vectors: lengths within cutoff, equal to the per-structure pair distances
    r = b.edge_vectors().norm(dim=1)
    assert torch.all(r < 3.0) and torch.all(r > 0)
    si = mols[1]
    ii, jj, S = neighbor_pairs(si.positions, si.cell.array, si.pbc, 3.0)
    ref = np.linalg.norm(si.positions[jj] - si.positions[ii] + S @ si.cell.array, axis=1)
    mask = (b.batch[i] == 1).numpy()
    np.testing.assert_allclose(np.sort(r.numpy()[mask]), np.sort(ref))
    assert b.n_atoms_per_structure.tolist() == [3, 2, 5]


def test_edge_vectors_differentiable_and_to():
    b = collate([molecule("H2O")], cutoff=2.0)
    pos = b.positions.clone().requires_grad_(True)
    b.edge_vectors(pos).norm(dim=1).sum().backward()
    assert pos.grad is not None and torch.isfinite(pos.grad).all()
    b32 = b.to(dtype=torch.float32)
    assert b32.positions.dtype == torch.float32 and b32.numbers.dtype == torch.int64


def test_accepts_single_iterator_and_path(tmp_path):
    mols = [molecule("H2O"), molecule("NH3")]
    assert len(as_atoms_list(mols[0])) == 1
    assert len(as_atoms_list(iter(mols))) == 2
    path = tmp_path / "x.extxyz"
    ase.io.write(path, mols)
    got = as_atoms_list(path)
    assert [a.get_chemical_formula() for a in got] == ["H2O", "H3N"]
    assert collate(str(path), cutoff=2.0).n_structures == 2


@pytest.mark.parametrize("X,match", [
    ([molecule("H2O"), Atoms()], r"X\[1\] is an empty structure"),
    ([Atoms("H2", positions=[[0, 0, 0], [np.nan, 0, 0]])],
     r"X\[0\] \(H2\) has non-finite .* atom 1"),
    ([molecule("H2O"), molecule("CH3CH2OH"), Atoms("Au")],
     r"X\[2\] \(Au\) contains Au \(Z=79\), which the model does not cover; it covers "
     r"Z=\[1, 6, 8, 29\]"),
    ([Atoms("Cu", pbc=True)], r"X\[0\] \(Cu\) has pbc=\[True, True, True\] but a singular cell"),
    ([Atoms("Cu2", positions=[[0, 0, 0], [1, 1, 1]], cell=[[2, 0, 0], [4, 0, 0], [0, 0, 2]],
            pbc=True)], r"X\[0\] \(Cu2\) .* singular cell"),
    ([], "contains no structures"),
])
def test_validate_errors_name_structure(X, match):
    with pytest.raises(ValueError, match=match):
        validate_structures(X, species={1, 6, 8, 29})


def test_non_periodic_zero_cell_is_fine_and_slab_cell_checked_on_periodic_axes():
    validate_structures([molecule("H2O")])  # zero cell, pbc False
    slab = Atoms("Cu", cell=[[2, 0, 0], [0, 2, 0], [0, 0, 0]], pbc=[True, True, False])
    validate_structures([slab])  # zero vector only along the non-periodic axis


@pytest.mark.parametrize("X,err,match", [
    (np.zeros((3, 4)), TypeError, "numeric array of shape"),
    (5, TypeError, "got int"),
    ([molecule("H2O"), "H2O"], TypeError, r"X\[1\] is a str"),
])
def test_bad_types(X, err, match):
    with pytest.raises(err, match=match):
        as_atoms_list(X)

"""Validate structures and collate them into batched torch tensors.

Only this module and :mod:`skntk.io` touch ``ase.Atoms``. A collated :class:`AtomsBatch` holds, for
``n_structures`` structures with ``n_atoms`` atoms in total (atoms of structure ``s`` are
``ptr[s]:ptr[s + 1]``, in the order of each ``Atoms`` object):

==============  ===========================  =====================================================
field           shape                        meaning
==============  ===========================  =====================================================
positions       (n_atoms, 3) float           Cartesian positions in Å
numbers         (n_atoms,) int64             atomic numbers
cell            (n_structures, 3, 3) float   cell vectors (rows) in Å
pbc             (n_structures, 3) bool       periodic directions
batch           (n_atoms,) int64             structure index of every atom
ptr             (n_structures + 1,) int64    atom offsets
edge_index      (2, n_edges) int64           neighbour pairs ``(i, j)`` (global atom indices)
shifts          (n_edges, 3) float           integer cell shifts ``S`` of atom ``j``
==============  ===========================  =====================================================

The vector from atom ``i`` to its neighbour ``j`` is ``positions[j] - positions[i] + S @ cell``
(:meth:`AtomsBatch.edge_vectors`), differentiable with respect to ``positions``. Pairs are found by
ASE's :func:`ase.neighborlist.primitive_neighbor_list` (a binned O(N) search), both directions of
every pair are listed and self-pairs at zero shift are excluded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, fields

import numpy as np
import torch
from ase import Atoms
from ase.neighborlist import primitive_neighbor_list

from skntk.io import _label

logger = logging.getLogger(__name__)

__all__ = ["AtomsBatch", "as_atoms_list", "validate_structures", "neighbor_pairs", "collate",
           "MIN_DISTANCE", "MAX_ATOMIC_NUMBER", "MAX_LENGTH"]

#: Closest two atoms may be, in Å (periodic images included), for :func:`validate_structures`.
#: Real interatomic distances are above ~0.5 Å (H2: 0.74 Å); atoms closer than this are a
#: duplicated atom or a broken frame, and make the pair vector (nearly) zero, where radial bases
#: and spherical harmonics give NaN/inf — and in a batched graph a NaN reaches the rows of every
#: structure sharing the graph.
MIN_DISTANCE = 0.1

#: Largest atomic number accepted (oganesson); atomic numbers must be 1..MAX_ATOMIC_NUMBER.
MAX_ATOMIC_NUMBER = 118

#: Largest position coordinate or periodic cell-vector length accepted, in Å (100 µm). Larger
#: values are a unit mistake (metres, or Bohr scaled twice); they overflow the neighbour list's
#: binning (a 1e12 Å cell fails deep inside ASE).
MAX_LENGTH = 1e6


def as_atoms_list(X, *, name: str = "X") -> list[Atoms]:
    """``X`` as a list of ``ase.Atoms``.

    Parameters
    ----------
    X : ase.Atoms, iterable of ase.Atoms, str or os.PathLike
        One structure, a list/iterator of structures, or a path to a structure file (read with
        :func:`skntk.io.read_structures`, e.g. extended XYZ).
    name : str, default="X"
        Name of the argument in error messages.

    Returns
    -------
    atoms : list of ase.Atoms of length n_structures

    Examples
    --------
    >>> from ase.build import molecule
    >>> len(as_atoms_list(molecule("H2O"))), len(as_atoms_list(iter([molecule("H2O")] * 2)))
    (1, 2)
    """
    if isinstance(X, Atoms):
        return [X]
    if isinstance(X, (str, os.PathLike)):
        from skntk.io import read_structures

        return read_structures(X)
    if isinstance(X, np.ndarray) and X.dtype != object:
        raise TypeError(
            f"{name} must be ase.Atoms, a list of ase.Atoms or a structure file path; got a "
            f"numeric "
            f"array of shape {X.shape}."
        )
    if not isinstance(X, Iterable):
        raise TypeError(
            f"{name} must be ase.Atoms, a list of ase.Atoms or a structure file path; got "
            f"{type(X).__name__}."
        )
    out = list(X)
    for i, a in enumerate(out):
        if not isinstance(a, Atoms):
            raise TypeError(f"{name}[{i}] is a {type(a).__name__}, not an ase.Atoms.")
    return out


def validate_structures(atoms_list, *, species=None, name: str = "X",
                        model_name: str | None = None) -> list[Atoms]:
    """Check every structure and return the list.

    Parameters
    ----------
    atoms_list : list of ase.Atoms of length n_structures
    species : collection of int or None, default=None
        Atomic numbers a model supports; ``None`` accepts any element.
    name : str, default="X"
        Name of the argument in error messages.
    model_name : str or None, default=None
        Name of the model in the message about elements outside ``species`` (``None``: "the
        model").

    Returns
    -------
    atoms_list : list of ase.Atoms

    Raises
    ------
    ValueError
        Naming the structure index and formula: an empty list, a structure without atoms,
        atomic numbers outside 1..:data:`MAX_ATOMIC_NUMBER` (naming the atom), non-finite
        positions or cell, elements outside ``species``, a periodic direction whose cell vectors
        are linearly dependent (singular cell), two atoms (or an atom and a periodic image)
        closer than :data:`MIN_DISTANCE` Å (naming the pair and the distance), a position or a
        periodic cell vector beyond :data:`MAX_LENGTH` Å.

    Examples
    --------
    >>> from ase import Atoms
    >>> validate_structures([Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]])], species={1})[0]
    Atoms(symbols='H2', pbc=False)
    """
    atoms_list = as_atoms_list(atoms_list, name=name)
    if not atoms_list:
        raise ValueError(f"{name} contains no structures.")
    allowed = None if species is None else {int(z) for z in species}
    for i, a in enumerate(atoms_list):
        if len(a) == 0:
            raise ValueError(f"{name}[{i}] is an empty structure (no atoms).")
        numbers = np.asarray(a.numbers)
        invalid = (numbers < 1) | (numbers > MAX_ATOMIC_NUMBER)
        if invalid.any():
            k = int(np.flatnonzero(invalid)[0])
            raise ValueError(f"{name}[{i}] has atomic number Z={int(numbers[k])} at atom {k}; "
                             f"atomic numbers must be 1..{MAX_ATOMIC_NUMBER}.")
        pos = a.positions
        if not np.all(np.isfinite(pos)):
            bad = int(np.flatnonzero(~np.isfinite(pos).all(axis=1))[0])
            raise ValueError(f"{_label(a, i, name)} has non-finite (NaN/inf) positions at "
                             f"atom {bad}.")
        cell = a.cell.array
        if not np.all(np.isfinite(cell)):
            raise ValueError(f"{_label(a, i, name)} has a non-finite (NaN/inf) cell.")
        if allowed is not None:
            unknown = sorted(set(a.numbers.tolist()) - allowed)
            if unknown:
                from ase.data import chemical_symbols

                names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in unknown)
                raise ValueError(
                    f"{_label(a, i, name)} contains {names}, which {model_name or 'the model'} "
                    f"does not cover; it covers Z={sorted(allowed)}."
                )
        pbc = np.asarray(a.pbc, dtype=bool)
        lengths = np.linalg.norm(cell[pbc], axis=1)
        if np.abs(pos).max() > MAX_LENGTH or (lengths.size and lengths.max() > MAX_LENGTH):
            what = (f"a periodic cell vector of length {lengths.max():.3g} Å"
                    if lengths.size and lengths.max() > MAX_LENGTH
                    else f"a position coordinate of {np.abs(pos).max():.3g} Å")
            raise ValueError(f"{_label(a, i, name)} has {what}, beyond skntk.atoms.MAX_LENGTH = "
                             f"{MAX_LENGTH:g} Å; check the units of its cell and positions.")
        if pbc.any():
            periodic = cell[pbc]
            sv = np.linalg.svd(periodic, compute_uv=False)
            scale = max(float(np.abs(cell).max()), 1e-300)
            if sv.min() <= 1e-8 * scale or np.abs(cell).max() == 0:
                raise ValueError(
                    f"{_label(a, i, name)} has pbc={pbc.tolist()} but a singular cell "
                    f"{cell.round(6).tolist()}: the periodic cell vectors are zero or linearly "
                    f"dependent."
                )
        _check_min_distance(a, i, name)
    return atoms_list


def _check_min_distance(atoms: Atoms, i: int, name: str) -> None:
    """Refuse two atoms (or an atom and a periodic image) closer than :data:`MIN_DISTANCE`."""
    if len(atoms) < 2 and not np.any(atoms.pbc):
        return
    pos = np.asarray(atoms.positions, dtype=np.float64)
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    if not np.any(atoms.pbc):  # a k-d tree: no images to build (the common, molecular case)
        from scipy.spatial import cKDTree

        pairs = cKDTree(pos).query_pairs(MIN_DISTANCE, output_type="ndarray")
        a_idx, b_idx = pairs[:, 0], pairs[:, 1]
        S = np.zeros((len(pairs), 3))
    else:
        a_idx, b_idx, S = neighbor_pairs(pos, cell, atoms.pbc, MIN_DISTANCE)
    if len(a_idx) == 0:
        return
    d = np.linalg.norm(pos[b_idx] - pos[a_idx] + S @ cell, axis=1)
    k = int(np.lexsort((b_idx, a_idx))[0])
    p, q, dist = int(a_idx[k]), int(b_idx[k]), float(d[k])
    where = (f"atom {p} is {dist:.3g} Å from its own periodic image" if p == q else
             f"atoms {min(p, q)} and {max(p, q)} are {dist:.3g} Å apart"
             + (" (across a periodic boundary)" if np.any(S[k]) else ""))
    raise ValueError(f"{_label(atoms, i, name)}: {where}, closer than "
                     f"skntk.atoms.MIN_DISTANCE = {MIN_DISTANCE} Å; overlapping atoms give "
                     f"NaN/inf model outputs (remove the duplicated atom).")


def neighbor_pairs(positions, cell, pbc, cutoff: float):
    """Neighbour pairs within ``cutoff`` of one structure (arrays in, arrays out).

    Parameters
    ----------
    positions : ndarray of shape (n_atoms, 3)
        Positions in Å.
    cell : ndarray of shape (3, 3)
        Cell vectors (rows) in Å; ignored along non-periodic directions (may be zero).
    pbc : array-like of bool of shape (3,)
    cutoff : float
        Cutoff radius in Å.

    Returns
    -------
    i, j : ndarray of int64 of shape (n_pairs,)
        Centre and neighbour atom indices; every pair appears in both directions.
    shifts : ndarray of int64 of shape (n_pairs, 3)
        Cell shifts ``S`` so that the pair vector is ``positions[j] - positions[i] + S @ cell``.

    Examples
    --------
    >>> import numpy as np
    >>> i, j, S = neighbor_pairs(np.array([[0.0, 0, 0], [0, 0, 1.0], [0, 0, 5.0]]),
    ...                          np.zeros((3, 3)), [False] * 3, 2.0)
    >>> sorted(zip(i.tolist(), j.tolist()))
    [(0, 1), (1, 0)]
    """
    positions = np.asarray(positions, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    cell = np.asarray(cell, dtype=np.float64)
    if not pbc.any():
        # a molecule in a big box: ASE would bin the whole box; a zero cell bins the atoms' extent
        cell = np.zeros((3, 3))
    i, j, S = primitive_neighbor_list(
        "ijS", pbc, cell, positions,
        float(cutoff), self_interaction=False,
    )
    return i.astype(np.int64), j.astype(np.int64), S.astype(np.int64)


@dataclass
class AtomsBatch:
    """Structures collated into flat tensors; see the module docstring for the fields."""

    positions: torch.Tensor
    numbers: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    batch: torch.Tensor
    ptr: torch.Tensor
    edge_index: torch.Tensor
    shifts: torch.Tensor
    cutoff: float

    @property
    def n_structures(self) -> int:
        return int(self.ptr.shape[0] - 1)

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_atoms_per_structure(self) -> torch.Tensor:
        """LongTensor of shape (n_structures,)."""
        return self.ptr[1:] - self.ptr[:-1]

    def edge_vectors(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Pair vectors ``r_j - r_i + S @ cell`` of shape (n_edges, 3) in Å.

        ``positions`` (n_atoms, 3) replaces :attr:`positions`, e.g. a tensor requiring grad.
        """
        pos = self.positions if positions is None else positions
        i, j = self.edge_index
        offset = torch.einsum("ek,ekl->el", self.shifts, self.cell[self.batch[i]])
        return pos[j] - pos[i] + offset

    def to(self, device=None, dtype=None) -> AtomsBatch:
        """A copy with float tensors cast to ``dtype`` and all tensors moved to ``device``."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                if v.is_floating_point() and dtype is not None:
                    v = v.to(device=device, dtype=dtype)
                else:
                    v = v.to(device=device)
            kw[f.name] = v
        return AtomsBatch(**kw)


def collate(atoms_list, cutoff: float, *, device="cpu", dtype=torch.float64, species=None,
            validate: bool = True, name: str = "X") -> AtomsBatch:
    """Collate structures into one :class:`AtomsBatch` with neighbour pairs within ``cutoff``.

    Parameters
    ----------
    atoms_list : ase.Atoms, iterable of ase.Atoms or path
        Structures (see :func:`as_atoms_list`).
    cutoff : float
        Neighbour cutoff in Å.
    device : str or torch.device, default="cpu"
    dtype : torch.dtype, default=torch.float64
        Dtype of positions, cells and shifts.
    species : collection of int or None, default=None
        Supported atomic numbers (checked when ``validate``).
    validate : bool, default=True
        Run :func:`validate_structures` first.
    name : str, default="X"
        Name used in error messages.

    Returns
    -------
    batch : AtomsBatch

    Examples
    --------
    >>> from ase.build import molecule
    >>> b = collate([molecule("H2O"), molecule("CH4")], cutoff=1.2)
    >>> b.ptr.tolist(), b.batch.tolist(), b.edge_index.shape[1]
    ([0, 3, 8], [0, 0, 0, 1, 1, 1, 1, 1], 12)
    """
    atoms_list = (validate_structures(atoms_list, species=species, name=name) if validate
                  else as_atoms_list(atoms_list, name=name))
    pos, num, cells, pbcs, ii, jj, ss = [], [], [], [], [], [], []
    offset = 0
    counts = []
    for a in atoms_list:
        p = np.asarray(a.positions, dtype=np.float64)
        c = np.asarray(a.cell.array, dtype=np.float64)
        pb = np.asarray(a.pbc, dtype=bool)
        i, j, S = neighbor_pairs(p, c, pb, cutoff)
        pos.append(p)
        num.append(np.asarray(a.numbers, dtype=np.int64))
        cells.append(c)
        pbcs.append(pb)
        ii.append(i + offset)
        jj.append(j + offset)
        ss.append(S)
        counts.append(len(a))
        offset += len(a)
    counts = np.asarray(counts, dtype=np.int64)
    ptr = np.concatenate([[0], np.cumsum(counts)])
    edge_index = np.stack([np.concatenate(ii), np.concatenate(jj)])
    return AtomsBatch(
        positions=torch.as_tensor(np.concatenate(pos), dtype=dtype, device=device),
        numbers=torch.as_tensor(np.concatenate(num), device=device),
        cell=torch.as_tensor(np.stack(cells), dtype=dtype, device=device),
        pbc=torch.as_tensor(np.stack(pbcs), device=device),
        batch=torch.as_tensor(np.repeat(np.arange(len(counts)), counts), device=device),
        ptr=torch.as_tensor(ptr, device=device),
        edge_index=torch.as_tensor(edge_index, device=device),
        shifts=torch.as_tensor(np.concatenate(ss), dtype=dtype, device=device),
        cutoff=float(cutoff),
    )

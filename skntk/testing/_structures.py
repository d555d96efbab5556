"""Small test structures and the hypothesis strategies of :mod:`skntk.testing`.

:func:`random_structures` and :func:`tiny_structures` build a few small structures (positions
in Å); :func:`atoms`, :func:`rigid_motions` and :func:`permutations` are hypothesis strategies
(they need the ``test`` extra), whose motions ``apply`` to any ``ase.Atoms``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms
from scipy.spatial.transform import Rotation

from skntk.atoms import neighbor_pairs


def _hypothesis():
    try:
        import hypothesis.strategies as st
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("skntk.testing's strategies need hypothesis: pip install skntk[test]"
                          ) from err
    return st


def _min_image_ok(positions, cell, pbc, min_distance) -> bool:
    """No two atoms (periodic images and an atom's own images included) closer than the bound."""
    i, _, _ = neighbor_pairs(positions, cell, pbc, min_distance)
    return len(i) == 0


def _build_structure(rng, numbers, pbc, triclinic, *, min_distance, max_bond, cell_lengths,
                     n_tries=50):
    """One structure: atoms grown one by one, each at ``min_distance..max_bond`` Å from an earlier
    atom (so every atom has a neighbour within ``max_bond``); ``None`` when no placement keeps all
    distances (periodic images included) above ``min_distance``."""
    pbc = np.asarray(pbc, dtype=bool)
    if pbc.any():
        lengths = rng.uniform(*cell_lengths, size=3)
        angles = rng.uniform(65.0, 115.0, size=3) if triclinic else np.full(3, 90.0)
        from ase.geometry import cellpar_to_cell

        cell = cellpar_to_cell(np.concatenate([lengths, angles]))
        if not _min_image_ok(np.zeros((1, 3)), cell, pbc, min_distance):
            return None
    else:
        cell = np.zeros((3, 3))
    positions = [rng.uniform(0.0, 1.0, size=3) @ cell if pbc.any() else np.zeros(3)]
    for _ in range(1, len(numbers)):
        for _ in range(n_tries):
            direction = rng.standard_normal(3)
            direction /= np.linalg.norm(direction)
            r = rng.uniform(min_distance * 1.05, max_bond)
            trial = positions[rng.integers(len(positions))] + r * direction
            cand = np.vstack([*positions, trial])
            if _min_image_ok(cand, cell, pbc, min_distance):
                positions.append(trial)
                break
        else:
            return None
    return Atoms(numbers=list(numbers), positions=np.array(positions), cell=cell, pbc=pbc)


def random_structures(species=(1, 6, 8), *, n_atoms=(3, 4), min_distance=1.0, max_bond=1.6,
                      cell_lengths=(3.0, 4.5), random_state=0) -> list[Atoms]:
    """Three small structures: a molecule, an orthorhombic fully periodic cell and a triclinic
    cell periodic along two directions (pbc ``(True, True, False)``).

    The deterministic counterpart of :func:`atoms`, used by :func:`check_featurizer` and
    :func:`check_mlip` when they are given no structures.

    Parameters
    ----------
    species : sequence of int, default=(1, 6, 8)
        Atomic numbers to draw from.
    n_atoms : (int, int), default=(3, 4)
        Atoms of the molecule and of each cell.
    min_distance : float, default=1.0
        Smallest distance between two atoms (periodic images included), in Å.
    max_bond : float, default=1.6
        Every atom has a neighbour closer than this, in Å.
    cell_lengths : (float, float), default=(3.0, 4.5)
        Range of the cell vector lengths, in Å.
    random_state : int, default=0

    Returns
    -------
    structures : list of ase.Atoms of length 3
    """
    rng = np.random.default_rng(random_state)
    species = sorted({int(z) for z in species})
    out = []
    for n, pbc, tri in [(n_atoms[0], (False,) * 3, False), (n_atoms[1], (True,) * 3, False),
                        (n_atoms[1], (True, True, False), True)]:
        for _ in range(100):
            numbers = rng.choice(species, size=n)
            a = _build_structure(rng, numbers, pbc, tri, min_distance=min_distance,
                                 max_bond=max_bond, cell_lengths=cell_lengths)
            if a is not None:
                out.append(a)
                break
        else:  # pragma: no cover - only for extreme arguments
            raise ValueError(f"could not place {n} atoms {min_distance} Å apart in cells of "
                             f"{cell_lengths} Å.")
    return out


def tiny_structures() -> list[Atoms]:
    """A 5-atom molecule (C, O, H, H, H from methanol) and a 5-atom periodic Cu(111) slab with an
    O adatom, both rattled by 0.03 Å; the structures skntk's backend tests use.

    Returns
    -------
    structures : list of ase.Atoms of length 2
    """
    from ase.build import add_adsorbate, fcc111, molecule

    mol = molecule("CH3OH")[:5]
    mol.rattle(0.03, seed=1)
    slab = fcc111("Cu", (2, 2, 1), vacuum=7.0)
    add_adsorbate(slab, "O", 1.4, "fcc")
    slab.pbc = True
    slab.rattle(0.03, seed=2)
    return [mol, slab]


def atoms(species=(1, 6, 8), n_atoms=(1, 6), periodic=None, min_distance=1.0, *, cell=None,
          max_bond=1.6, cell_lengths=(3.0, 5.0)):
    """Hypothesis strategy of small ``ase.Atoms`` with atoms never closer than ``min_distance``.

    Parameters
    ----------
    species : sequence of int, default=(1, 6, 8)
        Atomic numbers to draw from.
    n_atoms : int or (int, int), default=(1, 6)
        Number of atoms, or its inclusive range.
    periodic : bool or tuple of 3 bool or None, default=None
        ``False``: molecules (no pbc, zero cell); ``True``: periodic along at least one
        direction (mixed pbc included); a tuple: exactly that pbc; ``None``: either.
    min_distance : float, default=1.0
        Smallest distance between two atoms, an atom and an image of another, or an atom and its
        own image, in Å.
    cell : {"orthorhombic", "triclinic"} or None, default=None
        Shape of the cell of periodic structures (cell angles 65..115° when triclinic); ``None``:
        either.
    max_bond : float, default=1.6
        Every atom has a neighbour closer than this, in Å (structures are connected).
    cell_lengths : (float, float), default=(3.0, 5.0)
        Range of the cell vector lengths, in Å.

    Returns
    -------
    strategy : hypothesis.strategies.SearchStrategy of ase.Atoms

    Notes
    -----
    Counts, elements, pbc and cell shape are drawn by hypothesis (and shrink); the geometry is
    grown from a drawn seed, atom by atom, each new atom ``min_distance..max_bond`` Å from an
    earlier one.

    Examples
    --------
    >>> from hypothesis import given
    >>> @given(atoms(periodic=True, cell="triclinic"))
    ... def test_cells(a):
    ...     assert a.pbc.any() and a.cell.rank == 3
    >>> test_cells()
    """
    st = _hypothesis()
    lo, hi = (n_atoms, n_atoms) if isinstance(n_atoms, int) else n_atoms
    if periodic is None or periodic is True:
        pbcs = st.tuples(st.booleans(), st.booleans(), st.booleans())
        if periodic is True:
            pbcs = pbcs.filter(any)
        elif periodic is None:
            pbcs = st.one_of(st.just((False, False, False)), pbcs)
    elif periodic is False:
        pbcs = st.just((False, False, False))
    else:
        pbcs = st.just(tuple(bool(p) for p in periodic))
    shapes = st.sampled_from(["orthorhombic", "triclinic"]) if cell is None else st.just(cell)
    species = sorted({int(z) for z in species})

    @st.composite
    def _atoms(draw):
        n = draw(st.integers(lo, hi))
        numbers = draw(st.lists(st.sampled_from(species), min_size=n, max_size=n))
        pbc = draw(pbcs)
        shape = draw(shapes) if any(pbc) else "orthorhombic"
        seed = draw(st.integers(0, 2 ** 32 - 1))
        a = _build_structure(np.random.default_rng(seed), numbers, pbc, shape == "triclinic",
                             min_distance=min_distance, max_bond=max_bond,
                             cell_lengths=cell_lengths)
        if a is None:
            from hypothesis import reject

            reject()
        a.info["cell_shape"] = shape if any(pbc) else None
        return a

    return _atoms()


@dataclass(frozen=True)
class RigidMotion:
    """A proper rotation, a translation, and lattice-vector shifts of single atoms.

    ``apply`` maps positions ``r_i ↦ Q (r_i + S_i · cell) + t`` and the cell ``C ↦ C Qᵀ``, where
    ``S_i`` are integer shifts in {-1, 0, 1} along the periodic directions only (drawn from
    ``shift_seed``): the same structure in a rotated, translated frame.

    Attributes
    ----------
    rotation : ndarray of shape (3, 3)
        ``Q``, orthogonal with determinant 1.
    translation : ndarray of shape (3,)
        ``t`` in Å.
    shift_seed : int or None
        Seed of the per-atom lattice shifts; ``None``: no shifts.
    """

    rotation: np.ndarray
    translation: np.ndarray
    shift_seed: int | None = None

    def shifts(self, atoms: Atoms) -> np.ndarray:
        """Integer lattice shifts (n_atoms, 3), zero along non-periodic directions."""
        if self.shift_seed is None or not np.any(atoms.pbc):
            return np.zeros((len(atoms), 3), dtype=int)
        S = np.random.default_rng(self.shift_seed).integers(-1, 2, size=(len(atoms), 3))
        return S * np.asarray(atoms.pbc, dtype=int)

    def apply(self, atoms: Atoms) -> Atoms:
        """A moved copy of ``atoms`` (same atom order)."""
        out = atoms.copy()
        cell = np.asarray(atoms.cell)
        pos = atoms.positions + self.shifts(atoms) @ cell
        out.positions = pos @ self.rotation.T + self.translation
        out.cell = cell @ self.rotation.T
        return out

    def order(self, n_atoms: int) -> np.ndarray:
        """Atom order of the moved copy: the identity."""
        return np.arange(n_atoms)


@dataclass(frozen=True)
class Permutation:
    """A relabelling of the atoms of any structure, drawn from ``seed``.

    Attributes
    ----------
    seed : int
    """

    seed: int
    rotation = np.eye(3)

    def order(self, n_atoms: int) -> np.ndarray:
        """Atom ``k`` of the permuted copy is atom ``order[k]`` of the original, (n_atoms,)."""
        return np.random.default_rng(self.seed).permutation(n_atoms)

    def apply(self, atoms: Atoms) -> Atoms:
        """A permuted copy of ``atoms``."""
        return atoms[self.order(len(atoms))]


def rigid_motions(*, translations=True, lattice_shifts=True):
    """Hypothesis strategy of :class:`RigidMotion`: uniform-ish rotations (normalised
    quaternions), translations in [-5, 5]³ Å and lattice-vector shifts of single atoms (which
    act on periodic directions only, so molecules are just rotated and translated).

    Parameters
    ----------
    translations : bool, default=True
    lattice_shifts : bool, default=True

    Returns
    -------
    strategy : hypothesis.strategies.SearchStrategy of RigidMotion
    """
    st = _hypothesis()
    unit = st.floats(-1.0, 1.0, allow_nan=False)
    quats = st.tuples(unit, unit, unit, unit).filter(lambda q: np.linalg.norm(q) > 0.1)
    moves = (st.tuples(*[st.floats(-5.0, 5.0, allow_nan=False)] * 3) if translations
             else st.just((0.0, 0.0, 0.0)))
    seeds = st.integers(0, 2 ** 32 - 1) if lattice_shifts else st.none()
    return st.builds(lambda q, t, s: RigidMotion(Rotation.from_quat(q).as_matrix(),
                                                 np.asarray(t, dtype=float), s),
                     quats, moves, seeds)


def permutations():
    """Hypothesis strategy of :class:`Permutation`: atom relabellings of any structure.

    Returns
    -------
    strategy : hypothesis.strategies.SearchStrategy of Permutation
    """
    st = _hypothesis()
    return st.builds(Permutation, st.integers(0, 2 ** 32 - 1))


def _random_motions(seed) -> list:
    """A rigid motion with lattice shifts, a permutation, and both (applied in that order)."""
    rng = np.random.default_rng(seed)
    rigid = RigidMotion(Rotation.random(random_state=rng.integers(2 ** 31)).as_matrix(),
                        rng.uniform(-3.0, 3.0, size=3), int(rng.integers(2 ** 31)))
    perm = Permutation(int(rng.integers(2 ** 31)))
    return [("rotation, translation and lattice shifts", rigid), ("permutation", perm),
            ("rigid motion and permutation", _Composed(rigid, perm))]


@dataclass(frozen=True)
class _Composed:
    first: RigidMotion
    second: Permutation

    @property
    def rotation(self):
        return self.first.rotation

    def apply(self, atoms):
        return self.second.apply(self.first.apply(atoms))

    def order(self, n_atoms):
        return self.second.order(n_atoms)

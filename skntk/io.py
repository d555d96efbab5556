"""Structure sources in, labels out: lists, extxyz files (streamed), ASE databases.

Only this module and :mod:`skntk.atoms` touch ``ase.Atoms``. A *source* is an ``ase.Atoms``, an
iterable of them, a path to a file ASE can read (extended XYZ, ASE trajectory, ...) or a path to an
ASE database (``.db``), or a glob pattern of such files. Labels are read from the attached
calculator (``SinglePointCalculator`` from an extxyz file) or from ``info``/``arrays`` under a
key such as ``REF_energy``/``REF_forces``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

import numpy as np
from ase import Atoms

logger = logging.getLogger(__name__)

#: Keys tried, in order, for labels stored in ``info`` / ``arrays`` (after the calculator).
ENERGY_KEYS = ("energy", "REF_energy", "dft_energy", "DFT_energy")
FORCES_KEYS = ("forces", "REF_forces", "dft_forces", "DFT_forces")


def iter_structures(source, index=":") -> Iterator[Atoms]:
    """Yield the structures of ``source`` one at a time (files are streamed with ``ase.io.iread``).

    Parameters
    ----------
    source : ase.Atoms, iterable of ase.Atoms, str or os.PathLike
        Structures, or a path to a file ASE can read, or to an ASE database (``*.db``), or a
        glob pattern (``"frames/*.extxyz"``: the matching files in sorted order).
    index : str or int or slice, default=":"
        Frames to read from a file (ASE's index syntax); ignored for in-memory sources.

    Yields
    ------
    atoms : ase.Atoms
    """
    if isinstance(source, Atoms):
        yield source
        return
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists() and isinstance(source, str) and any(c in source for c in "*?["):
            import glob

            files = sorted(glob.glob(source))
            if not files:
                raise FileNotFoundError(f"no structure file matches {source!r}.")
            for f in files:  # in sorted order, each streamed
                yield from iter_structures(f, index=index)
            return
        if not path.exists():
            raise FileNotFoundError(f"no structure file at {str(path)!r}.")
        if path.is_dir():
            raise IsADirectoryError(f"{str(path)!r} is a directory, not a structure file.")
        if path.suffix == ".db":
            import ase.db

            with ase.db.connect(path) as db:
                for row in db.select():
                    yield row.toatoms(add_additional_information=True)
            return
        import ase.io

        k = 0
        frames = ase.io.iread(path, index=index)
        while True:
            try:
                atoms = next(frames)
            except StopIteration:
                return
            except MemoryError:
                raise
            except Exception as err:  # a truncated or malformed file: name the file and frame
                raise ValueError(f"{path}: frame {k}: {type(err).__name__}: {err}") from err
            yield atoms
            k += 1
    if not isinstance(source, Iterable):
        raise TypeError(
            "expected ase.Atoms, an iterable of ase.Atoms or a path to a structure file; "
            f"got {type(source).__name__}."
        )
    for i, atoms in enumerate(source):
        if not isinstance(atoms, Atoms):
            raise TypeError(f"structure {i} is a {type(atoms).__name__}, not an ase.Atoms.")
        yield atoms


def structure_hash(atoms: Atoms) -> str:
    """Content hash of a structure: atomic numbers, positions, cell and pbc (nothing else).

    Two structures with the same hash are the same physical structure to every featuriser
    (labels, ``info`` and calculators are ignored); ``-0.0`` and ``0.0`` hash alike.

    Examples
    --------
    >>> from ase.build import molecule
    >>> a = molecule("H2O")
    >>> b = a.copy()
    >>> b.info["tag"] = "copy"
    >>> structure_hash(a) == structure_hash(b), structure_hash(a) == structure_hash(molecule("CH4"))
    (True, False)
    """
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(atoms.numbers, dtype=np.int64).tobytes())
    h.update((np.ascontiguousarray(atoms.positions, dtype=np.float64) + 0.0).tobytes())
    h.update((np.ascontiguousarray(atoms.cell.array, dtype=np.float64) + 0.0).tobytes())
    h.update(np.ascontiguousarray(atoms.pbc, dtype=bool).tobytes())
    return h.hexdigest()


#: Projections in a :func:`duplicate_signature` (more: fewer chance matches of different frames).
N_PROJECTIONS = 8

_WEIGHTS: dict[int, np.ndarray] = {}


def _weights(n_atoms: int) -> np.ndarray:
    """Fixed random weights of shape (N_PROJECTIONS, n_atoms, 3, 2), the same in every run."""
    w = _WEIGHTS.get(n_atoms)
    if w is None:
        w = np.random.default_rng([2027, n_atoms]).standard_normal(
            (N_PROJECTIONS, n_atoms, 3, 2))
        if len(_WEIGHTS) < 64:
            _WEIGHTS[n_atoms] = w
    return w


def duplicate_signature(atoms: Atoms) -> tuple[str, np.ndarray]:
    """What makes two frames duplicates: the same structure up to wrapping and translation.

    The one canonical form behind every duplicate check (:class:`DuplicateIndex`,
    :func:`unique_structures`, the pipeline, :func:`skntk.parallel.featurize`, ``skntk
    select``, the active-learning loop). Positions are taken relative to atom 0 (a global
    translation drops out) and expressed in the basis of the cell's periodic vectors, completed
    by orthonormal directions for the non-periodic ones. Each fractional coordinate ``c`` along a
    periodic direction enters as ``(sin 2πc, cos 2πc)`` — continuous and unchanged when an atom
    is wrapped or moved by a lattice vector — and each Cartesian one (Å) as itself; fixed random
    weights project them onto :data:`N_PROJECTIONS` numbers. Continuous projections compared
    within a tolerance (:class:`DuplicateIndex`) do not split copies that differ by rounding, as
    hashes of rounded coordinates do (an extended-XYZ round trip moves atoms by ~1e-8 Å).

    Parameters
    ----------
    atoms : ase.Atoms

    Returns
    -------
    exact : str
        ``"<n_atoms>:<hash>"`` of what must match exactly: atomic numbers (in atom order), cell
        (rounded to 1e-6 Å) and pbc.
    projections : ndarray of shape (N_PROJECTIONS,)
        Labels, ``info`` and calculators are ignored.
    """
    import hashlib

    pos = np.asarray(atoms.positions, dtype=np.float64)
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if not (np.isfinite(pos).all() and np.isfinite(cell).all()):  # a duplicate of nothing: the
        return f"{len(pos)}:non-finite:{id(atoms)}", np.zeros(N_PROJECTIONS)  # checks refuse it
    rel = pos - pos[:1] if len(pos) else pos
    feats = np.zeros((len(pos), 3, 2))
    if pbc.any():
        periodic = cell[pbc]
        _, _, vt = np.linalg.svd(periodic)
        basis = np.vstack([periodic, vt[len(periodic):]])  # + orthonormal non-periodic directions
        order = np.concatenate([np.flatnonzero(pbc), np.flatnonzero(~pbc)])
        coords = np.empty_like(rel)
        try:
            coords[:, order] = np.linalg.solve(basis.T, rel.T).T
        except np.linalg.LinAlgError:  # a singular cell: refused by the structure checks
            return f"{len(pos)}:singular:{id(atoms)}", np.zeros(N_PROJECTIONS)
    else:
        coords = rel
    angle = 2 * np.pi * coords[:, pbc]
    feats[:, pbc, 0], feats[:, pbc, 1] = np.sin(angle), np.cos(angle)
    feats[:, ~pbc, 0] = coords[:, ~pbc]
    projections = np.einsum("kndc,ndc->k", _weights(len(pos)), feats)
    h = hashlib.blake2b(digest_size=16, person=b"skntk-dup-1")
    h.update(np.ascontiguousarray(atoms.numbers, dtype=np.int64).tobytes())
    h.update((np.round(cell, 6) + 0.0).tobytes())
    h.update(np.ascontiguousarray(pbc).tobytes())
    return f"{len(pos)}:{h.hexdigest()}", projections


class DuplicateIndex:
    """Structures seen so far, found again up to wrapping and translation.

    Two structures are duplicates when their :func:`duplicate_signature` has the same exact part
    and projections that agree within ``tol · sqrt(6 n_atoms)`` (``tol`` = 2e-7: one atom moved
    by ~1e-6 Å in a small molecule, ~1e-5 Å in a 100-atom cell, is a different structure; float
    and extended-XYZ rounding, ~1e-8 Å, is not). Lookups are O(1): projections are bucketed by
    the first one, and the neighbouring buckets are searched too.

    Examples
    --------
    >>> from ase.build import bulk, molecule
    >>> a = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    >>> b = a.copy()
    >>> b.positions += [0.3, -1.2, 7.0]              # a global translation ...
    >>> b.positions[3] += a.cell[0] - 2 * a.cell[2]  # ... and one atom moved by lattice vectors
    >>> b.wrap()
    >>> index = DuplicateIndex()
    >>> index.add(a), index.add(molecule("CH4")), index.add(b), index.find(molecule("H2O"))
    (0, 1, 0, None)
    """

    tol = 2e-7

    def __init__(self):
        self._buckets: dict[tuple[str, int], list[tuple[np.ndarray, int]]] = {}
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def find(self, signature) -> int | None:
        """Index (in order of :meth:`add`) of a duplicate of ``signature`` (or an
        ``ase.Atoms``), or ``None``."""
        if isinstance(signature, Atoms):
            signature = duplicate_signature(signature)
        exact, proj, tol = self._parts(signature)
        q = self._quantum(tol)
        b = int(np.floor(proj[0] / q))
        for bb in (b - 1, b, b + 1):
            for other, k in self._buckets.get((exact, bb), ()):
                if np.all(np.abs(other - proj) <= tol):
                    return k
        return None

    def add(self, signature) -> int:
        """Index of the first duplicate of ``signature`` (or an ``ase.Atoms``); a new index when
        there is none (the structure is then remembered)."""
        if isinstance(signature, Atoms):
            signature = duplicate_signature(signature)
        k = self.find(signature)
        if k is not None:
            return k
        exact, proj, tol = self._parts(signature)
        b = int(np.floor(proj[0] / self._quantum(tol)))
        self._buckets.setdefault((exact, b), []).append((proj, self._n))
        self._n += 1
        return self._n - 1

    def _parts(self, signature):
        exact, proj = signature
        n_atoms = int(exact.split(":", 1)[0])
        return exact, np.asarray(proj, dtype=np.float64), self.tol * np.sqrt(6 * max(n_atoms, 1))

    @staticmethod
    def _quantum(tol) -> float:
        return max(1e-3, 4 * tol)


def unique_structures(structures) -> tuple[np.ndarray, np.ndarray]:
    """First occurrences of distinct structures (by :class:`DuplicateIndex`: copies up to
    wrapping and global translation are one structure).

    Parameters
    ----------
    structures : sequence of ase.Atoms of length n_structures

    Returns
    -------
    first : ndarray of int64 of shape (n_unique,)
        Increasing indices of the first copy of every distinct structure.
    inverse : ndarray of int64 of shape (n_structures,)
        ``structures[k]`` is a copy of ``structures[first[inverse[k]]]``.

    Examples
    --------
    >>> from ase.build import molecule
    >>> first, inverse = unique_structures([molecule("H2O"), molecule("CH4"), molecule("H2O")])
    >>> first.tolist(), inverse.tolist()
    ([0, 1], [0, 1, 0])
    """
    index = DuplicateIndex()
    first, inverse = [], []
    for k, atoms in enumerate(structures):
        j = index.add(atoms)
        if j == len(first):
            first.append(k)
        inverse.append(j)
    return np.asarray(first, dtype=np.int64), np.asarray(inverse, dtype=np.int64)


def read_structures(source, index=":") -> list[Atoms]:
    """All structures of ``source`` as a list (see :func:`iter_structures`).

    Examples
    --------
    >>> from ase.build import molecule
    >>> [a.get_chemical_formula() for a in read_structures([molecule("H2O"), molecule("CH4")])]
    ['H2O', 'CH4']
    """
    return list(iter_structures(source, index=index))


def _lookup(atoms: Atoms, prop: str, keys, key):
    keys = (key,) if key is not None else keys
    calc = atoms.calc
    if key is None and calc is not None and prop in getattr(calc, "results", {}):
        return calc.results[prop]
    store = atoms.info if prop == "energy" else atoms.arrays
    for k in keys:
        if k in store:
            return store[k]
    return None


def label_problem(atoms: Atoms, energy, forces, *, finite: bool = True) -> str | None:
    """What is wrong with one structure's label, or ``None`` when it can be used.

    The one check every label passes when it enters skntk (:func:`get_labels`, the oracles,
    :class:`~skntk.al.ActiveLearningLoop`, :func:`~skntk.metrics.evaluate`).

    Parameters
    ----------
    atoms : ase.Atoms
    energy : float
        Total energy in eV.
    forces : ndarray of shape (n_atoms, 3) or None
        Forces in eV/Å (``None``: no forces label, not a problem here).
    finite : bool, default=True
        Also refuse NaN/inf values (``False``: only the type and shape are checked).

    Returns
    -------
    problem : str or None
        A phrase to follow the structure's name, e.g. ``"has a non-finite energy label (nan
        eV)"``.

    Examples
    --------
    >>> import numpy as np
    >>> from ase.build import molecule
    >>> label_problem(molecule("H2O"), float("nan"), None)
    'has a non-finite energy label (nan eV)'
    >>> label_problem(molecule("H2O"), -14.0, np.zeros((2, 3)))
    'has forces of shape (2, 3); expected (3, 3)'
    >>> label_problem(molecule("H2O"), -14.0, np.zeros((3, 3))) is None
    True
    """
    e = np.asarray(energy)
    if e.size != 1 or not np.issubdtype(e.dtype, np.number) or np.iscomplexobj(e):
        return f"has an energy label that is not one real number ({energy!r})"
    e = float(e.reshape(()))
    if finite and not np.isfinite(e):
        return f"has a non-finite energy label ({e} eV)"
    if forces is None:
        return None
    try:
        f = np.asarray(forces, dtype=float)
    except (TypeError, ValueError):
        return f"has a forces label that is not an array of numbers ({type(forces).__name__})"
    if f.shape != (len(atoms), 3):
        return f"has forces of shape {f.shape}; expected ({len(atoms)}, 3)"
    if finite and not np.all(np.isfinite(f)):
        k = int(np.flatnonzero(~np.isfinite(f).all(axis=1))[0])
        return f"has non-finite forces at atom {k} ({f[k].tolist()} eV/Å)"
    return None


def _label(atoms: Atoms, i: int, name: str) -> str:
    """How errors name a structure: ``X[4] (C2H6O)`` (0-based index and formula)."""
    formula = atoms.get_chemical_formula() if len(atoms) else "empty"
    return f"{name}[{i}] ({formula})"


def _label_error(atoms: Atoms, i: int, name: str, problem: str) -> str:

    tail = "; labels must be finite numbers: fix or drop this structure." if "non-finite" in \
        problem else "."
    return f"{_label(atoms, i, name)} {problem}{tail}"


def get_labels(structures, *, energy_key=None, forces_key=None, require_forces=False,
               name: str = "X", finite: bool = True):
    """Energies and forces stored with ``structures``, checked by :func:`label_problem`.

    Parameters
    ----------
    structures : list of ase.Atoms of length n_structures
    energy_key, forces_key : str or None, default=None
        Key in ``atoms.info`` / ``atoms.arrays``; ``None`` tries the calculator, then
        :data:`ENERGY_KEYS` / :data:`FORCES_KEYS`.
    require_forces : bool, default=False
        Raise when a structure has no forces (else its entry is None).
    name : str, default="X"
        Name of the structures in error messages (``X[4] (C2H6O) ...``).
    finite : bool, default=True
        Refuse NaN/inf energies and forces (``False``: return them, e.g. for
        :func:`~skntk.metrics.evaluate` to skip those structures).

    Returns
    -------
    energies : ndarray of shape (n_structures,)
        Total energies in eV.
    forces : list of (ndarray of shape (n_atoms_i, 3) or None)
        Forces in eV/Å.

    Raises
    ------
    ValueError
        Naming the structure (``X[i] (formula)``): no energy label, no forces label with
        ``require_forces``, forces of the wrong shape, a non-finite energy or force.
    """

    energies, forces = [], []
    for i, atoms in enumerate(structures):
        e = _lookup(atoms, "energy", ENERGY_KEYS, energy_key)
        if e is None:
            raise ValueError(
                f"{_label(atoms, i, name)} has no energy label "
                f"(looked in its calculator and info keys "
                f"{[energy_key] if energy_key else list(ENERGY_KEYS)})."
            )
        f = _lookup(atoms, "forces", FORCES_KEYS, forces_key)
        if f is None and require_forces:
            raise ValueError(f"{_label(atoms, i, name)} has no forces label.")
        problem = label_problem(atoms, e, f, finite=finite)
        if problem is not None:
            raise ValueError(_label_error(atoms, i, name, problem))
        energies.append(float(np.asarray(e).reshape(())))
        forces.append(None if f is None else np.asarray(f, dtype=float))
    return np.asarray(energies, dtype=float), forces


def example_path(name: str = "oc20_demo.extxyz") -> Path:
    """Path of a data file bundled with skntk (``skntk/data``).

    ``oc20_demo.extxyz`` holds OC20 S2EF relaxation frames (CC-BY-4.0, Chanussot et al. 2021),
    with ``sid`` and ``frame`` in ``info`` and RPBE energies/forces.
    """
    path = resources.files("skntk") / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"no bundled data file {name!r} in skntk/data.")
    return Path(str(path))


def split_by(structures, key: str, groups) -> tuple[list[int], list[int]]:
    """Indices of structures whose ``info[key]`` is in ``groups`` and of the rest.

    Use it to split correlated frames (one relaxation = one ``sid``) without leakage.
    """
    groups = set(groups)
    inside, outside = [], []
    for i, atoms in enumerate(structures):
        if key not in atoms.info:
            raise KeyError(f"structure {i} has no info[{key!r}] to split on.")
        (inside if atoms.info[key] in groups else outside).append(i)
    return inside, outside


def free_atoms(atoms: Atoms) -> np.ndarray:
    """Mask of the atoms whose forces count, shape (n_atoms,) bool.

    An atom is fixed when OC20's ``fixed`` array marks it (1 = held fixed in DFT) or an ASE
    :class:`~ase.constraints.FixAtoms` constraint holds it; every other atom is free.

    Examples
    --------
    >>> from ase.build import molecule
    >>> from ase.constraints import FixAtoms
    >>> water = molecule("H2O")
    >>> water.set_constraint(FixAtoms(indices=[0]))
    >>> free_atoms(water).tolist()
    [False, True, True]
    """
    from ase.constraints import FixAtoms

    free = np.ones(len(atoms), dtype=bool)
    if "fixed" in atoms.arrays:
        free &= np.asarray(atoms.arrays["fixed"]).reshape(len(atoms)) == 0
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            free[c.get_indices()] = False
    return free

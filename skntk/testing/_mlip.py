"""Property tests of the invariants of structure featurisers and MLIP handles.

For users who build pipelines with their own featurisers or models, and for skntk's own tests.
Like scikit-learn's ``check_estimator``, each ``check_*`` function runs a list of invariants and
raises an ``AssertionError`` whose message names the invariant that failed and the structures it
failed on (``X[i] (formula)``).

- :func:`check_featurizer`: rotation / translation / lattice-shift / permutation invariance of the
  structure kernel ``K(A, B) = G_A G_Bᵀ`` (through its singular values, since force rows rotate
  with the frame; exactly for single rows), row equivariance for per-atom layouts, PSD Gram
  matrices across separate ``transform`` calls, determinism for a fixed ``random_state``,
  clone / ``get_params`` round trip, clear errors for empty input and unknown elements.
- :func:`check_mlip`: the backend contract of :class:`skntk.models.base.MLIP` — offsets, shapes,
  batching, agreement with a reference ASE calculator and with the handle's own calculator,
  ``F = -∂E/∂R``, ``∂E/∂θ`` and ``∂F/∂θ`` by central finite differences, rotation invariance,
  embeddings, parameter subsets, copies, the unknown-element error and the module's state
  (train/eval modes, ``requires_grad`` flags, parameter values) restored after every call.
- Hypothesis strategies (need the ``test`` extra, ``pip install skntk[test]``): :func:`atoms`
  (molecules and periodic cells, orthorhombic or triclinic, mixed pbc, atoms never closer than a
  bound), :func:`rigid_motions` and :func:`permutations`, whose values ``apply`` to any
  ``ase.Atoms``.

Structures are small on purpose (a few atoms): every check runs in seconds on the CPU.

Examples
--------
>>> import torch
>>> from skntk.models.builtin import BuiltinMLIP
>>> from skntk.testing import check_featurizer, check_mlip
>>> from skntk.transformers import ForceNTKTransformer
>>> model = BuiltinMLIP([1, 6, 8], cutoff=3.0, n_hidden=8, n_blocks=1, dtype=torch.float64)
>>> check_mlip(model)
>>> check_featurizer(ForceNTKTransformer(model, kind="joint", n_features=16))
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols
from scipy.spatial.transform import Rotation

from skntk.atoms import neighbor_pairs

__all__ = ["atoms", "rigid_motions", "permutations", "RigidMotion", "Permutation",
           "random_structures", "tiny_structures", "check_featurizer", "check_mlip",
           "parameter_derivatives", "energy_gradients", "force_vjp"]


def _hypothesis():
    try:
        import hypothesis.strategies as st
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("skntk.testing's strategies need hypothesis: pip install skntk[test]"
                          ) from err
    return st


# -- structures and motions ----------------------------------------------------------------------
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


# -- helpers -------------------------------------------------------------------------------------
def _label(X, idx) -> str:
    idx = [idx] if np.isscalar(idx) else list(idx)
    return ", ".join(f"X[{i}] ({X[i].get_chemical_formula() or 'empty'})" for i in idx)


@contextlib.contextmanager
def _invariant(who: str, name: str, where: str = ""):
    """Re-raise any AssertionError inside as one naming the invariant and the structures."""
    try:
        yield
    except AssertionError as err:
        detail = str(err).strip()
        raise AssertionError(f"{who} fails the invariant '{name}'"
                             + (f" on {where}" if where else "") + f":\n{detail}") from None


def _species_of(obj):
    for attr in ("model_", "model"):
        model = getattr(obj, attr, None)
        if model is not None and hasattr(model, "species"):
            return model.species
    return getattr(obj, "species", None)


def _pick_species(species) -> list[int]:
    if not species:
        return [1, 6, 8]
    species = sorted(species)
    preferred = [z for z in (1, 6, 8) if z in species]
    return preferred if len(preferred) >= 2 else species[:3]


def _unknown_z(species) -> int | None:
    if species is None:
        return None
    for z in (79, 84, 95, 7, 118, *range(1, 119)):
        if z not in species:
            return z
    return None


def _blocks(G, n: int):
    """(list of per-structure row blocks as float64 arrays, layout kind) of a transform output."""
    from skntk.blocks import FeatureBlocks

    if isinstance(G, FeatureBlocks):
        assert len(G) == n, f"{len(G)} blocks for {n} structures"
        return [np.asarray(G.rows[G.offsets[i]:G.offsets[i + 1]], dtype=np.float64)
                for i in range(n)], G.kind
    arr = np.asarray(G)
    assert arr.ndim == 2 and arr.shape[0] == n, (
        f"transform returned shape {arr.shape}; expected FeatureBlocks or (n_structures={n}, "
        f"n_features)")
    return [arr[i:i + 1].astype(np.float64) for i in range(n)], "plain"


def _energy_and_forces(model, X):
    e, f = model.energy_and_forces(model.collate(X, "cpu"))
    return e.detach().to("cpu", torch.float64).numpy(), f.detach().to("cpu", torch.float64).numpy()


# -- check_featurizer ----------------------------------------------------------------------------
def check_featurizer(featurizer, structures=None, *, random_state=0, rtol=1e-6,
                     exact_params="auto", probe_sigmas=5.0, unknown_element="auto",
                     n_motions=1):
    """Check the invariants every structure featuriser should have; raise on the first failure.

    The featuriser is a scikit-learn transformer from ``list[ase.Atoms]`` to per-structure row
    blocks ``G_x`` (:class:`skntk.blocks.FeatureBlocks`, or a 2-D array: one row per structure).
    It is cloned, fitted on ``structures`` and checked for:

    1. ``clone / get_params round trip``: the clone has the same class and parameters (the same
       objects: a model handle is not copied) and ``set_params`` accepts them back;
    2. ``one finite block per structure``;
    3. ``deterministic for a fixed random_state``: two fresh clones give the same rows;
    4. ``PSD Gram across calls``: the Gram matrix between the rows of each structure featurised
       alone and the rows of all of them featurised together is symmetric positive semi-definite
       (it is what a selector forms between train and pool features, from separate calls);
    5. ``kernel invariant under <motion>`` for rigid motions (rotation, translation, lattice-vector
       shifts of single atoms in periodic cells) and atom permutations: the singular values of
       ``K(A, B') = G_A G_B'ᵀ`` equal those of ``G_A G_Bᵀ`` for every pair of structures (the
       force block rotates with the frame, so the matrix itself is compared only up to that
       rotation), and single-row blocks (and the energy row of joint blocks) are compared
       exactly;
    6. ``rows equivariant under <motion>`` where the layout is per atom (``kind="force"`` or
       ``"joint"``): the force rows of the moved structure are ``Q`` times the permuted rows;
    7. ``probe rows unbiased`` for stochastic force rows (see ``exact_params``);
    8. ``error on empty input`` (a ``ValueError``) and ``error on unknown element`` (a
       ``ValueError`` naming the element and the structure, ``X[1]``).

    Parameters
    ----------
    featurizer : estimator
        An unfitted or fitted transformer with ``get_params``; never modified.
    structures : list of ase.Atoms or None, default=None
        Structures to check on; ``None`` generates three small ones (:func:`random_structures`:
        a molecule, an orthorhombic and a triclinic mixed-pbc cell) from the elements of the
        featuriser's ``model`` (``species``), or H, C, O.
    random_state : int, default=0
        Set as the featuriser's ``random_state`` when it has one; also seeds the motions.
    rtol : float, default=1e-6
        Tolerance relative to the largest kernel entry (use ~1e-4 for float32 models).
    exact_params : dict, "auto" or None, default="auto"
        Parameters that switch a stochastic featuriser to its exact route. Invariants 5–6 are
        checked on ``clone(featurizer).set_params(**exact_params)`` and the stochastic rows are
        checked in expectation (7): for each structure, the squared Frobenius norm of its rows
        (a Hutchinson estimate of the exact rows' one) must lie within ``probe_sigmas`` standard
        deviations of the exact value, the standard deviation computed from the exact rows and
        the ``n_probes`` parameter. ``"auto"``: ``{"force_rows": "exact"}`` when the fitted
        featuriser has ``force_rows_ == "probes"`` and a ``kind`` other than ``"energy"``
        (:class:`skntk.transformers.ForceNTKTransformer`); ``None``: check the rows as they are.
    probe_sigmas : float, default=5.0
        Tolerance of the expectation check, in standard deviations.
    unknown_element : int, "auto" or None, default="auto"
        Atomic number the featuriser must refuse; ``"auto"``: one outside its model's
        ``species`` (skipped when unknown); ``None``: skip.
    n_motions : int, default=1
        Sets of random motions (each: a rigid motion, a permutation and both).

    Raises
    ------
    AssertionError
        ``"<featuriser> fails the invariant '<name>' on X[i] (formula), ...: <detail>"``.

    Examples
    --------
    >>> import torch
    >>> from skntk.models.builtin import BuiltinMLIP
    >>> from skntk.transformers import EmbeddingTransformer
    >>> model = BuiltinMLIP([1, 6, 8], cutoff=3.0, n_hidden=8, n_blocks=1, dtype=torch.float64)
    >>> check_featurizer(EmbeddingTransformer(model))
    """
    from sklearn.base import clone

    who = type(featurizer).__name__
    params = featurizer.get_params(deep=False)
    with _invariant(who, "clone / get_params round trip"):
        try:
            twin = clone(featurizer)
        except Exception as err:
            raise AssertionError(f"clone raised {type(err).__name__}: {err}") from None
        assert type(twin) is type(featurizer), f"clone is a {type(twin).__name__}"
        back = twin.get_params(deep=False)
        assert back.keys() == params.keys(), f"parameters {sorted(back)} != {sorted(params)}"
        for k, v in params.items():
            w = back[k]
            same = w is v or (type(w) is type(v) and _equal(w, v))
            assert same, f"parameter {k!r}: {w!r} after clone, {v!r} before"
        twin.set_params(**params)

    def fresh(**extra):
        est = clone(featurizer)
        if "random_state" in params:
            est.set_params(random_state=random_state)
        return est.set_params(**extra) if extra else est

    X = (list(structures) if structures is not None
         else random_structures(_pick_species(_species_of(featurizer)), random_state=random_state))
    n = len(X)
    all_x = _label(X, range(n))
    est = fresh().fit(X)
    with _invariant(who, "one finite block per structure", all_x):
        G, kind = _blocks(est.transform(X), n)
        for i, g in enumerate(G):
            assert g.ndim == 2 and g.shape[0] >= 1, f"X[{i}] has rows of shape {g.shape}"
            assert np.all(np.isfinite(g)), f"X[{i}] has non-finite rows"
    rows = np.concatenate(G)
    scale = max(float(np.abs(rows @ rows.T).max()), 1e-300)
    atol = rtol * scale

    with _invariant(who, "deterministic for a fixed random_state", all_x):
        G2, _ = _blocks(fresh().fit(X).transform(X), n)
        for i in range(n):
            np.testing.assert_allclose(G2[i], G[i], rtol=1e-10, atol=1e-10 * np.sqrt(scale),
                                       err_msg=f"X[{i}]: rows differ between two fits")

    with _invariant(who, "PSD Gram across calls", all_x):
        alone = np.concatenate([_blocks(est.transform([x]), 1)[0][0] for x in X])
        assert alone.shape == rows.shape, (f"rows featurised one by one have shape "
                                           f"{alone.shape}, together {rows.shape}")
        K = alone @ rows.T
        asym = float(np.abs(K - K.T).max())
        assert asym <= atol, f"Gram matrix not symmetric: max |K - Kᵀ| = {asym:.3g} > {atol:.3g}"
        low = float(np.linalg.eigvalsh(0.5 * (K + K.T)).min())
        assert low >= -atol * len(K), f"Gram matrix has eigenvalue {low:.3g} < 0"

    # stochastic rows: invariants on the exact route, the stochastic rows in expectation
    if exact_params == "auto":
        exact_params = None
        if (getattr(est, "force_rows_", None) == "probes"
                and getattr(est, "kind", "energy") != "energy"):
            exact_params = {"force_rows": "exact"}
    exact = fresh(**exact_params).fit(X) if exact_params else est
    G_exact = _blocks(exact.transform(X), n)[0] if exact_params else G
    kind_exact = _blocks(exact.transform(X[:1]), 1)[1] if exact_params else kind

    if exact_params and "n_probes" in params:
        _check_probes(who, est, X, G_exact, kind_exact, params["n_probes"], probe_sigmas, all_x)
    motions = [m for k in range(n_motions) for m in _random_motions(random_state + k)]
    for name, motion in motions:
        Xm = [motion.apply(x) for x in X]
        Gm, _ = _blocks(exact.transform(Xm), n)
        with _invariant(who, f"kernel invariant under {name}", all_x):
            for a in range(n):
                for b in range(n):
                    k0, k1 = G_exact[a] @ G_exact[b].T, G_exact[a] @ Gm[b].T
                    s0 = np.linalg.svd(k0, compute_uv=False)
                    s1 = np.linalg.svd(k1, compute_uv=False)
                    np.testing.assert_allclose(
                        s1, s0, rtol=0, atol=atol,
                        err_msg=f"singular values of K(X[{a}], moved X[{b}])")
                    if kind_exact == "joint" or (G_exact[a].shape[0] == 1
                                                 and G_exact[b].shape[0] == 1):
                        np.testing.assert_allclose(
                            k1[0, 0], k0[0, 0], rtol=0, atol=atol,
                            err_msg=f"first-row kernel of X[{a}] and moved X[{b}]")
        if kind_exact in ("force", "joint"):
            with _invariant(who, f"rows equivariant under {name}", all_x):
                for b in range(n):
                    m = len(X[b])
                    off = 1 if kind_exact == "joint" else 0
                    f0 = G_exact[b][off:].reshape(m, 3, -1)[motion.order(m)]
                    f1 = Gm[b][off:].reshape(m, 3, -1)
                    expected = np.einsum("ab,nbd->nad", motion.rotation, f0)
                    np.testing.assert_allclose(
                        f1, expected, rtol=0, atol=rtol * np.sqrt(scale),
                        err_msg=f"force rows of moved X[{b}] vs Q times the permuted rows")

        if exact_params and "n_probes" in params:
            _check_probes(who, est, Xm, Gm, kind_exact, params["n_probes"], probe_sigmas,
                          f"{all_x} moved by {name}")

    with _invariant(who, "error on empty input"):
        try:
            est.transform([])
        except ValueError as err:
            assert str(err), "the ValueError has no message"
        else:
            raise AssertionError("transform([]) returned instead of raising a ValueError")

    if unknown_element == "auto":
        unknown_element = _unknown_z(_species_of(est))
    if unknown_element is not None:
        bad = _bad_structure(unknown_element, _species_of(est))
        with _invariant(who, "error on unknown element", f"X[1] ({bad.get_chemical_formula()})"):
            _expect_named_error(lambda: est.transform([X[0], bad]), unknown_element)


def _check_probes(who, est, X, G_exact, kind, n_probes, sigmas, where):
    """Squared norms of probe rows are Hutchinson estimates of the exact rows' ones."""
    G_p, _ = _blocks(est.transform(X), len(X))
    with _invariant(who, f"probe rows unbiased (within {sigmas:g} standard deviations)", where):
        for i, (gp, ge) in enumerate(zip(G_p, G_exact, strict=True)):
            off = 1 if kind == "joint" else 0
            F = ge[off:]
            M = F @ F.T
            sd = np.sqrt(2.0 * (np.sum(M ** 2) - np.sum(np.diag(M) ** 2)) / n_probes)
            est_tr = float(np.sum(gp[off:] ** 2))
            exact_tr = float(np.trace(M))
            assert abs(est_tr - exact_tr) <= sigmas * sd + 1e-9 * exact_tr, (
                f"X[{i}]: probe estimate {est_tr:.6g} of tr(G Gᵀ) = {exact_tr:.6g} is "
                f"{abs(est_tr - exact_tr) / max(sd, 1e-300):.1f} standard deviations off "
                f"(sd {sd:.3g}, {n_probes} probes)")


def _equal(a, b) -> bool:
    try:
        out = a == b
        return bool(np.all(out))
    except Exception:
        return False


def _bad_structure(z, species) -> Atoms:
    good = min(species) if species else 1
    return Atoms(numbers=[good, z], positions=[[0.0, 0.0, 0.0], [0.0, 0.0, 1.5]])


def _expect_named_error(call, z):
    symbol = chemical_symbols[z]
    try:
        call()
    except ValueError as err:
        msg = str(err)
        assert symbol in msg, f"the ValueError does not name the element {symbol}: {msg!r}"
        assert "[1]" in msg, f"the ValueError does not name the structure X[1]: {msg!r}"
    else:
        raise AssertionError(f"a structure with {symbol} (Z={z}) was accepted")


# -- check_mlip ----------------------------------------------------------------------------------
def _module_state(module):
    return ({n: m.training for n, m in module.named_modules()},
            {n: (p.requires_grad, p.dtype, p.device, p.detach().clone())
             for n, p in module.named_parameters()})


def _assert_state(module, before, after_what):
    modes, params = _module_state(module)
    changed = [n or "<root>" for n, t in modes.items() if before[0].get(n) != t]
    assert not changed, (f"{after_what} left train/eval mode changed in {changed[:5]} "
                         f"(module.training was {before[0].get('')}, is {modes.get('')})")
    for n, (rg, dt, dev, val) in params.items():
        rg0, dt0, dev0, val0 = before[1][n]
        assert (rg, dt, dev) == (rg0, dt0, dev0), (
            f"{after_what} changed parameter {n}: requires_grad/dtype/device "
            f"{(rg0, dt0, dev0)} -> {(rg, dt, dev)}")
        assert torch.equal(val, val0), f"{after_what} changed the values of parameter {n}"


def _flat_grad(output, params, create_graph=False):
    """d(output)/dθ flattened over ``params`` (zeros for unused parameters), shape (P,)."""
    grads = torch.autograd.grad(output, params, retain_graph=True, allow_unused=True,
                                create_graph=create_graph)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for g, p in zip(grads, params, strict=True)])


@contextlib.contextmanager
def _grad_enabled(params):
    """``requires_grad`` on ``params`` inside the block, restored after."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


def parameter_derivatives(model, X, subset, *, n_directions=2, eps=1e-3, seed=0):
    """Autograd and central finite-difference derivatives of the energies and forces along random
    parameter directions.

    For random unit directions ``v`` in the subset and random weights ``w`` (energies) and ``W``
    (forces), the autograd values ``w·(∂E/∂θ)v`` and ``Σ W∘(∂F/∂θ)v`` and the same from
    ``(E(θ+εv) - E(θ-εv)) / 2ε``, with ``ε = eps`` times the RMS of the subset's parameters.
    The parameters are put back (bit for bit) after each step.

    Parameters
    ----------
    model : MLIP
    X : list of ase.Atoms
    subset : str or list of str
        As for :meth:`skntk.models.base.MLIP.parameters`.
    n_directions : int, default=2
    eps : float, default=1e-3
    seed : int, default=0

    Returns
    -------
    auto, fd : ndarray of shape (n_directions, 2)
        Columns: energy (eV per unit θ), forces (eV/Å per unit θ).
    """
    rng = np.random.default_rng(seed)
    params = [p for _, p in model.parameters(subset)]
    with _grad_enabled(params):
        batch = model.collate(X, "cpu")
        energy, forces = model.energy_and_forces(batch, create_graph=True)
        w = torch.as_tensor(rng.standard_normal(energy.shape), dtype=energy.dtype)
        W = torch.as_tensor(rng.standard_normal(forces.shape), dtype=forces.dtype)
        gE = _flat_grad((energy * w).sum(), params).double().cpu()
        gF = _flat_grad((forces * W).sum(), params).double().cpu()
        del energy, forces
    theta = torch.cat([p.detach().reshape(-1).cpu() for p in params]).double()
    step = eps * float(theta.pow(2).mean().sqrt())
    auto, fd = [], []
    for _ in range(n_directions):
        v = torch.as_tensor(rng.standard_normal(theta.numel()))
        v /= v.norm()
        auto.append([float(gE @ v), float(gF @ v)])
        vals = []
        for sign in (1.0, -1.0):
            saved = [p.detach().clone() for p in params]
            try:
                with torch.no_grad():
                    off = 0
                    for p in params:
                        k = p.numel()
                        p.add_((sign * step * v[off:off + k]).reshape(p.shape).to(p))
                        off += k
                e, f = _energy_and_forces(model, X)
                vals.append([float((e * w.double().numpy()).sum()),
                             float((f * W.double().numpy()).sum())])
            finally:
                with torch.no_grad():
                    for p, s in zip(params, saved, strict=True):
                        p.copy_(s)
        fd.append([(vals[0][k] - vals[1][k]) / (2 * step) for k in range(2)])
    return np.array(auto), np.array(fd)


def energy_gradients(model, X, subset="readout") -> np.ndarray:
    """Energy NTK rows ``∂E/∂θ`` (unsketched) of each structure, ndarray (n_structures, P),
    float64."""
    params = [p for _, p in model.parameters(subset)]
    with _grad_enabled(params):
        energy = model.energy_and_forces(model.collate(X, "cpu"), create_graph=True)[0]
        return np.stack([_flat_grad(e, params).double().cpu().numpy() for e in energy])


def force_vjp(model, atoms_, subset, weights) -> np.ndarray:
    """``Σ_i weights_i · ∂F_i/∂θ`` for one structure, ndarray (P,), float64."""
    params = [p for _, p in model.parameters(subset)]
    with _grad_enabled(params):
        _, forces = model.energy_and_forces(model.collate([atoms_], "cpu"), create_graph=True)
        W = torch.as_tensor(weights, dtype=forces.dtype)
        return _flat_grad((forces * W).sum(), params).double().cpu().numpy()


def _model_dtype(model):
    p = next(iter(model.module.parameters()), None)
    return torch.float64 if p is None else p.dtype


def check_mlip(handle, structures=None, *, reference=None, subsets=("readout",), eps=None,
               rtol=None, fd_rtol=None, unknown_element="auto", random_state=0):
    """Check the MLIP backend contract of a handle; raise on the first failure.

    Checks (the name of each appears in its failure message):

    1. ``state restored after <call>``: ``collate``, ``energy_and_forces`` (with and without
       ``create_graph``), ``embeddings``, the calculator and every other check leave the
       module's train/eval modes, ``requires_grad`` flags, dtypes, devices and parameter values
       as they were;
    2. ``collate offsets``: ``batch.ptr`` holds the atom offsets;
    3. ``energies and forces shape``: (n_structures,) and (n_atoms, 3), finite;
    4. ``energy() equals energy_and_forces()``, when the handle overrides ``energy``;
    5. ``batch equals separate``: energies and forces of the batch equal those of each structure
       alone;
    6. ``translation invariance: no net force``: ``Σ_i F_i = 0`` for every structure;
    7. ``matches reference calculator`` (when ``reference`` is given) and ``matches own ASE
       calculator`` (:meth:`~skntk.models.base.MLIP.calculator`);
    8. ``forces = -dE/dR (finite differences)`` along a random displacement of each structure;
    9. ``dE/dtheta and dF/dtheta (finite differences)`` for each subset;
    10. ``rotation invariance``: energies invariant and forces rotating under a rigid motion with
       a permutation, the energy-gradient kernel ``G_E G_Eᵀ`` invariant, and
       ``Σ_i (Q w_i)·∂F_i(QR)/∂θ = Σ_i w_i·∂F_i(R)/∂θ``;
    11. ``embeddings shape and invariance`` (when ``"embeddings"`` is implemented);
    12. ``parameter subsets``: every declared subset and ``"default"`` resolve to distinct
        parameters of the module, an unknown name raises ``ValueError``;
    13. ``copy is independent``;
    14. ``error on unknown element``: ``collate`` raises a ``ValueError`` naming the element and
        the structure (``X[1]``).

    Parameters
    ----------
    handle : MLIP
        The model handle (:class:`skntk.models.base.MLIP`); its parameters are moved by tiny steps
        for the finite differences and put back exactly.
    structures : list of ase.Atoms or None, default=None
        Small structures (a few atoms) to check on; ``None`` generates three
        (:func:`random_structures`) from the handle's ``species``.
    reference : ase Calculator, callable or None, default=None
        The backend's own ASE calculator, or a callable ``atoms -> (energy, forces)`` (eV, eV/Å,
        shapes () and (n_atoms, 3)) for structures the calculator needs prepared.
    subsets : sequence or mapping, default=("readout",)
        Parameter subsets for the ∂θ finite differences: names or tuples of fnmatch patterns, or
        a mapping from those to the relative step ``eps`` of each.
    eps : float or None, default=None
        Relative parameter step (``None``: 1e-4 for float64 models, 1e-2 for float32).
    rtol : float or None, default=None
        Tolerance of exact identities (calculators, batching, rotations) relative to the largest
        value compared (``None``: 1e-7 for float64 models, 2e-4 for float32).
    fd_rtol : float or None, default=None
        Tolerance of finite differences (``None``: 1e-5 for float64, 2e-2 for float32).
    unknown_element : int, "auto" or None, default="auto"
        Atomic number ``collate`` must refuse (``"auto"``: one outside ``species``).
    random_state : int, default=0
        Seeds the directions, weights and motions.

    Raises
    ------
    AssertionError
        ``"<handle> fails the invariant '<name>' on X[i] (formula), ...: <detail>"``.

    Examples
    --------
    >>> import torch
    >>> from skntk.models.builtin import BuiltinMLIP
    >>> check_mlip(BuiltinMLIP([1, 8], cutoff=3.0, n_hidden=8, n_blocks=1, dtype=torch.float64))
    """
    who = type(handle).__name__
    module = handle.module
    single = _model_dtype(handle) == torch.float32
    rtol = rtol if rtol is not None else (2e-4 if single else 1e-7)
    fd_rtol = fd_rtol if fd_rtol is not None else (2e-2 if single else 1e-5)
    eps = eps if eps is not None else (1e-2 if single else 1e-4)
    steps = dict(subsets) if isinstance(subsets, Mapping) else {s: None for s in subsets}
    X = (list(structures) if structures is not None
         else random_structures(_pick_species(handle.species), random_state=random_state))
    n = len(X)
    all_x = _label(X, range(n))
    rng = np.random.default_rng(random_state)
    state = _module_state(module)

    def restored(after):
        with _invariant(who, f"state restored after {after}", all_x):
            _assert_state(module, state, after)

    batch = handle.collate(X, "cpu")
    restored("collate")
    with _invariant(who, "collate offsets", all_x):
        ptr = np.asarray(batch.ptr.cpu())
        np.testing.assert_array_equal(ptr, np.cumsum([0] + [len(a) for a in X]))
    e_t, f_t = handle.energy_and_forces(batch)
    restored("energy_and_forces(create_graph=False)")
    with _invariant(who, "energies and forces shape", all_x):
        assert tuple(e_t.shape) == (n,), f"energies have shape {tuple(e_t.shape)}"
        assert tuple(f_t.shape) == (ptr[-1], 3), f"forces have shape {tuple(f_t.shape)}"
    E = e_t.detach().to("cpu", torch.float64).numpy()
    F = f_t.detach().to("cpu", torch.float64).numpy()
    with _invariant(who, "energies and forces shape", all_x):
        assert np.all(np.isfinite(E)) and np.all(np.isfinite(F)), "non-finite outputs"
    e_scale = max(float(np.abs(E).max()), 1.0)
    f_scale = max(float(np.abs(F).max()), 1e-3)
    e2, f2 = handle.energy_and_forces(handle.collate(X, "cpu"), create_graph=True)
    restored("energy_and_forces(create_graph=True)")
    with _invariant(who, "energies and forces shape", all_x):
        np.testing.assert_allclose(e2.detach().double().cpu().numpy(), E, rtol=rtol,
                                   atol=rtol * e_scale, err_msg="create_graph=True energies")
        del e2, f2
    from skntk.models.base import MLIP

    if type(handle).energy is not MLIP.energy:
        e3 = handle.energy(handle.collate(X, "cpu")).detach().double().cpu().numpy()
        restored("energy")
        with _invariant(who, "energy() equals energy_and_forces()", all_x):
            np.testing.assert_allclose(e3, E, rtol=rtol, atol=rtol * e_scale)

    ptr_list = ptr.tolist()
    with _invariant(who, "batch equals separate", all_x):
        for i, a in enumerate(X):
            e, f = _energy_and_forces(handle, [a])
            np.testing.assert_allclose(e[0], E[i], rtol=rtol, atol=rtol * e_scale,
                                       err_msg=f"energy of X[{i}]")
            np.testing.assert_allclose(f, F[ptr_list[i]:ptr_list[i + 1]], rtol=rtol,
                                       atol=rtol * f_scale, err_msg=f"forces of X[{i}]")

    def compare(name, get):
        with _invariant(who, name, all_x):
            for i, a in enumerate(X):
                e, f = get(a)
                np.testing.assert_allclose(e, E[i], rtol=rtol, atol=rtol * e_scale + 1e-12,
                                           err_msg=f"energy of X[{i}]")
                np.testing.assert_allclose(np.asarray(f), F[ptr_list[i]:ptr_list[i + 1]],
                                           rtol=0, atol=rtol * f_scale * 10 + 1e-12,
                                           err_msg=f"forces of X[{i}]")

    if reference is not None:
        def ref(a):
            if callable(reference) and not hasattr(reference, "get_potential_energy"):
                return reference(a)
            a = a.copy()
            a.calc = reference
            return a.get_potential_energy(), a.get_forces()

        compare("matches reference calculator", ref)

    def own(a):
        a = a.copy()
        a.calc = handle.calculator()
        return a.get_potential_energy(), a.get_forces()

    compare("matches own ASE calculator", own)
    restored("calculator")

    with _invariant(who, "translation invariance: no net force", all_x):
        for i, a in enumerate(X):
            net = F[ptr_list[i]:ptr_list[i + 1]].sum(axis=0)
            assert np.abs(net).max() <= 10 * rtol * f_scale * len(a) + 1e-12, (
                f"X[{i}]: Σ_i F_i = {net.tolist()} eV/Å")

    with _invariant(who, "forces = -dE/dR (finite differences)", all_x):
        h = 1e-2 if single else 1e-4
        for i, a in enumerate(X):
            U = rng.standard_normal((len(a), 3))
            U /= np.linalg.norm(U)
            plus, minus = a.copy(), a.copy()
            plus.positions += h * U
            minus.positions -= h * U
            ep, em = _energy_and_forces(handle, [plus])[0][0], _energy_and_forces(handle,
                                                                                   [minus])[0][0]
            fd = -(ep - em) / (2 * h)
            auto = float(np.sum(F[ptr_list[i]:ptr_list[i + 1]] * U))
            assert abs(auto - fd) <= fd_rtol * (abs(fd) + f_scale), (
                f"X[{i}]: F·u = {auto:.6g} but -(E(R+hu) - E(R-hu))/2h = {fd:.6g} "
                f"(h = {h} Å along a random unit displacement u)")

    for k, (subset, step) in enumerate(steps.items()):
        pattern = list(subset) if isinstance(subset, tuple) else subset
        with _invariant(who, f"dE/dtheta and dF/dtheta (finite differences), subset {subset!r}",
                        all_x):
            auto, fd = parameter_derivatives(handle, X, pattern, eps=step or eps,
                                             seed=random_state + k)
            assert np.abs(auto).max() > 0, "all parameter derivatives are zero"
            np.testing.assert_allclose(auto, fd, rtol=fd_rtol,
                                       atol=fd_rtol * np.abs(fd).max(),
                                       err_msg="autograd (rows) vs finite differences; "
                                               "columns: energy, forces")
        restored(f"parameter finite differences of {subset!r}")

    first = next(iter(steps), "readout")
    first = list(first) if isinstance(first, tuple) else first
    motion = _random_motions(random_state)[2][1]  # rigid motion, lattice shifts, permutation
    with _invariant(who, "rotation invariance", all_x):
        Xm = [motion.apply(a) for a in X]
        Em, Fm = _energy_and_forces(handle, Xm)
        np.testing.assert_allclose(Em, E, rtol=rtol, atol=rtol * e_scale, err_msg="energies")
        for i, a in enumerate(X):
            fr = F[ptr_list[i]:ptr_list[i + 1]][motion.order(len(a))] @ motion.rotation.T
            np.testing.assert_allclose(Fm[ptr_list[i]:ptr_list[i + 1]], fr, rtol=0,
                                       atol=10 * rtol * f_scale,
                                       err_msg=f"forces of X[{i}] vs Q F[order]")
        G, Gm = energy_gradients(handle, X, first), energy_gradients(handle, Xm, first)
        K, Km = G @ G.T, Gm @ Gm.T
        np.testing.assert_allclose(Km, K, rtol=0, atol=10 * rtol * np.abs(K).max(),
                                   err_msg="energy-gradient kernel G_E G_Eᵀ")
        a = X[0]
        w = rng.standard_normal((len(a), 3))
        v0 = force_vjp(handle, a, first, w)
        # atom k of the moved copy is atom order[k]: weights follow the atoms and rotate
        v1 = force_vjp(handle, Xm[0], first, w[motion.order(len(a))] @ motion.rotation.T)
        np.testing.assert_allclose(v1, v0, rtol=0, atol=10 * rtol * np.abs(v0).max(),
                                   err_msg="Σ (Q w_i)·∂F_i(QR)/∂θ vs Σ w_i·∂F_i(R)/∂θ")
    restored("rotation checks")

    if "embeddings" in handle.implemented_properties:
        with _invariant(who, "embeddings shape and invariance", all_x):
            h = handle.embeddings(handle.collate(X, "cpu")).detach().double().cpu().numpy()
            hm = handle.embeddings(handle.collate(Xm, "cpu")).detach().double().cpu().numpy()
            width = getattr(handle, "n_embedding", h.shape[-1] if h.ndim == 2 else None)
            assert h.shape == (ptr[-1], width), (f"embeddings have shape {h.shape}; expected "
                                                 f"(n_atoms={ptr[-1]}, n_embedding={width})")
            assert np.all(np.isfinite(h)), "non-finite embeddings"
            for i, a in enumerate(X):
                np.testing.assert_allclose(
                    hm[ptr_list[i]:ptr_list[i + 1]],
                    h[ptr_list[i]:ptr_list[i + 1]][motion.order(len(a))], rtol=0,
                    atol=10 * rtol * max(float(np.abs(h).max()), 1e-12),
                    err_msg=f"embeddings of moved X[{i}]")
        restored("embeddings")

    with _invariant(who, "parameter subsets"):
        names = [nm for nm, _ in module.named_parameters()]
        for s in (*handle.parameter_subsets, "default"):
            named = handle.parameters(s)
            got = [nm for nm, _ in named]
            assert got, f"subset {s!r} is empty"
            assert len(set(got)) == len(got), f"subset {s!r} repeats parameters"
            assert set(got) <= set(names), f"subset {s!r} names {set(got) - set(names)}"
            assert all(isinstance(p, torch.nn.Parameter) for _, p in named), (
                f"subset {s!r} holds non-Parameter tensors")
        try:
            handle.parameters("no-such-subset")
        except ValueError:
            pass
        else:
            raise AssertionError("parameters('no-such-subset') did not raise a ValueError")

    with _invariant(who, "copy is independent", all_x):
        twin = handle.copy()
        assert type(twin) is type(handle) and twin.module is not module, "not a new module"
        e_c, _ = _energy_and_forces(twin, X)
        np.testing.assert_allclose(e_c, E, rtol=rtol, atol=rtol * e_scale,
                                   err_msg="copy's energies")
        with torch.no_grad():
            twin.parameters(first)[-1][1].add_(0.1)
        del twin
    restored("copy")

    if unknown_element == "auto":
        unknown_element = _unknown_z(handle.species)
    if unknown_element is not None:
        bad = _bad_structure(unknown_element, handle.species)
        with _invariant(who, "error on unknown element", f"X[1] ({bad.get_chemical_formula()})"):
            _expect_named_error(lambda: handle.collate([X[0], bad], "cpu"), unknown_element)
    restored("check_mlip")

"""``check_featurizer``: the invariants every structure featuriser should have."""

from __future__ import annotations

import numpy as np

from skntk.testing._common import (
    _bad_structure,
    _expect_named_error,
    _invariant,
    _label,
    _pick_species,
    _unknown_z,
)
from skntk.testing._structures import _random_motions, random_structures


def _species_of(obj):
    for attr in ("model_", "model"):
        model = getattr(obj, attr, None)
        if model is not None and hasattr(model, "species"):
            return model.species
    return getattr(obj, "species", None)


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


def _equal(a, b) -> bool:
    try:
        out = a == b
        return bool(np.all(out))
    except Exception:
        return False


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

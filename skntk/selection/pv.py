"""Chunked feature-space posterior variance (PV) screening and greedy batch PV.

Acquisition rules are plain functions of a chunk of posterior features (like scikit-learn's
``score_func``): :func:`pv_trace`, :func:`pv_mean`, :func:`pv_max_atom`, :func:`pv_logdet`, each
with signature ``reduction(psi, offsets, *, kind, sigma2) -> ndarray of shape (n_structures,)``.
:func:`pool_variance_reduction` and PV weighted by the pool's density
(``criterion="density_weighted"``) are the distribution-aware acquisitions.
"""

from __future__ import annotations

import logging
import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.base import TransformerMixin
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from skntk._sklearn_compat import Interval, StrOptions, validate_params
from skntk.blocks import FeatureBlocks, FeatureData
from skntk.linalg import StreamingTopK, array_device, segment_sum
from skntk.selection._base import BaseSelector
from skntk.selection._kernel import KernelDensity
from skntk.selection._posterior import FeaturePosterior, condition_posterior_features

logger = logging.getLogger(__name__)

__all__ = [
    "ChunkedPosteriorVarianceSelector",
    "pv_trace",
    "pv_mean",
    "pv_max_atom",
    "pv_logdet",
    "pool_variance_reduction",
    "REDUCTIONS",
]


def _row_sq(psi):
    return np.einsum("ij,ij->i", psi, psi)


def pv_trace(psi, offsets, *, kind="plain", sigma2=None):
    """Total posterior variance of a block, ``tr Σ(x) = ‖Ψ_x‖_F²``.

    Parameters
    ----------
    psi : ndarray of shape (n_rows, n_features)
        Posterior features of the rows of consecutive structures.
    offsets : ndarray of int of shape (n_structures + 1,)
        Block boundaries relative to ``psi``.
    kind : str, default="plain"
        Row layout (unused).
    sigma2 : float or None
        Noise variance (unused).

    Returns
    -------
    pv : ndarray of shape (n_structures,)
    """
    return segment_sum(_row_sq(psi), offsets)


def pv_mean(psi, offsets, *, kind="plain", sigma2=None):
    """Posterior variance per observation row, ``tr Σ(x) / m_x`` (0 for empty blocks)."""
    m = np.diff(offsets)
    return pv_trace(psi, offsets) / np.maximum(m, 1)


def pv_max_atom(psi, offsets, *, kind="force", sigma2=None):
    """Largest per-atom force variance: ``max_i tr Σ_ii`` over the 3x3 diagonal blocks of the atoms.

    Needs ``kind="force"`` (3N rows, atom-major) or ``"joint"`` (energy row, then 3N force rows;
    the energy row is ignored). Structures without atoms score 0.
    """
    sq = _row_sq(psi)
    offsets = np.asarray(offsets, dtype=np.int64)
    n = offsets.shape[0] - 1
    if kind == "joint":
        keep = np.ones(sq.shape[0], dtype=bool)
        keep[offsets[:-1][np.diff(offsets) > 0]] = False
        sq = sq[keep]
        offsets = offsets - np.arange(n + 1)
    elif kind == "plain":
        raise ValueError(
            "reduction='max_atom' needs force or joint blocks; got kind='plain' (rows with no "
            "per-atom layout). ForceNTKTransformer's probe rows (force_rows='probes', or 'auto' "
            "when it picks probes) are 'plain' even for kind='joint' or 'force': each probe row "
            "mixes the forces of all atoms, so probe rows are not per atom. Use "
            "force_rows='exact' for per-atom rows (3 per atom), or reduction='trace'.")
    elif kind != "force":
        raise ValueError(f"reduction='max_atom' needs force or joint blocks; got kind={kind!r}.")
    per_atom = sq.reshape(-1, 3).sum(axis=1)
    atom_off = offsets // 3
    out = np.zeros(n)
    nonempty = atom_off[1:] > atom_off[:-1]
    if np.any(nonempty):
        out[nonempty] = np.maximum.reduceat(per_atom, atom_off[:-1][nonempty])
    return out


def _group_by_m(offsets):
    """Yield ``(m, structure indices)`` for each distinct block size."""
    m = np.diff(offsets)
    for mv in np.unique(m):
        yield int(mv), np.flatnonzero(m == mv)


def _stack_blocks(psi, offsets, idx, m):
    """Blocks ``idx`` (all with ``m`` rows) as an array of shape (len(idx), m, n_features)."""
    rows = offsets[idx][:, None] + np.arange(m)[None, :]
    return psi[rows]


def pv_logdet(psi, offsets, *, kind="plain", sigma2):
    """Information gain ``½ log det(I + Σ(x) / σ²)`` of a block."""
    out = np.zeros(offsets.shape[0] - 1)
    for m, idx in _group_by_m(offsets):
        if m == 0:
            continue
        if m == 1:
            out[idx] = 0.5 * np.log1p(_row_sq(psi[offsets[idx]]) / sigma2)
            continue
        P = _stack_blocks(psi, offsets, idx, m)
        if m <= P.shape[2]:
            gram = P @ P.transpose(0, 2, 1)
        else:
            gram = P.transpose(0, 2, 1) @ P
        k = gram.shape[1]
        _, logdet = np.linalg.slogdet(np.eye(k) + gram / sigma2)
        out[idx] = 0.5 * logdet
    return out


def pool_variance_reduction(psi, offsets, N, *, sigma2):
    """Drop of the mean pool posterior variance when a block is observed.

    With ``N = (1/n) Σ_pool Ψ_pᵀ Ψ_p`` (so the mean pool PV is ``tr N``), observing block ``x``
    lowers it by ``tr((σ² I + Ψ_x Ψ_xᵀ)⁻¹ Ψ_x N Ψ_xᵀ)``; for one row ``ψᵀNψ / (σ² + ψᵀψ)``.
    In terms of the raw features (``C = A⁻¹``, unnormalised) this is
    ``σ² tr(C G_xᵀ (I + G_x C G_xᵀ)⁻¹ G_x C M)``.

    Parameters
    ----------
    psi : ndarray of shape (n_rows, n_features)
    offsets : ndarray of int of shape (n_structures + 1,)
    N : ndarray of shape (n_features, n_features)
    sigma2 : float

    Returns
    -------
    reduction : ndarray of shape (n_structures,)
    """
    out = np.zeros(offsets.shape[0] - 1)
    psiN = psi @ N
    for m, idx in _group_by_m(offsets):
        if m == 0:
            continue
        if m == 1:
            r = offsets[idx]
            out[idx] = np.einsum("ij,ij->i", psiN[r], psi[r]) / (sigma2 + _row_sq(psi[r]))
            continue
        P = _stack_blocks(psi, offsets, idx, m)
        PN = _stack_blocks(psiN, offsets, idx, m)
        S = P @ P.transpose(0, 2, 1)
        S[:, np.arange(m), np.arange(m)] += sigma2
        T = PN @ P.transpose(0, 2, 1)
        out[idx] = np.trace(np.linalg.solve(S, T), axis1=1, axis2=2)
    return out


#: Named reductions for ``ChunkedPosteriorVarianceSelector(reduction=...)``.
REDUCTIONS = {"trace": pv_trace, "mean": pv_mean, "max_atom": pv_max_atom, "logdet": pv_logdet}


class ChunkedPosteriorVarianceSelector(TransformerMixin, BaseSelector):
    """Posterior-variance acquisition in feature space, streamed over the pool.

    ``fit`` accumulates ``A = c² Σ_t G_tᵀ G_t + σ² I`` over the labelled blocks (float64, chunk by
    chunk) and factorises it (:class:`~skntk.selection._posterior.FeaturePosterior`). A candidate
    block ``G_x`` (m rows) then has posterior covariance ``Σ(x) = Ψ_x Ψ_xᵀ``, ``Ψ_x = σ c G_x L⁻ᵀ``,
    identical to the kernel-space GP posterior ``K_xx − K_xT (K_TT + σ² I)⁻¹ K_Tx`` of
    ``K = c² G Gᵀ`` but linear in the pool size: each chunk costs one ``(rows x d) @ (d x d)``
    product, memory ``O(d² + chunk · d)``.

    Acquisition (``criterion="variance"``) is a reduction of ``Σ(x)``: ``"trace"`` (``tr Σ``, the
    default), ``"mean"`` (``tr Σ / m``), ``"max_atom"`` (largest per-atom 3x3 force block trace),
    ``"logdet"`` (``½ log det(I + Σ/σ²)``) or a callable with the signature of :func:`pv_trace`.
    ``criterion="pool_variance_reduction"`` scores a candidate by how much observing it lowers the
    mean posterior variance of the whole pool ``X`` (:func:`pool_variance_reduction`), which does
    not chase outliers the way plain PV does; its scores depend on the pool passed in.
    ``criterion="density_weighted"`` multiplies the reduced PV by ``ρ(x)^density_power``, the
    Gaussian kernel density of ``x`` among the pool's structures in structure-kernel space
    (:class:`~skntk.selection._kernel.KernelDensity`: median-heuristic bandwidth, a structure's
    own term left out; information density, Settles & Craven 2008), so isolated candidates lose
    weight; it too depends on the pool passed in.

    ``greedy=True`` selects a batch one structure at a time, conditioning the posterior on each pick
    (rank-``m`` update of the candidates' posterior features; kriging believer / max-det).

    Parameters
    ----------
    sigma2 : float, default=1e-3
        Observation noise variance σ² (> 0), relative to the normalised kernel when ``normalize``.
    normalize : bool, default=True
        Scale features so that the mean squared train row norm (kernel diagonal) is 1.
    reduction : {"trace", "mean", "max_atom", "logdet"} or callable, default="trace"
        How ``Σ(x)`` becomes one score per structure (``criterion="variance"``).
    criterion : {"variance", "pool_variance_reduction", "density_weighted"}, default="variance"
        Acquisition.
    density_power : float, default=1.0
        Exponent ``β >= 0`` of the density weight (``criterion="density_weighted"``; 0 is plain
        PV).
    n_density_reference : int, default=1000
        Pool structures the density is estimated against (``criterion="density_weighted"``):
        all of them when the pool is no larger, else an evenly spaced subsample of the pool in
        its given order. Cost ``O(n_pool · n_density_reference · D)``.
    greedy : bool, default=False
        Batch selection by sequential posterior conditioning instead of top-scores.
    shortlist_size : int or None, default=None
        Keep a running top-``shortlist_size`` while streaming: :meth:`shortlist` returns it (in a
        :class:`~skntk.pipeline.SelectionPipeline`, the next step sees only these structures) and
        :meth:`select` picks within it.
    n_to_select : int, float or None, default=None
        Default budget of :meth:`select` (count, fraction of candidates, or half of them).
    working_memory : float or None, default=None
        MiB budget for chunk temporaries; ``None`` uses ``sklearn.get_config()``.
    progress_bar : bool, default=False
        A tqdm bar over the structures scored (rate and ETA).
    device : str or None, default=None
        Where the screening products ``Ψ = G @ whitener`` run: ``None`` NumPy on the host,
        ``"cuda"`` (or ``"auto"``: CUDA when there is one) torch on that device
        (:func:`skntk.linalg.array_device`); the posterior, its Cholesky factor and the
        float64 rescoring of the finalists stay on the host. Picks agree with the host path
        (tested on the CPU; GPU unmeasured).

    Attributes
    ----------
    posterior_ : FeaturePosterior
        The fitted posterior (``A_``, ``L_``, ``scale_``).
    n_features_in_ : int
        Feature dimension ``d``.
    n_train_ : int
        Labelled structures seen in ``fit``.
    shortlist_idx_ : ndarray of int of shape (shortlist_size,)
        Top structures of the last :meth:`shortlist` or :meth:`select` (best first).
    scores_ : ndarray of shape (n_structures,)
        Acquisition score of every structure of the last :meth:`shortlist` or :meth:`select`
        (for reports; float32 precision for float32 rows, see :meth:`shortlist`).
    selected_idx_ : ndarray of int of shape (n_to_select,)
        Indices into the last ``X`` given to :meth:`select`, in selection order.

    See Also
    --------
    LCMDSelector : diversity selection, e.g. on this selector's shortlist and posterior features.

    Examples
    --------
    >>> import numpy as np
    >>> from skntk.selection.pv import ChunkedPosteriorVarianceSelector
    >>> rng = np.random.default_rng(0)
    >>> train, pool = rng.normal(size=(50, 4)), rng.normal(size=(200, 4))
    >>> sel = ChunkedPosteriorVarianceSelector(sigma2=1e-2, n_to_select=3).fit(train)
    >>> idx = sel.select(pool)
    >>> idx.shape, bool(np.all(sel.score_samples(pool)[idx] >= np.median(sel.score_samples(pool))))
    ((3,), True)
    """

    _parameter_constraints: dict = {
        **BaseSelector._parameter_constraints,
        "sigma2": [Interval(Real, 0, None, closed="neither")],
        "normalize": ["boolean"],
        "reduction": [StrOptions(set(REDUCTIONS)), callable],
        "criterion": [StrOptions({"variance", "pool_variance_reduction", "density_weighted"})],
        "density_power": [Interval(Real, 0, None, closed="left")],
        "n_density_reference": [Interval(Integral, 1, None, closed="left")],
        "greedy": ["boolean"],
        "shortlist_size": [Interval(Integral, 1, None, closed="left"), None],
        "progress_bar": ["boolean"],
        "device": [str, None],
    }

    def __init__(self, sigma2=1e-3, *, normalize=True, reduction="trace", criterion="variance",
                 density_power=1.0, n_density_reference=1000, greedy=False, shortlist_size=None,
                 n_to_select=None, working_memory=None, progress_bar=False, device=None):
        self.sigma2 = sigma2
        self.normalize = normalize
        self.reduction = reduction
        self.criterion = criterion
        self.density_power = density_power
        self.n_density_reference = n_density_reference
        self.greedy = greedy
        self.shortlist_size = shortlist_size
        self.n_to_select = n_to_select
        self.working_memory = working_memory
        self.progress_bar = progress_bar
        self.device = device

    def fit(self, X, y=None):
        """Learn the posterior from labelled features.

        Parameters
        ----------
        X : FeatureBlocks or array-like of shape (n_structures, n_features)
            Labelled structures.
        y : None
            Ignored.

        Returns
        -------
        self : ChunkedPosteriorVarianceSelector
        """
        validate_params(self)
        X = self._check_X(X, reset=True)
        self.posterior_ = FeaturePosterior(self.sigma2, normalize=self.normalize,
                                           working_memory=self.working_memory).fit(X)
        self.n_train_ = len(X)
        return self

    # -- scoring -------------------------------------------------------------------------------
    def _reduce(self, psi, offsets, kind, pool, index):
        """Scores of the structures of ``psi``; ``index`` (slice or indices into the pool) picks
        their entries of the pool statistic ``pool`` (:meth:`_pool_statistic`)."""
        if self.criterion == "pool_variance_reduction":
            return pool_variance_reduction(psi, offsets, pool, sigma2=self.sigma2)
        func = REDUCTIONS[self.reduction] if isinstance(self.reduction, str) else self.reduction
        s = np.asarray(func(psi, offsets, kind=kind, sigma2=self.sigma2), dtype=np.float64)
        if self.criterion == "density_weighted":
            s = s * pool[index] ** self.density_power
        return s

    def _chunks(self, X):
        """``(start, FeatureBlocks)`` pieces of ``X`` in order (:meth:`FeatureData.iter_chunks`):
        validated blocks whole, a cached pool (:class:`~skntk.cache.PoolFeatures`) shard by
        shard."""
        if X.n_features != self.n_features_in_:
            raise ValueError(f"X has {X.n_features} features, but {type(self).__name__} is "
                             f"expecting {self.n_features_in_} features as input.")
        yield from X.iter_chunks()

    def _pool_statistic(self, X):
        """What the criterion needs of the whole pool, in one pass over ``X``: the whitened
        second moment ``N`` (pool variance reduction), the density ``ρ`` of every structure
        (density-weighted), or None."""
        if self.criterion == "pool_variance_reduction":
            N = np.zeros((self.n_features_in_, self.n_features_in_))
            for _, blocks in self._chunks(X):
                N += self.posterior_.whitened_second_moment(blocks) * len(blocks)
            return N / max(len(X), 1)
        if self.criterion == "density_weighted":
            n = len(X)
            if n == 0:
                return np.zeros(0)
            ref = np.unique(np.linspace(0, n - 1, min(self.n_density_reference, n))
                            .round().astype(np.int64))
            density = KernelDensity(working_memory=self.working_memory).fit(X.take(ref))
            position = np.full(n, -1, dtype=np.int64)
            position[ref] = np.arange(ref.size)
            rho = np.empty(n)
            for start, blocks in self._chunks(X):
                stop = start + len(blocks)
                rho[start:stop] = density(blocks, position[start:stop])
            return rho
        return None

    def _stream(self, X, *, top_k=None, fast=False):
        """One pass over ``X``: scores (n_structures,), top-``top_k`` indices (best first, ties by
        index) and the pool statistic (:meth:`_pool_statistic`).

        ``fast`` (float32 rows, not pool variance reduction): Ψ and the scores of the pass in
        float32; the ``top_k + margin`` best are then rescored in float64 and ranked on those, so
        the top-``top_k`` equal the float64 ones unless float32 rounding (relative ~1e-6) moves a
        structure across more than ``margin`` ranks.
        """
        post = self.posterior_
        N = self._pool_statistic(X)
        dtype = (np.float32 if fast and X.dtype == np.float32
                 and self.criterion != "pool_variance_reduction" else np.float64)
        keep = top_k
        if top_k is not None and dtype == np.float32:
            keep = min(len(X), top_k + max(_F32_MARGIN, top_k // 8))
        top = StreamingTopK(keep) if keep is not None else None
        scores = np.empty(len(X))
        with tqdm(total=len(X), desc="PV scores", unit="structure", leave=False,
                  disable=not getattr(self, "progress_bar", False)) as bar:
            device = array_device(getattr(self, "device", None))
            for start, blocks in self._chunks(X):
                for sl, psi, offsets in post.iter_transform(blocks, dtype=dtype, device=device):
                    lo, hi = start + sl.start, start + sl.stop
                    s = self._reduce(psi, offsets, blocks.kind, N, slice(lo, hi))
                    _check_scores(s, blocks, sl.start, post, base=start, dtype=dtype)
                    scores[lo:hi] = s
                    if top is not None:
                        top.push(s, np.arange(lo, hi))
                    bar.update(hi - lo)
        if top is None:
            return scores, None, N
        idx = top.indices()
        if dtype == np.float32:  # the ranking that counts: float64 scores of the finalists
            sub = X.take(idx)
            exact = np.concatenate([self._reduce(psi, off, sub.kind, N, idx[sl])
                                    for sl, psi, off in post.iter_transform(sub)])
            _check_scores(exact, sub, 0, post, index=idx)
            scores[idx] = exact
            idx = idx[np.lexsort((idx, -exact))][:top_k]
        return scores, idx, N

    def _shortlist_k(self, n_candidates):
        if self.shortlist_size is None:
            return None
        if self.shortlist_size > n_candidates:
            warnings.warn(
                f"shortlist_size={self.shortlist_size} is greater than the {n_candidates} "
                "candidates in X; all candidates are kept.", UserWarning, stacklevel=3,
            )
        return min(self.shortlist_size, n_candidates)

    def score_samples(self, X):
        """Acquisition score per structure (larger = more worth labelling), in float64.

        Parameters
        ----------
        X : FeatureBlocks, array-like of shape (n_structures, n_features) or PoolFeatures

        Returns
        -------
        scores : ndarray of shape (n_structures,)
            Posterior variance (reduced as ``reduction`` says, in units of the normalised
            kernel), or the pool variance reduction.
        """
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        return self._stream(X)[0]

    def shortlist(self, X):
        """Candidates for the next selection step: the top-``shortlist_size`` structures.

        One streamed pass over ``X`` that keeps only the running top-M (no Ψ of the pool is
        stored); float32 rows are screened in float32 and the finalists ranked on float64
        scores (see Notes). This is what :class:`~skntk.pipeline.SelectionPipeline` calls on a
        PV step that is not the last one: the next step sees only these structures.

        Parameters
        ----------
        X : FeatureBlocks, array-like of shape (n_structures, n_features) or PoolFeatures

        Returns
        -------
        shortlist_idx : ndarray of int of shape (M,)
            Indices into ``X``, best first (ties by lower index); all of ``X`` in order when
            ``shortlist_size`` is None. Also stored as ``shortlist_idx_``; the pass's scores of
            every structure as ``scores_``.

        Notes
        -----
        With float32 rows the scores of the pass are float32 products (``scores_`` has float32
        precision, except the shortlisted structures, rescored in float64), which halves the
        time of the pass; the shortlist is ranked on the float64 scores of the best
        ``M + max(64, M / 8)`` structures, so it is the float64 shortlist unless rounding moves a
        structure across that margin.
        """
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        k = self._shortlist_k(len(X))
        scores, idx, _ = self._stream(X, top_k=k, fast=True)
        self.scores_ = scores
        self.shortlist_idx_ = np.arange(len(X)) if idx is None else idx
        return self.shortlist_idx_

    def transform(self, X):
        """Posterior features ``Ψ = σ c G L⁻ᵀ`` of every row (no row is dropped).

        In a :class:`~skntk.pipeline.SelectionPipeline` the PV step transforms only the
        structures it shortlisted (:meth:`shortlist`), for the next step.

        Parameters
        ----------
        X : FeatureBlocks or array-like of shape (n_structures, n_features)

        Returns
        -------
        Psi : ndarray of shape (n_structures, n_features) or FeatureBlocks
            Float64; a plain array for plain-array input, else blocks with the layout of ``X``.
        """
        check_is_fitted(self)
        was_array = not isinstance(X, FeatureBlocks)
        X = self._check_X(X, reset=False)
        psi = self.posterior_.transform(X)
        return psi.rows if was_array else psi

    def fit_transform(self, X, y=None):
        """Fit on the labelled ``X`` and return its posterior features (``fit(X).transform(X)``).

        Returns
        -------
        Psi : ndarray of shape (n_structures, n_features) or FeatureBlocks
        """
        return self.fit(X, y).transform(X)

    # -- selection -----------------------------------------------------------------------------
    def _check_X(self, X, *, reset):
        if isinstance(X, FeatureData) and not isinstance(X, FeatureBlocks):
            return X  # a cached pool: its width is checked as it streams (:meth:`_chunks`)
        return super()._check_X(X, reset=reset)

    def _n_candidates(self, n_candidates):
        if self.shortlist_size is not None and self.shortlist_size < n_candidates:
            k = self.shortlist_size
            return k, f"shortlisted candidates (shortlist_size={k})"
        return n_candidates, "candidates in X"

    def _select(self, X, candidates, n_to_select):
        k = self._shortlist_k(len(candidates))
        if not self.greedy:
            # the picks are the top-n_to_select of the shortlist, i.e. of X: one top-k pass
            scores, top, _ = self._stream(X, top_k=max(k or 0, n_to_select), fast=True)
            self.scores_ = scores
            if k is not None:
                self.shortlist_idx_ = top[:k]
            return top[:n_to_select]
        if k is not None:
            scores, shortlist, N = self._stream(X, top_k=k)
            self.scores_ = scores
            self.shortlist_idx_ = shortlist
            candidates = shortlist
        else:
            N = self._pool_statistic(X)
        return self._greedy(X, np.asarray(candidates), n_to_select, N)

    def _greedy(self, X, candidates, n_to_select, N):
        """Sequential picks, each followed by the rank-m conditioning of the candidates' Ψ."""
        sub = X.take(candidates)
        offsets = sub.offsets
        psi = self.posterior_.transform(sub).rows
        chosen = np.zeros(len(candidates), dtype=bool)
        picks = []
        for it in range(n_to_select):
            s = self._reduce(psi, offsets, sub.kind, N, candidates)
            if it == 0:
                _check_scores(s, sub, 0, self.posterior_, index=candidates)
            s[chosen] = -np.inf
            j = int(np.argmax(s))
            picks.append(j)
            chosen[j] = True
            psi_x = psi[offsets[j]:offsets[j + 1]]
            if psi_x.shape[0]:
                psi, Q = condition_posterior_features(psi, psi_x.copy(), self.sigma2)
                if self.criterion == "pool_variance_reduction":
                    N = Q @ N @ Q
        return candidates[np.asarray(picks, dtype=np.int64)]


#: Extra finalists rescored in float64 after a float32 screening pass (at least).
_F32_MARGIN = 64


def _check_scores(scores, X, start, posterior, index=None, *, base=0, dtype=np.float64):
    """Refuse non-finite acquisition scores, naming the first structure (``X[start + k]`` of the
    pool position ``base + start + k``, or ``index[k]``): features too large for the fitted
    scale make ``|Ψ|²`` overflow (float64, or float32 in a float32 screening pass), and a ranking
    of infinities is arbitrary."""
    bad = ~np.isfinite(scores)
    if not bad.any():
        return
    k = int(np.flatnonzero(bad)[0])
    i = int(index[k]) if index is not None else base + start + k
    rows = np.asarray(X.rows[X.offsets[start + k]:X.offsets[start + k + 1]], dtype=np.float64)
    amax = float(np.abs(rows).max()) if rows.size else 0.0
    ref = 1.0 / posterior.scale_ if posterior.scale_ > 0 else float("inf")
    if not np.all(np.isfinite(rows)):
        raise ValueError(f"X contains NaN or infinity: structure {i}.")
    if dtype == np.float32:
        raise ValueError(
            f"X[{i}]: its posterior variance overflows float32 ({scores[k]}; float32 rows are "
            f"screened in float32): its features (entries up to {amax:.3g}) are too large for "
            f"the train features' scale ({ref:.3g}); pass float64 features "
            f"(X.astype(np.float64)) or rescale them."
        )
    raise ValueError(
        f"X[{i}]: its posterior variance is {scores[k]} in float64 ({int(bad.sum())} of "
        f"{len(scores)} structures in this chunk): its features (entries up to {amax:.3g}) are "
        f"too large for the train features' scale ({ref:.3g}); rescale the features or check "
        f"the model's output for this structure."
    )

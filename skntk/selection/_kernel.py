"""Structure-level kernels and the greedy centre loop shared by LCMD and MaxDist.

Both selectors reduce a structure to an explicit kernel feature vector ``φ(x)`` (so that
``k(a, b) = φ(a)·φ(b)``), get squared distances from the kernel,
``d²(a, b) = k(a, a) + k(b, b) − 2 k(a, b)``, and grow a set of centres one structure at a time,
as bmdal_reg's ``MaxDistSelectionMethod`` / ``LargestClusterMaxDistSelectionMethod`` do. Cost
``O(n_to_select · n_candidates · D)`` plus ``O(n_train · n_candidates · D)`` for the train centres
(chunked from ``working_memory``); no ``n x n`` matrix is formed.

Kernels:

- ``"linear"``: ``φ(x) = g_x`` for single-row blocks.
- ``"gram"``: ``k(A, B) = ‖G_A G_Bᵀ‖_F² = ⟨G_AᵀG_A, G_BᵀG_B⟩_F``, valid for any block sizes and
  invariant under rotations of feature space. Exact route: ``φ(A)`` = upper triangle of ``G_AᵀG_A``
  with off-diagonal entries times √2 (dimension ``d(d+1)/2``). Sketched route: the tensor sketch
  ``φ(A) = Σ_rows (g R₁) ⊙ (g R₂) / √D`` with Gaussian ``R₁, R₂`` (d x D), an unbiased estimate of
  the exact kernel (``E[φ(A)·φ(B)] = k(A, B)``). ``gram_features="auto"`` prefers the exact route
  whenever it is affordable (:func:`exact_gram_affordable`); the sketch is seeded by
  ``random_state``, and ``random_state=None`` means the fixed seed 0, so a selection never depends
  on an unseeded generator.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn import get_config
from sklearn.base import TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import trange

from skntk._sklearn_compat import Interval, StrOptions, validate_params
from skntk.linalg import (
    DeviceProduct,
    array_device,
    chunk_n_rows,
    gen_structure_chunks,
    segment_sum,
)
from skntk.selection._base import BaseSelector
from skntk.selection._posterior import FeaturePosterior

__all__ = [
    "exact_gram_affordable",
    "gram_features_exact",
    "gram_features_sketch",
    "greedy_centres",
    "KernelDensity",
    "nearest_centres",
]


def exact_gram_affordable(n_features, n_train, n_sketch_features, *, working_memory=None):
    """Whether ``gram_features="auto"`` takes the exact (unsketched) gram route.

    Exact when its dimension ``D = d(d+1)/2`` is at most ``n_sketch_features`` (then it is also
    the cheaper route), or when the exact features of the ``n_train`` train centres take at most
    half of ``working_memory`` (the other half is left to the candidates' features). The exact
    route needs no seed, so a selection cannot depend on one.

    Parameters
    ----------
    n_features : int
        ``d``, the width of the rows.
    n_train : int
        Train structures (the initial centres).
    n_sketch_features : int
        Dimension of the sketched route.
    working_memory : float or None, default=None
        MiB budget; ``None`` uses ``sklearn.get_config()``.

    Returns
    -------
    exact : bool

    Examples
    --------
    >>> from skntk.selection._kernel import exact_gram_affordable
    >>> exact_gram_affordable(40, 10_000, 1024)      # 820 <= 1024 sketch features
    True
    >>> exact_gram_affordable(512, 100, 1024, working_memory=1024)   # 100 x 1 MiB <= 512 MiB
    True
    >>> exact_gram_affordable(512, 5000, 1024, working_memory=1024)  # 5000 MiB: sketch
    False
    """
    D = n_features * (n_features + 1) // 2
    if D <= n_sketch_features:
        return True
    if working_memory is None:
        working_memory = get_config()["working_memory"]
    return max(n_train, 1) * D * 8 <= 0.5 * working_memory * 2**20


def gram_features_exact(X, *, working_memory=None):
    """Exact explicit features of the gram kernel ``‖G_A G_Bᵀ‖_F²``.

    Parameters
    ----------
    X : FeatureBlocks
    working_memory : float or None

    Returns
    -------
    phi : ndarray of shape (n_structures, n_features * (n_features + 1) // 2)

    Examples
    --------
    >>> import numpy as np
    >>> from skntk.blocks import FeatureBlocks
    >>> from skntk.selection._kernel import gram_features_exact
    >>> rng = np.random.default_rng(0)
    >>> X = FeatureBlocks(rng.normal(size=(5, 3)), [0, 2, 5])
    >>> phi = gram_features_exact(X)
    >>> A, B = X.block(0), X.block(1)
    >>> bool(np.isclose(phi[0] @ phi[1], np.sum((A @ B.T) ** 2)))
    True
    """
    d = X.n_features
    iu, ju = np.triu_indices(d)
    flat = iu * d + ju
    w = np.where(iu == ju, 1.0, np.sqrt(2.0))
    out = np.empty((len(X), iu.size))
    m = X.n_rows_per_structure
    # one structure at a time: G_sᵀG_s by gemm (m d² flops), then the upper triangle; temporaries
    # O(d²) whatever the budget, so working_memory only bounds the float64 cast of the rows
    max_rows = chunk_n_rows(8 * max(d, 1), max_n_rows=max(X.n_rows, 1),
                            working_memory=working_memory)
    for sl in gen_structure_chunks(X.offsets, max_rows):
        lo, hi = X.offsets[sl.start], X.offsets[sl.stop]
        G = np.asarray(X.rows[lo:hi], dtype=np.float64)
        off = X.offsets[sl.start:sl.stop + 1] - lo
        for k, i in enumerate(range(sl.start, sl.stop)):
            if m[i] == 0:
                out[i] = 0.0
                continue
            Gi = G[off[k]:off[k + 1]]
            out[i] = np.take(Gi.T @ Gi, flat) * w
    return out


def gram_features_sketch(X, R1, R2, *, working_memory=None):
    """Tensor-sketch features ``Σ_rows (g R₁) ⊙ (g R₂) / √D`` of the gram kernel.

    Parameters
    ----------
    X : FeatureBlocks
    R1, R2 : ndarray of shape (n_features, D)
        Independent standard Gaussian matrices.
    working_memory : float or None

    Returns
    -------
    phi : ndarray of shape (n_structures, D)
    """
    D = R1.shape[1]
    out = np.empty((len(X), D))
    max_rows = chunk_n_rows(8 * (3 * D + X.n_features), max_n_rows=max(X.n_rows, 1),
                            working_memory=working_memory)
    for sl in gen_structure_chunks(X.offsets, max_rows):
        lo, hi = X.offsets[sl.start], X.offsets[sl.stop]
        G = np.asarray(X.rows[lo:hi], dtype=np.float64)
        out[sl] = segment_sum((G @ R1) * (G @ R2), X.offsets[sl.start:sl.stop + 1] - lo)
    return out / np.sqrt(D)


class KernelDensity:
    """Gaussian kernel density of structures among reference structures, in structure-kernel space.

    ``ρ(x) = (1/R) Σ_r exp(−d²(x, r) / ℓ²)`` with ``d²`` the squared distance of the structure
    kernel (linear for single-row blocks, the gram kernel ``‖G_A G_Bᵀ‖_F²`` otherwise) and ``ℓ²``
    the median of ``d²`` over distinct pairs of reference structures (the median heuristic), so
    ``ρ`` is in (0, 1] and does not depend on the scale of the features. Rotation- and
    permutation-invariant like the kernel; cost ``O(n · R · D)``.

    Parameters
    ----------
    n_sketch_features : int, default=1024
        Dimension of the gram tensor sketch (seed 0) when the exact route is not affordable
        (:func:`exact_gram_affordable`).
    working_memory : float or None, default=None

    Attributes
    ----------
    reference_ : ndarray of shape (R, D)
        Kernel features of the reference structures.
    bandwidth_ : float
        ``ℓ²`` (1 when the reference distances are all 0).
    """

    def __init__(self, n_sketch_features=1024, *, working_memory=None):
        self.n_sketch_features = n_sketch_features
        self.working_memory = working_memory

    def fit(self, reference):
        """Kernel features and bandwidth of ``reference`` (FeatureBlocks, >= 1 structure)."""
        single = bool(np.all(reference.n_rows_per_structure == 1))
        d = reference.n_features
        self.route_ = "linear" if single else (
            "exact" if exact_gram_affordable(d, len(reference), self.n_sketch_features,
                                             working_memory=self.working_memory) else "sketch")
        if self.route_ == "sketch":
            rng = np.random.default_rng(0)
            D = self.n_sketch_features
            self.sketch_ = (rng.standard_normal((d, D)), rng.standard_normal((d, D)))
        self.reference_ = self._phi(reference)
        sq = _row_sq(self.reference_)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (self.reference_ @ self.reference_.T), 0)
        pairs = d2[np.triu_indices(len(sq), 1)]
        med = float(np.median(pairs)) if pairs.size else 0.0
        self.bandwidth_ = med if med > 0 else 1.0
        self._ref_sq = sq
        return self

    def _phi(self, X):
        if self.route_ == "linear":
            return np.asarray(X.rows[X.offsets[:-1]], dtype=np.float64)
        if self.route_ == "exact":
            return gram_features_exact(X, working_memory=self.working_memory)
        return gram_features_sketch(X, *self.sketch_, working_memory=self.working_memory)

    def __call__(self, X, self_index=None):
        """``ρ`` of every structure of ``X`` (FeatureBlocks), shape (n_structures,).

        ``self_index`` (int array of shape (n_structures,)): the reference position of each
        structure that is itself a reference structure, −1 for the others; a structure's own
        term is left out of its mean (leave-one-out), so an isolated structure gets a density
        near 0 rather than ``1/R``. With a single reference structure, that structure gets 1.
        """
        phi = self._phi(X)
        ref = self.reference_
        R = ref.shape[0]
        step = chunk_n_rows(8 * (R + ref.shape[1]), max_n_rows=max(len(X), 1),
                            working_memory=self.working_memory)
        out = np.empty(len(X))
        for lo in range(0, len(X), step):
            p = phi[lo:lo + step]
            d2 = _row_sq(p)[:, None] + self._ref_sq[None, :] - 2.0 * (p @ ref.T)
            w = np.exp(-np.maximum(d2, 0) / self.bandwidth_)
            count = np.full(len(p), float(R))
            if self_index is not None:
                own = np.asarray(self_index[lo:lo + step])
                rows = np.flatnonzero(own >= 0)
                w[rows, own[rows]] = 0.0
                count[rows] -= 1
            total = w.sum(axis=1)
            out[lo:lo + step] = np.where(count > 0, total / np.maximum(count, 1), 1.0)
        return out


def _row_sq(phi):
    """Squared row norms in float64 (whatever the dtype of ``phi``)."""
    return np.einsum("ij,ij->i", phi, phi, dtype=np.float64)


def nearest_centres(phi, centres, *, working_memory=None, device=None):
    """Squared distance of each row of ``phi`` to its nearest centre, and that centre's index.

    The assignment is one matrix product per chunk of rows, in the dtype of ``phi`` (float32
    rows: float32 products, the cost floor of this step): the nearest centre maximises
    ``φ·c − ½‖c‖²``, so the product against the centres augmented by ``−½‖c‖²`` and an argmax
    are all it takes. The squared distance to the chosen centre is then recomputed in float64
    from the difference ``φ − c``, so it carries no cancellation error. Ties go to the lower
    centre index.

    Parameters
    ----------
    phi : ndarray of shape (n, D)
    centres : ndarray of shape (n_centres, D), n_centres >= 1
    working_memory : float or None
    device : torch.device or None
        Run the products and the argmax in torch there (:func:`skntk.linalg.array_device`);
        only the argmax comes back. The float64 distances stay on the host.

    Returns
    -------
    min_sq : ndarray of shape (n,)
        Float64.
    closest : ndarray of int of shape (n,)
    """
    n, D = phi.shape
    dtype = phi.dtype if phi.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    c64 = np.asarray(centres, dtype=np.float64)
    aug = np.empty((c64.shape[0], D + 1), dtype=dtype)  # [c, -|c|²/2]
    aug[:, :D] = c64
    aug[:, D] = -0.5 * _row_sq(c64)
    min_sq = np.empty(n)
    closest = np.empty(n, dtype=np.int64)
    isz = np.dtype(dtype).itemsize
    step = chunk_n_rows(isz * (c64.shape[0] + D + 1) + 8 * D, max_n_rows=max(n, 1),
                        working_memory=working_memory)
    buf = np.empty((min(step, max(n, 1)), D + 1), dtype=dtype)
    buf[:, D] = 1.0
    product = DeviceProduct(aug.T, device)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        rows = buf[:hi - lo]
        rows[:, :D] = phi[lo:hi]
        arg = product.argmax(rows)
        closest[lo:hi] = arg
        diff = np.asarray(phi[lo:hi], dtype=np.float64) - c64[arg]
        min_sq[lo:hi] = np.einsum("ij,ij->i", diff, diff)
    return min_sq, closest


def greedy_centres(phi, n_to_select, *, centres=None, method="lcmd", working_memory=None,
                   progress_bar=False, device=None):
    """Grow centres greedily: LCMD (largest cluster, max distance) or MaxDist (farthest point).

    Semantics of bmdal_reg: ``centres`` (e.g. the train set) are the initial centres; without
    centres the first pick is the largest ``k(x, x)``. Every candidate belongs to its nearest centre
    (ties: the earlier centre). LCMD: a cluster's size is the sum of its members' squared distances;
    pick the member farthest from its centre among the largest clusters. MaxDist: pick the candidate
    farthest from all centres. Ties: first index. A pick becomes a centre and is never picked again.

    Parameters
    ----------
    phi : ndarray of shape (n_candidates, D)
        Kernel features of the candidates.
    n_to_select : int
        At most ``n_candidates``.
    centres : ndarray of shape (n_centres, D) or None
    method : {"lcmd", "maxdist"}
    working_memory : float or None
    progress_bar : bool, default=False
        A tqdm bar over the picks.
    device : torch.device or None
        Where the assignment to ``centres`` runs (:func:`nearest_centres`).

    Returns
    -------
    picks : ndarray of int of shape (n_to_select,)
        Positions in ``phi``, in selection order.
    """
    n = phi.shape[0]
    diag = _row_sq(phi)
    n_added = 0
    if centres is not None and centres.shape[0]:
        min_sq, closest = nearest_centres(phi, centres, working_memory=working_memory,
                                          device=device)
        closest += 1  # cluster 0: candidates with no centre yet
        n_added = centres.shape[0]
    else:
        min_sq = np.full(n, np.inf)
        closest = np.zeros(n, dtype=np.int64)
    chosen = np.zeros(n, dtype=bool)
    picks = np.empty(n_to_select, dtype=np.int64)
    for k in trange(n_to_select, desc=method.upper(), unit="pick", leave=False,
                    disable=not progress_bar):
        if n_added == 0:
            j = int(np.argmax(diag))
        else:
            if method == "lcmd":
                sizes = np.bincount(closest, weights=min_sq, minlength=n_added + 1)
                s = np.where(sizes[closest] == sizes.max(), min_sq, -np.inf)
            else:
                s = min_sq.copy()
            s[chosen] = -np.inf
            j = int(np.argmax(s))
            if not s[j] > -np.inf:  # nothing eligible (degenerate distances): first unselected
                j = int(np.flatnonzero(~chosen)[0])
        picks[k] = j
        chosen[j] = True
        sq = diag[j] + diag - 2.0 * (phi @ phi[j])  # float64 (diag), the product in phi's dtype
        np.maximum(sq, 0.0, out=sq)
        sq[j] = 0.0
        new = sq < min_sq
        n_added += 1
        closest[new] = n_added
        min_sq[new] = sq[new]
    return picks


class _KernelCentresSelector(TransformerMixin, BaseSelector):
    """Shared machinery of LCMD and MaxDist: features, kernel, train centres (not public)."""

    _method = "lcmd"
    _parameter_constraints: dict = {
        **BaseSelector._parameter_constraints,
        "kernel": [StrOptions({"auto", "linear", "gram"})],
        "gram_features": [StrOptions({"auto", "exact", "sketch"})],
        "n_sketch_features": [Interval(Integral, 1, None, closed="left")],
        "features": [StrOptions({"prior", "posterior"})],
        "sigma2": [Interval(Real, 0, None, closed="neither")],
        "normalize": ["boolean"],
        "sel_with_train": ["boolean"],
        "random_state": ["random_state"],
        "progress_bar": ["boolean"],
        "device": [str, None],
    }

    def __init__(self, n_to_select=None, *, kernel="auto", gram_features="auto",
                 n_sketch_features=1024, features="prior", sigma2=1e-3, normalize=True,
                 sel_with_train=True, random_state=None, working_memory=None,
                 progress_bar=False, device=None):
        self.n_to_select = n_to_select
        self.kernel = kernel
        self.gram_features = gram_features
        self.n_sketch_features = n_sketch_features
        self.features = features
        self.sigma2 = sigma2
        self.normalize = normalize
        self.sel_with_train = sel_with_train
        self.random_state = random_state
        self.working_memory = working_memory
        self.progress_bar = progress_bar
        self.device = device

    def fit(self, X, y=None):
        """Record the train structures as centres (in kernel feature space).

        Parameters
        ----------
        X : FeatureBlocks or array-like of shape (n_structures, n_features)
            Labelled structures (prior features, or posterior features from a PV step).
        y : None
            Ignored.

        Returns
        -------
        self
        """
        validate_params(self)
        X = self._check_X(X, reset=True)
        single = bool(np.all(X.n_rows_per_structure == 1))
        self.kernel_ = ("linear" if single else "gram") if self.kernel == "auto" else self.kernel
        d = X.n_features
        if self.kernel_ == "gram":
            route = self.gram_features
            if route == "auto":
                route = ("exact" if exact_gram_affordable(d, len(X), self.n_sketch_features,
                                                          working_memory=self.working_memory)
                         else "sketch")
            self.gram_features_ = route
        else:
            self.gram_features_ = None
        if self.gram_features_ == "sketch":
            # None is the fixed seed 0: the same inputs give the same selection in every call and
            # every process (pass a RandomState instance for fresh draws)
            rng = check_random_state(0 if self.random_state is None else self.random_state)
            D = self.n_sketch_features
            self.sketch_ = (rng.standard_normal((d, D)), rng.standard_normal((d, D)))
        if self.features == "posterior":
            self.posterior_ = FeaturePosterior(self.sigma2, normalize=self.normalize,
                                               working_memory=self.working_memory).fit(X)
        phi = self._phi(X)
        self.centres_ = phi if self.sel_with_train else phi[:0]
        return self

    def _phi(self, X):
        """Kernel features of validated blocks ``X``, shape (n_structures, D)."""
        if self.features == "posterior":
            X = self.posterior_.transform(X)
        if self.kernel_ == "linear":
            m = X.n_rows_per_structure
            if np.any(m != 1):
                i = int(np.flatnonzero(m != 1)[0])
                raise ValueError(
                    f"kernel='linear' needs one row per structure; structure {i} of X has {m[i]} "
                    "rows (use kernel='gram' for multi-row blocks)."
                )
            # float32 rows stay float32 (no pool-sized copy; products in float32, distances and
            # cluster sizes in float64), anything else float64
            return np.asarray(X.rows, dtype=np.float32 if X.rows.dtype == np.float32
                              else np.float64)
        if self.gram_features_ == "exact":
            return gram_features_exact(X, working_memory=self.working_memory)
        return gram_features_sketch(X, *self.sketch_, working_memory=self.working_memory)

    def transform(self, X):
        """Kernel features ``φ(x)`` of every structure (``k(a, b) = φ(a)·φ(b)``).

        Parameters
        ----------
        X : FeatureBlocks or array-like of shape (n_structures, n_features)

        Returns
        -------
        phi : ndarray of shape (n_structures, D)
        """
        check_is_fitted(self)
        return self._phi(self._check_X(X, reset=False))

    def score_samples(self, X):
        """Squared kernel distance to the nearest train centre (``k(x, x)`` without centres).

        Parameters
        ----------
        X : FeatureBlocks or array-like of shape (n_structures, n_features)

        Returns
        -------
        sq_dist : ndarray of shape (n_structures,)
        """
        check_is_fitted(self)
        phi = self._phi(self._check_X(X, reset=False))
        if self.centres_.shape[0] == 0:
            return _row_sq(phi)
        return nearest_centres(phi, self.centres_, working_memory=self.working_memory,
                               device=array_device(getattr(self, "device", None)))[0]

    def _select(self, X, candidates, n_to_select):
        phi = self._phi(X)
        picks = greedy_centres(phi, n_to_select, centres=self.centres_, method=self._method,
                               working_memory=self.working_memory,
                               progress_bar=getattr(self, "progress_bar", False),
                               device=array_device(getattr(self, "device", None)))
        return np.asarray(candidates)[picks]


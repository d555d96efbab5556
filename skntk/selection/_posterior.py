"""The feature-space Gaussian-process posterior: where skntk's posterior algebra lives, once.

With train blocks ``G_t`` (rows of features, scaled by ``c``), observation noise variance ``σ²``
and a unit prior on the weights,

    A = c² Σ_t G_tᵀ G_t + σ² I = L Lᵀ        (d x d, accumulated chunk by chunk in float64)

the posterior covariance of the outputs of a candidate block ``G_x`` (m x d) is

    Σ(x) = σ² c² G_x A⁻¹ G_xᵀ = Ψ_x Ψ_xᵀ,     Ψ_x = σ c G_x L⁻ᵀ,

which equals the kernel-space posterior ``K_xx − K_xT (K_TT + σ² I)⁻¹ K_Tx`` of the kernel
``K(a, b) = c² G_a G_bᵀ`` without forming ``K_TT`` or ``K_xT``. ``c`` is 1, or (``normalize=True``)
chosen so that the mean train kernel diagonal (mean squared row norm) is 1, as bmdal_reg does; σ² is
then relative to that scale.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import linalg as sla

from skntk.blocks import as_blocks
from skntk.linalg import (
    DeviceProduct,
    InsufficientMemoryError,
    available_host_memory,
    chunk_n_rows,
    format_bytes,
    gen_structure_chunks,
    memory_check_skipped,
    robust_cholesky,
)

logger = logging.getLogger(__name__)

__all__ = ["FeaturePosterior", "condition_posterior_features"]

#: Train features with entries above this magnitude (or below its inverse) are divided by their
#: largest entry before their Gram matrix is formed, so its squares neither overflow nor underflow.
_PRESCALE_ABOVE = 1e100


def _row_chunks(blocks, working_memory, row_factor=3):
    """Structure slices whose float64 temporaries (``row_factor`` row copies) fit the budget."""
    max_rows = chunk_n_rows(row_factor * 8 * max(blocks.n_features, 1),
                            max_n_rows=max(blocks.n_rows, 1), working_memory=working_memory)
    return gen_structure_chunks(blocks.offsets, max_rows)


def _chunk_rows(blocks, sl):
    """Rows of the structures in slice ``sl`` as float64, and their chunk-relative offsets."""
    lo, hi = blocks.offsets[sl.start], blocks.offsets[sl.stop]
    rows = np.asarray(blocks.rows[lo:hi], dtype=np.float64)
    return rows, blocks.offsets[sl.start:sl.stop + 1] - lo


def posterior_bytes(n_features: int) -> int:
    """Bytes of the d x d float64 matrices :class:`FeaturePosterior` holds at once (the Gram
    matrix, ``A_``, ``L_`` and the whitener: four)."""
    return 4 * 8 * int(n_features) ** 2


def check_posterior_memory(n_features: int, *, name: str = "n_features") -> None:
    """Refuse a feature dimension whose posterior cannot fit, before any work.

    Raises
    ------
    skntk.linalg.InsufficientMemoryError
        ``n_features=100000: the posterior needs about 320.0 GB (four 100000 x 100000 float64
        matrices); 12.3 GB available; use fewer features ...`` (``name`` names the option,
        e.g. ``--n-features``).
    """
    if memory_check_skipped():
        return
    available = available_host_memory()
    need = posterior_bytes(n_features)
    if available is None or need <= available:
        return
    sep = " " if name.startswith("-") else "="
    raise InsufficientMemoryError(
        f"{name}{sep}{n_features}: the posterior needs about {format_bytes(need)} (four "
        f"{n_features} x {n_features} float64 matrices); {format_bytes(available)} available "
        f"(the smaller of free memory and the address-space limit); use fewer features "
        f"(SKNTK_SKIP_MEMORY_CHECK=1 skips this check).")


class FeaturePosterior:
    """Linearised-GP posterior over feature blocks, in feature space.

    Parameters
    ----------
    sigma2 : float
        Observation noise variance σ² (> 0), in units of the (normalised) kernel.
    normalize : bool, default=True
        Scale features so that the mean squared train row norm is 1.
    working_memory : float or None, default=None
        MiB budget for chunk temporaries; ``None`` uses scikit-learn's config.

    Attributes
    ----------
    scale_ : float
        Feature scale ``c``.
    A_ : ndarray of shape (n_features, n_features)
        ``c² Σ GᵀG + σ² I`` (float64).
    L_ : ndarray of shape (n_features, n_features)
        Lower Cholesky factor of ``A_``.
    whitener_ : ndarray of shape (n_features, n_features)
        ``σ c L⁻ᵀ`` (upper triangular), so ``Ψ = G @ whitener_`` is one matrix product per chunk.
    b_ : ndarray of shape (n_features,) or None
        ``c Σ Gᵀ y`` when targets were given to :meth:`fit` (ridge / GP posterior mean).
    n_rows_seen_ : int
        Train rows accumulated.

    Examples
    --------
    >>> import numpy as np
    >>> from skntk.selection._posterior import FeaturePosterior
    >>> rng = np.random.default_rng(0)
    >>> T, X = rng.normal(size=(20, 3)), rng.normal(size=(4, 3))
    >>> post = FeaturePosterior(0.1, normalize=False).fit(T)
    >>> K = lambda a, b: a @ b.T
    >>> gp = K(X, X) - K(X, T) @ np.linalg.solve(K(T, T) + 0.1 * np.eye(20), K(T, X))
    >>> np.allclose(post.variance(X), np.diag(gp))
    True
    """

    def __init__(self, sigma2, *, normalize=True, working_memory=None):
        self.sigma2 = sigma2
        self.normalize = normalize
        self.working_memory = working_memory

    # -- fitting -------------------------------------------------------------------------------
    def fit(self, X, y=None):
        """Accumulate ``A`` (and ``b`` if ``y`` is given) over train blocks and factorise.

        Parameters
        ----------
        X : FeatureBlocks or array-like of shape (n_structures, n_features)
            Labelled structures (may have zero structures: then ``A = σ² I``).
        y : ndarray of shape (n_rows,) or None, default=None
            One target per row of ``X`` (for :meth:`predict`).

        Returns
        -------
        self : FeaturePosterior
        """
        if not self.sigma2 > 0:
            raise ValueError(f"sigma2 must be > 0; got {self.sigma2!r}.")
        X = as_blocks(X)
        d = X.n_features
        check_posterior_memory(d)
        if y is not None:
            y = np.asarray(y, dtype=np.float64).reshape(-1)
            if y.shape[0] != X.n_rows:
                raise ValueError(f"y has {y.shape[0]} targets; X has {X.n_rows} rows.")
        # features whose squares over- or underflow float64 (|g| ~ 1e200 or 1e-200) are divided
        # by their largest entry first; with normalize=True the result is the same posterior
        pre, amax, worst = 1.0, 0.0, 0
        for sl in _row_chunks(X, self.working_memory):
            rows, offsets = _chunk_rows(X, sl)
            if rows.size:
                r = int(np.argmax(np.abs(rows).max(axis=1)))
                m = float(np.abs(rows[r]).max())
                if m > amax:
                    amax = m
                    worst = sl.start + int(np.searchsorted(offsets, r, side="right")) - 1
        if amax > _PRESCALE_ABOVE or 0 < amax < 1 / _PRESCALE_ABOVE:
            if not self.normalize and amax > _PRESCALE_ABOVE:
                raise ValueError(
                    f"train features are too large for float64 arithmetic: X[{worst}] has an "
                    f"entry of magnitude {amax:.3g}, whose square overflows; use normalize=True "
                    f"or rescale the features."
                )
            pre = 1.0 / amax
        gram = np.zeros((d, d))
        b = np.zeros(d) if y is not None else None
        sq_sum = 0.0
        for sl in _row_chunks(X, self.working_memory):
            rows, _ = _chunk_rows(X, sl)
            if pre != 1.0:
                rows = rows * pre
            gram += rows.T @ rows
            if y is not None:
                b += rows.T @ y[X.offsets[sl.start]:X.offsets[sl.stop]]
        sq_sum = float(np.trace(gram))
        scale = 1.0
        if self.normalize and X.n_rows:
            if not sq_sum > 0 or not np.isfinite(sq_sum):
                raise ValueError(
                    "normalize=True needs train features with a positive, finite mean squared row "
                    f"norm; got {sq_sum / X.n_rows!r}."
                )
            scale = float(np.sqrt(X.n_rows / sq_sum))
        self.scale_ = scale * pre
        self.n_features_ = d
        self.A_ = scale**2 * gram
        self.A_[np.diag_indices(d)] += self.sigma2
        self.b_ = None if b is None else scale * b
        self.n_rows_seen_ = X.n_rows
        self._factorise()
        return self

    def _factorise(self):
        self.L_ = robust_cholesky(self.A_)
        d = self.A_.shape[0]
        # L^-T by one triangular solve against I (done once per fit/update, d x d); the streaming
        # screen is then a plain matrix product per chunk, which runs at BLAS gemm speed.
        linv = sla.solve_triangular(self.L_, np.eye(d), lower=True, check_finite=False)
        self.whitener_ = np.sqrt(self.sigma2) * self.scale_ * linv.T

    def update(self, X):
        """Condition on more observed blocks: ``A += c² GᵀG`` (rank ``m``), refactorise.

        Parameters
        ----------
        X : FeatureBlocks or array-like of shape (n_structures, n_features)

        Returns
        -------
        self : FeaturePosterior
        """
        X = as_blocks(X)
        for sl in _row_chunks(X, self.working_memory):
            rows, _ = _chunk_rows(X, sl)
            rows = self.scale_ * rows  # scaled first: c² and GᵀG may under/overflow on their own
            self.A_ += rows.T @ rows
        self.n_rows_seen_ += X.n_rows
        self._factorise()
        return self

    # -- transforming --------------------------------------------------------------------------
    def transform_rows(self, rows):
        """Ψ = σ c G L⁻ᵀ for rows of shape (n_rows, n_features); float64 of the same shape."""
        rows = np.asarray(rows, dtype=np.float64)
        if rows.shape[-1] != self.n_features_:
            raise ValueError(
                f"rows have n_features={rows.shape[-1]}; the posterior was fitted with "
                f"{self.n_features_}."
            )
        return rows @ self.whitener_

    def transform(self, X):
        """Posterior features of every row, blocks in, blocks out.

        Parameters
        ----------
        X : FeatureBlocks or array-like of shape (n_structures, n_features)

        Returns
        -------
        Psi : FeatureBlocks
            Same layout and kind as ``X``, float64 rows ``Ψ``; ``Ψ_x Ψ_xᵀ`` is the posterior
            covariance of the block's outputs.
        """
        X = as_blocks(X)
        out = np.empty((X.n_rows, X.n_features), dtype=np.float64)
        for sl in _row_chunks(X, self.working_memory):
            lo, hi = X.offsets[sl.start], X.offsets[sl.stop]
            out[lo:hi] = self.transform_rows(X.rows[lo:hi])
        return X.with_rows(out)

    def iter_transform(self, X, *, dtype=np.float64, device=None):
        """Yield ``(structure_slice, Ψ rows, chunk-relative offsets)`` chunk by chunk.

        ``dtype=np.float32``: ``Ψ`` is the float32 product of the rows (cast if needed) and the
        float32-rounded whitener (for ranking; the posterior itself stays float64). The yielded
        ``Ψ`` is a view of a buffer reused by the next chunk (no page faults per chunk); copy it
        to keep it. ``device`` (a torch device, :func:`skntk.linalg.array_device`): the products
        run there (the whitener is sent once), ``Ψ`` comes back to the host.
        """
        X = as_blocks(X)
        dtype = np.dtype(dtype)
        itemsize = dtype.itemsize
        max_rows = chunk_n_rows(3 * itemsize * max(X.n_features, 1),
                                max_n_rows=max(X.n_rows, 1), working_memory=self.working_memory)
        chunks = list(gen_structure_chunks(X.offsets, max_rows))
        longest = max((int(X.offsets[c.stop] - X.offsets[c.start]) for c in chunks), default=0)
        whitener = DeviceProduct(self.whitener_ if dtype == np.float64
                                 else self.whitener_.astype(dtype), device)
        out = np.empty((longest, self.n_features_), dtype=dtype)
        cast = None if X.rows.dtype == dtype else np.empty((longest, X.n_features), dtype=dtype)
        for sl in chunks:
            lo, hi = X.offsets[sl.start], X.offsets[sl.stop]
            rows = X.rows[lo:hi]
            if rows.shape[1] != self.n_features_:
                raise ValueError(
                    f"rows have n_features={rows.shape[1]}; the posterior was fitted with "
                    f"{self.n_features_}."
                )
            if cast is not None:
                np.copyto(cast[:hi - lo], rows, casting="unsafe")
                rows = cast[:hi - lo]
            psi = out[:hi - lo]
            with np.errstate(over="ignore", invalid="ignore"):  # refused by the caller, by name
                whitener(rows, out=psi)
            yield sl, psi, X.offsets[sl.start:sl.stop + 1] - lo

    def variance(self, X):
        """Posterior variance per row, ``diag Σ`` (n_rows,), for small inputs and doctests."""
        X = as_blocks(X)
        psi = self.transform(X).rows
        return np.einsum("ij,ij->i", psi, psi)

    def predict(self, X):
        """Posterior mean per row (ridge regression with penalty σ²), shape (n_rows,)."""
        if self.b_ is None:
            raise ValueError("predict needs a posterior fitted with targets y.")
        w = sla.cho_solve((self.L_, True), self.b_, check_finite=False)
        X = as_blocks(X)
        return self.scale_ * (np.asarray(X.rows, dtype=np.float64) @ w)

    def whitened_second_moment(self, X):
        """``N = (1/n) Σ_p Ψ_pᵀ Ψ_p = σ² c² L⁻¹ M L⁻ᵀ``, ``M = (1/n) Σ_p G_pᵀ G_p`` the pool moment.

        One chunked pass over ``X``. The mean pool posterior variance is ``tr N``; observing a
        block ``x`` lowers it by ``tr((σ² I + Ψ_x Ψ_xᵀ)⁻¹ Ψ_x N Ψ_xᵀ)`` (pool variance reduction).

        Returns
        -------
        N : ndarray of shape (n_features, n_features)
        """
        X = as_blocks(X)
        N = np.zeros((self.n_features_, self.n_features_))
        for _, psi, _ in self.iter_transform(X):
            N += psi.T @ psi
        return N / max(len(X), 1)


def condition_posterior_features(psi, psi_x, sigma2):
    """Posterior features after also observing block ``x``: ``Ψ ← Ψ Q``.

    With ``Ψ_xᵀ = U S Vᵀ`` (thin SVD), ``Q = I − U diag(1 − σ / √(s² + σ²)) Uᵀ`` is symmetric and
    ``Ψ Q² Ψᵀ = Σ − Σ_·x (Σ_xx + σ² I)⁻¹ Σ_x·``: the rank-``m`` Gaussian conditioning, applied to
    features in ``O(n_rows · d · m)``.

    Parameters
    ----------
    psi : ndarray of shape (n_rows, n_features)
        Current posterior features of the candidates.
    psi_x : ndarray of shape (m, n_features)
        Current posterior features of the observed block.
    sigma2 : float
        Noise variance σ².

    Returns
    -------
    psi_new : ndarray of shape (n_rows, n_features)
    Q : ndarray of shape (n_features, n_features)
        The (symmetric) update matrix, for quantities that transform as ``Qᵀ N Q``.
    """
    U, s, _ = np.linalg.svd(np.asarray(psi_x).T, full_matrices=False)
    shrink = 1.0 - np.sqrt(sigma2) / np.sqrt(s**2 + sigma2)
    Q = np.eye(psi.shape[1]) - (U * shrink) @ U.T
    return psi @ Q, Q


"""Shared base of all selectors: input validation, ``n_to_select``, ``selected_idx_``, ``score``.

Subclasses implement ``fit`` and ``_select(X, candidates, n_to_select)``; the base class owns the
bookkeeping (validate, resolve the budget, record the picks). Chaining selectors (a PV shortlist,
then LCMD on it) is the job of :class:`skntk.pipeline.SelectionPipeline`, which passes indices
between steps, never data.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted, validate_data

from skntk._sklearn_compat import Interval, RealNotInt
from skntk.blocks import FeatureBlocks
from skntk.linalg import chunk_n_rows, gen_structure_chunks
from skntk.selection._scoring import SCORE_SIGMA2, ridge_rmse

__all__ = ["BaseSelector", "resolve_n_to_select", "selection_score", "SCORE_SIGMA2"]


def resolve_n_to_select(n_to_select, n_candidates, *, what="candidates in X"):
    """Turn ``n_to_select`` into a count for ``n_candidates`` candidates.

    Parameters
    ----------
    n_to_select : int, float in (0, 1) or None
        A count; a fraction of the candidates; or ``None`` for half of them (at least one).
    n_candidates : int
    what : str, default="candidates in X"
        How the candidates are named in the error message.

    Returns
    -------
    n : int

    Raises
    ------
    ValueError
        If the value has the wrong type or range, or exceeds the candidates.

    Examples
    --------
    >>> from skntk.selection._base import resolve_n_to_select
    >>> resolve_n_to_select(None, 7), resolve_n_to_select(0.5, 10), resolve_n_to_select(3, 10)
    (3, 5, 3)
    """
    if n_to_select is None:
        n = max(1, n_candidates // 2)
    elif isinstance(n_to_select, Integral) and not isinstance(n_to_select, bool):
        n = int(n_to_select)
        if n < 1:
            raise ValueError(f"n_to_select must be >= 1; got n_to_select={n}.")
    elif isinstance(n_to_select, Real) and 0 < n_to_select < 1:
        n = max(1, int(n_to_select * n_candidates))
    else:
        raise ValueError(
            "n_to_select must be None (half the candidates), an int >= 1 or a float in (0, 1); "
            f"got {n_to_select!r}."
        )
    if n > n_candidates:
        raise ValueError(f"n_to_select={n} exceeds the {n_candidates} {what}.")
    return n


def row_indices(offsets, idx):
    """Row indices of structures ``idx`` (in that order) for block ``offsets``.

    Examples
    --------
    >>> import numpy as np
    >>> from skntk.selection._base import row_indices
    >>> row_indices(np.array([0, 1, 4, 6]), np.array([2, 0])).tolist()
    [4, 5, 0]
    """
    idx = np.asarray(idx, dtype=np.int64)
    starts, m = offsets[idx], offsets[idx + 1] - offsets[idx]
    new = np.concatenate([[0], np.cumsum(m)]).astype(np.int64)
    return np.repeat(starts - new[:-1], m) + np.arange(new[-1])


def _targets_as_rows(X, y):
    """Rows with one target each: ``(FeatureBlocks, y_rows)`` from structures and their targets.

    ``y`` is one float per structure (energies; for joint blocks only the energy rows are used) or a
    sequence of per-structure arrays with one target per row (energies and forces, eV and eV/Å).
    """
    n = len(X)
    m = X.n_rows_per_structure
    y_arr = np.asarray(y, dtype=object) if not isinstance(y, np.ndarray) else y
    if y_arr.dtype != object and y_arr.ndim == 1:
        if y_arr.shape[0] != n:
            raise ValueError(f"y has {y_arr.shape[0]} values; X has {n} structures.")
        y_num = y_arr.astype(np.float64)
        if np.all(m == 1):
            return X, y_num
        if X.kind == "joint":
            rows = X.rows[X.offsets[:-1]]
            return FeatureBlocks(rows, np.arange(n + 1), kind="energy"), y_num
        raise ValueError(
            f"y has one value per structure but X has multi-row blocks of kind={X.kind!r}; pass "
            "one array of per-row targets per structure."
        )
    if len(y_arr) != n:
        raise ValueError(f"y has {len(y_arr)} entries; X has {n} structures.")
    parts = []
    for i, yi in enumerate(y_arr):
        yi = np.asarray(yi, dtype=np.float64).reshape(-1)
        if yi.shape[0] != m[i]:
            raise ValueError(
                f"y[{i}] has {yi.shape[0]} targets; structure {i} of X has {m[i]} rows."
            )
        parts.append(yi)
    return X, np.concatenate(parts) if parts else np.empty(0)


def selection_score(X, y, selected_idx, *, sigma2=SCORE_SIGMA2, labelled=None):
    """Minus the RMSE on the unselected structures of a ridge model fitted on the selected ones.

    The ridge model is the posterior mean of the linearised GP on the features ``X`` (normalised so
    the mean squared row norm of the fit rows is 1, penalty ``sigma2``), fitted on the selected
    structures (and the ``labelled`` ones, when given). With one target per structure the model has
    an unpenalised intercept (rows and targets centred on the fit means), so adding a constant to
    ``y`` changes nothing. Larger is better; the value measures how informative the selected batch
    is about the rest of ``X`` at a fixed budget, in the units of ``y``.

    Parameters
    ----------
    X : FeatureBlocks
    y : ndarray of shape (n_structures,) or sequence of ndarray of shape (m_i,)
        Per-structure energies (eV), or per-row targets (energies and forces) for each block.
    selected_idx : ndarray of int
    sigma2 : float, default=SCORE_SIGMA2
    labelled : (FeatureBlocks, y) or None, default=None
        Labelled structures fitted together with the selected ones (the pipeline's train set).

    Returns
    -------
    score : float
    """

    Xr, yr = _targets_as_rows(X, y)
    n = len(Xr)
    rest = np.setdiff1d(np.arange(n), selected_idx)
    if rest.size == 0:
        raise ValueError(
            f"score needs unselected structures to evaluate on; all {n} structures were selected "
            "(lower n_to_select)."
        )
    sel_rows = row_indices(Xr.offsets, selected_idx)
    rest_rows = row_indices(Xr.offsets, rest)
    fit_X, fit_y = [np.asarray(Xr.rows[sel_rows], dtype=np.float64)], [yr[sel_rows]]
    if labelled is not None:
        Lr, ly = _targets_as_rows(labelled[0], labelled[1])
        fit_X.insert(0, np.asarray(Lr.rows, dtype=np.float64))
        fit_y.insert(0, ly)
    fit_X, fit_y = np.concatenate(fit_X), np.concatenate(fit_y)
    return ridge_rmse(fit_X, fit_y, Xr.rows[rest_rows], yr[rest_rows], sigma2=sigma2,
                      fit_intercept=_one_target_per_structure(y))


def _one_target_per_structure(y):
    try:
        return np.asarray(y, dtype=np.float64).ndim == 1
    except (TypeError, ValueError):  # ragged per-row targets
        return False


class BaseSelector(BaseEstimator):
    """Base class of skntk selectors (not for direct use).

    Subclasses implement ``fit(X, y=None)`` (call :meth:`_check_X` with ``reset=True``) and
    ``_select(X, candidates, n_to_select) -> indices into X``. :meth:`select` validates ``X``,
    resolves the budget and stores ``selected_idx_``.

    Parameters
    ----------
    n_to_select : int, float or None, default=None
        Default budget of :meth:`select`: a count, a fraction of the candidates, or half of them.
    working_memory : float or None, default=None
        MiB budget for chunked temporaries; ``None`` uses ``sklearn.get_config()``.
    """

    _parameter_constraints: dict = {
        "n_to_select": [Interval(Integral, 1, None, closed="left"),
                        Interval(RealNotInt, 0, 1, closed="neither"), None],
        "working_memory": [Interval(Real, 0, None, closed="neither"), None],
    }

    # -- validation ----------------------------------------------------------------------------
    def _check_X(self, X, *, reset):
        """``X`` as float-valued, finite, non-empty :class:`FeatureBlocks` with the fitted width."""
        name = type(self).__name__
        if not isinstance(X, FeatureBlocks):
            # float32 stays float32 (no pool-sized copy); computations cast chunk by chunk
            X = validate_data(self, X, reset=reset, dtype=(np.float64, np.float32))
            return FeatureBlocks.from_array(X)
        if len(X) == 0:
            raise ValueError(f"X has 0 structures; {name} needs at least one.")
        dtype = X.rows.dtype
        if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
            raise ValueError(f"X rows must be numeric; got dtype {X.rows.dtype}.")
        d = X.n_features
        if reset:
            self.n_features_in_ = d
        elif d != self.n_features_in_:
            raise ValueError(
                f"X has {d} features, but {name} is expecting {self.n_features_in_} features as "
                "input."
            )
        max_rows = chunk_n_rows(max(d, 1), max_n_rows=max(X.n_rows, 1),
                                working_memory=getattr(self, "working_memory", None))
        for sl in gen_structure_chunks(X.offsets, max_rows):
            rows = X.rows[X.offsets[sl.start]:X.offsets[sl.stop]]
            if np.isfinite(np.sum(rows, dtype=np.float64)):
                continue  # fast path: a finite sum means finite entries (no overflow in float64)
            bad = ~np.isfinite(rows)
            if np.any(bad):
                r = int(np.flatnonzero(bad.any(axis=1))[0]) + int(X.offsets[sl.start])
                s = int(np.searchsorted(X.offsets, r, side="right")) - 1
                raise ValueError(f"X contains NaN or infinity: structure {s} (row {r}).")
        return X

    # -- selection -----------------------------------------------------------------------------
    def select(self, X, n_to_select=None):
        """Pick structures of ``X`` to label next.

        Parameters
        ----------
        X : FeatureBlocks or array-like of shape (n_structures, n_features)
            Candidate pool.
        n_to_select : int, float or None, default=None
            Overrides the ``n_to_select`` parameter for this call.

        Returns
        -------
        selected_idx : ndarray of int of shape (n_to_select,)
            Indices into ``X`` in selection order (also stored as ``selected_idx_``).
        """
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        candidates = np.arange(len(X))
        n_cand, what = self._n_candidates(len(candidates))
        n = resolve_n_to_select(self.n_to_select if n_to_select is None else n_to_select,
                                n_cand, what=what)
        idx = np.asarray(self._select(X, candidates, n), dtype=np.int64)
        self.selected_idx_ = idx
        return idx

    def _n_candidates(self, n_candidates):
        """``(count, description)`` of the candidates a budget is resolved against."""
        return n_candidates, "candidates in X"

    def _select(self, X, candidates, n_to_select):  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, X, y):
        """Selection quality at the fixed budget ``n_to_select`` (one float, larger is better).

        Selects from ``X``, fits the linearised-GP / ridge posterior mean on the selected
        structures' features and targets (centred when there is one target per structure, so a
        constant offset in ``y`` changes nothing), and returns minus the RMSE on the unselected
        rest of ``X`` in the units of ``y`` (see :func:`selection_score`). Usable as the
        objective of ``GridSearchCV``. For the linearised fine-tuning error of a pretrained
        model, score a :class:`~skntk.pipeline.SelectionPipeline` on ``ase.Atoms`` instead.

        Parameters
        ----------
        X : FeatureBlocks or array-like of shape (n_structures, n_features)
        y : ndarray of shape (n_structures,) or sequence of per-structure arrays
            Energies (eV) per structure, or per-row targets for each block (energy and forces).

        Returns
        -------
        score : float
        """
        idx = self.select(X)
        return selection_score(self._check_X(X, reset=False), y, idx)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = False
        return tags

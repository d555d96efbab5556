"""Pipelines whose last step is a selector: ``fit(X_labelled)``, then ``select(X_pool)``.

:class:`SelectionPipeline` is a :class:`sklearn.pipeline.Pipeline` that also exposes
``select(X, n_to_select)`` when its final step has one, and scores a selection on the features of
the upstream (non-selector) steps so that ``GridSearchCV`` can compare settings of the selectors.
:func:`make_pv_lcmd_pipeline` builds the paper's chain: posterior-variance screen of the whole pool
→ top-M shortlist → LCMD on the shortlist in posterior feature space, with the train set as centres.
"""

from __future__ import annotations

from sklearn.pipeline import Pipeline
from sklearn.utils.metaestimators import available_if

from skntk.blocks import as_blocks
from skntk.selection._base import BaseSelector, selection_score
from skntk.selection.lcmd import LCMDSelector
from skntk.selection.pv import ChunkedPosteriorVarianceSelector

__all__ = ["SelectionPipeline", "make_pv_lcmd_pipeline"]


def _final_estimator_has(attr):
    def check(self):
        return hasattr(self._final_estimator, attr)

    return check


class SelectionPipeline(Pipeline):
    """A :class:`~sklearn.pipeline.Pipeline` ending in a selector, with :meth:`select`.

    ``fit(X_labelled)`` fits every step on the labelled structures (a PV step then hands the
    posterior features of the train set to the next selector, which uses them as centres);
    ``select(X_pool)`` transforms the pool through all steps but the last (a PV step with
    ``shortlist_size`` carries its shortlist) and lets the final selector pick.

    Parameters
    ----------
    steps : list of (str, estimator) tuples
        Transformers (any upstream featuriser, then selectors with ``transform``), last a selector.
    memory, transform_input, verbose
        As for :class:`~sklearn.pipeline.Pipeline`.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skntk.pipeline import SelectionPipeline
    >>> from skntk.selection.baselines import MaxDistSelector
    >>> rng = np.random.default_rng(0)
    >>> pipe = SelectionPipeline([("scale", StandardScaler()),
    ...                           ("maxdist", MaxDistSelector(n_to_select=4))])
    >>> pipe.fit(rng.normal(size=(20, 3))).select(rng.normal(size=(50, 3))).shape
    (4,)
    """

    @available_if(_final_estimator_has("select"))
    def select(self, X, n_to_select=None):
        """Transform ``X`` through all but the last step and select with the last.

        Parameters
        ----------
        X : any input the first step accepts (e.g. list of ase.Atoms, arrays, FeatureBlocks)
            Candidate pool.
        n_to_select : int, float or None, default=None
            Overrides the final selector's ``n_to_select``.

        Returns
        -------
        selected_idx : ndarray of int of shape (n_to_select,)
            Indices into ``X`` in selection order.
        """
        _, Xt = self._transform_for_final(X)
        return self._final_estimator.select(Xt, n_to_select)

    def _transform_for_final(self, X):
        """``(upstream, Xt)``: ``X`` after the steps before the first selector, and after all but
        the last step (each step runs once)."""
        Xt, upstream = X, None
        for _, _, step in self._iter(with_final=False):
            if upstream is None and isinstance(step, BaseSelector):
                upstream = Xt
            Xt = step.transform(Xt)
        return (Xt if upstream is None else upstream), Xt

    @property
    def selected_idx_(self):
        """Indices picked by the last :meth:`select` (the final step's ``selected_idx_``)."""
        return self._final_estimator.selected_idx_

    @available_if(_final_estimator_has("select"))
    def score(self, X, y=None, **params):
        """Selection quality at the final step's budget (one float, larger is better).

        Selects from ``X`` and returns minus the RMSE on the unselected structures of a ridge /
        linearised-GP mean fitted on the selected ones, computed on the *upstream* features (the
        output of the steps before the first selector). The yardstick therefore does not change
        with the selectors' own parameters (σ², reduction, shortlist size, kernel), which is what
        ``GridSearchCV`` needs to compare them.

        Parameters
        ----------
        X : any input the first step accepts
        y : ndarray of shape (n_structures,) or sequence of per-structure arrays
            Energies (eV), or per-row targets for each block (energies and forces).

        Returns
        -------
        score : float
        """
        if y is None:
            raise ValueError("SelectionPipeline.score needs targets y for the structures in X.")
        upstream, Xt = self._transform_for_final(X)
        idx = self._final_estimator.select(Xt)
        return selection_score(as_blocks(upstream), y, idx)


def make_pv_lcmd_pipeline(transformer=None, *, n_to_select=None, shortlist_size=None,
                          sigma2=1e-3, normalize=True, reduction="trace", criterion="variance",
                          kernel="auto", gram_features="auto", n_sketch_features=1024,
                          random_state=None, working_memory=None):
    """The paper's selection chain: PV screen → top-M shortlist → LCMD in posterior space.

    Parameters
    ----------
    transformer : estimator or None, default=None
        Upstream featuriser (e.g. an NTK transformer turning ``list[ase.Atoms]`` into
        ``FeatureBlocks``); ``None`` when the inputs already are features.
    n_to_select : int, float or None, default=None
        Batch size ``B`` chosen by LCMD.
    shortlist_size : int or None, default=None
        Size ``M`` of the PV shortlist handed to LCMD (``None``: LCMD sees the whole pool).
    sigma2, normalize, reduction, criterion
        Of the :class:`~skntk.selection.pv.ChunkedPosteriorVarianceSelector` step ``"pv"``.
    kernel, gram_features, n_sketch_features, random_state
        Of the :class:`~skntk.selection.lcmd.LCMDSelector` step ``"lcmd"``.
    working_memory : float or None, default=None
        MiB budget of both selector steps.

    Returns
    -------
    pipe : SelectionPipeline
        Steps ``[("features", transformer)]`` (if given), ``("pv", ...)``, ``("lcmd", ...)``.

    Examples
    --------
    >>> import numpy as np
    >>> from skntk.pipeline import make_pv_lcmd_pipeline
    >>> rng = np.random.default_rng(0)
    >>> pipe = make_pv_lcmd_pipeline(n_to_select=5, shortlist_size=40)
    >>> pool = rng.normal(size=(200, 4))
    >>> idx = pipe.fit(rng.normal(size=(30, 4))).select(pool)
    >>> shortlist = pipe["pv"].transform(pool).shortlist
    >>> len(set(idx.tolist())), set(idx.tolist()) <= set(shortlist.tolist())
    (5, True)
    """
    steps = [] if transformer is None else [("features", transformer)]
    steps.append(("pv", ChunkedPosteriorVarianceSelector(
        sigma2, normalize=normalize, reduction=reduction, criterion=criterion,
        shortlist_size=shortlist_size, working_memory=working_memory)))
    steps.append(("lcmd", LCMDSelector(
        n_to_select, kernel=kernel, gram_features=gram_features,
        n_sketch_features=n_sketch_features, random_state=random_state,
        working_memory=working_memory)))
    return SelectionPipeline(steps)

"""Pipelines whose last step is a selector: ``fit(X_labelled)``, then ``select(X_pool)``.

:class:`SelectionPipeline` is a :class:`sklearn.pipeline.Pipeline` that also exposes
``select(X, n_to_select)`` when its final step has one, and scores a selection on the features of
the upstream (non-selector) steps so that ``GridSearchCV`` can compare settings of the selectors.
:func:`make_pv_lcmd_pipeline` builds the paper's chain: posterior-variance screen of the whole pool
→ top-M shortlist → LCMD on the shortlist in posterior feature space, with the train set as centres.
"""

from __future__ import annotations

import os
import time
import warnings
from numbers import Integral

import numpy as np
from ase import Atoms
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from sklearn.utils import check_random_state
from sklearn.utils.metaestimators import available_if

from skntk._sklearn_compat import pipeline_steps
from skntk.blocks import FeatureBlocks, FeatureData, as_blocks
from skntk.selection._base import BaseSelector, resolve_n_to_select, selection_score
from skntk.selection.lcmd import LCMDSelector
from skntk.selection.pv import ChunkedPosteriorVarianceSelector

__all__ = ["SelectionPipeline", "make_pv_lcmd_pipeline", "default_shortlist_size",
           "MIN_SHORTLIST_SIZE"]

#: The least PV shortlist size M of :func:`default_shortlist_size` (and M when the batch size is
#: not known in advance).
MIN_SHORTLIST_SIZE = 50


def default_shortlist_size(n_to_select=None) -> int:
    """PV shortlist size M for a batch of ``n_to_select``: ``max(5 B, 50)``.

    The command line's default (``skntk select --shortlist``). Without a batch size (the
    active-learning configs, whose loop sets B each round) it is :data:`MIN_SHORTLIST_SIZE`.
    :func:`make_pv_lcmd_pipeline` itself has no shortlist unless one is given: LCMD then sees
    the whole pool.

    Parameters
    ----------
    n_to_select : int or None, default=None
        Batch size B.

    Returns
    -------
    M : int
    """
    if n_to_select is None:
        return MIN_SHORTLIST_SIZE
    return max(5 * int(n_to_select), MIN_SHORTLIST_SIZE)


def _final_estimator_has(attr):
    def check(self):
        return hasattr(self._final_estimator, attr)

    return check


def _is_atoms_input(X):
    """Whether ``X`` is one ``ase.Atoms`` or a list/tuple of them."""
    if isinstance(X, Atoms):
        return True
    return isinstance(X, (list, tuple)) and len(X) > 0 and isinstance(X[0], Atoms)


def _is_features(X):
    """Whether ``X`` already is features: an array, FeatureBlocks or cached PoolFeatures."""
    return isinstance(X, (np.ndarray, FeatureData))


def _reiterable(X):
    """Whether ``X`` can be passed to the steps again (not a one-shot iterator)."""
    try:
        return iter(X) is not X
    except TypeError:
        return True


def duplicates_message(n_dup: int) -> str:
    """The warning about ``n_dup`` repeated pool structures (the pipeline's and the CLI's)."""
    return (f"pool has {n_dup} duplicate structures (same numbers, cell and pbc, positions up to "
            f"wrapping and translation); each is a candidate once.")


def labelled_duplicates_message(n_lab: int, n_pool: int, names) -> str:
    """The warning about pool structures that duplicate labelled ones (never candidates)."""
    names = list(names)
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (f"{n_lab} of the {n_pool} pool structures duplicate labelled structures (up to "
            f"wrapping and translation): {shown}; they are never candidates.")


def _labelled_index(atoms):
    """:class:`skntk.io.DuplicateIndex` of the labelled structures (``None`` for none)."""
    from skntk.io import DuplicateIndex

    if not atoms:
        return None
    index = DuplicateIndex()
    for a in atoms:
        index.add(a)
    return index


def _deduplicate(X, labelled=None):
    """``(X, first)``: a list of ``ase.Atoms`` without repeated structures (up to wrapping and
    translation) and without copies of labelled ones (``labelled``: a DuplicateIndex), and the
    pool indices of the structures kept (``None`` when ``X`` is not Atoms or nothing was set
    aside)."""
    if not _is_atoms_input(X) or isinstance(X, Atoms):
        return X, None
    from skntk.atoms import _label, validate_structures
    from skntk.io import DuplicateIndex, duplicate_signature

    X = validate_structures(X)  # named by their index in the pool as given, before any copy
    # is set aside ("X[1] is a str, not an ase.Atoms.", "X[4] (H2O) has non-finite positions")
    sigs = [duplicate_signature(a) for a in X]
    seen, first = DuplicateIndex(), []
    for i, sig in enumerate(sigs):
        if seen.add(sig) == len(first):  # a new structure
            first.append(i)
    first = np.asarray(first, dtype=np.int64)
    n_dup = len(X) - len(first)
    _warn_duplicates(len(first), len(X))
    of_labelled = [] if labelled is None else [
        i for i, sig in enumerate(sigs) if labelled.find(sig) is not None]
    if of_labelled:
        warnings.warn(labelled_duplicates_message(
            len(of_labelled), len(X), (_label(X[i], i, "X") for i in of_labelled)),
            UserWarning, stacklevel=3)
        first = np.setdiff1d(first, of_labelled)
        if first.size == 0:
            raise ValueError(f"every one of the {len(X)} pool structures duplicates a labelled "
                             f"structure: nothing is left to select.")
    if n_dup == 0 and not of_labelled:
        return X, None
    return [X[i] for i in first], first


def _drop_labelled(feats, labelled):
    """``feats`` (PoolFeatures) without the structures that duplicate labelled ones
    (``labelled``: a DuplicateIndex or None)."""
    if labelled is None or feats.duplicate_signatures is None:
        return feats
    lab = [i for i, sig in enumerate(feats.duplicate_signatures)
           if labelled.find(sig) is not None]
    if not lab:
        return feats
    positions = np.flatnonzero(np.isin(feats.inverse, lab))
    warnings.warn(labelled_duplicates_message(len(positions), feats.n_pool,
                                              (f"X[{i}]" for i in positions)),
                  UserWarning, stacklevel=4)
    keep = np.setdiff1d(np.arange(len(feats)), lab)
    if keep.size == 0:
        raise ValueError(f"every one of the {feats.n_pool} pool structures duplicates a labelled "
                         f"structure: nothing is left to select.")
    return feats.subset(keep)


def _warn_duplicates(n_unique, n_pool):
    """The one warning about repeated pool structures (none when there are none)."""
    n_dup = n_pool - n_unique
    if n_dup:
        warnings.warn(duplicates_message(n_dup), UserWarning, stacklevel=4)


def _check_budget(budget, feats, cands):
    """Refuse an int ``budget`` above the distinct candidates ``cands`` (PoolFeatures of the pool
    ``feats`` less the copies of labelled structures), naming the copies set aside."""
    if not isinstance(budget, Integral) or isinstance(budget, bool) or budget <= len(cands):
        return
    n_dup, n_lab = feats.n_pool - len(feats), len(feats) - len(cands)
    raise ValueError(f"n_to_select={budget} exceeds the {len(cands)} distinct pool structures "
                     f"({n_dup} of the {feats.n_pool} are duplicates"
                     + (f", {n_lab} duplicate labelled ones" if n_lab else "") + ").")


def _index(X, idx):
    """Rows ``idx`` of arrays / FeatureBlocks, items of sequences."""
    if isinstance(X, (np.ndarray, FeatureBlocks)):
        return X[idx]
    if hasattr(X, "iloc"):
        return X.iloc[idx]
    return [X[i] for i in idx]


def _index_targets(y, idx):
    """Targets of structures ``idx``: one float each, or one array of per-row targets each."""
    try:
        return np.asarray(y, dtype=np.float64)[idx]
    except ValueError:  # ragged per-row targets
        return [y[i] for i in idx]


def _atoms_labels(atoms, y, *, required=True, name="X"):
    """``(energies, forces)`` of ``atoms``: ``y`` (eV) if given, else the stored labels; forces
    from the stored labels (entries None where missing). Without ``y``, structures with no energy
    label raise (``required``) or give ``None``. A non-finite label, stored or in ``y``, raises
    naming the structure (a NaN would make the score NaN, silently)."""
    from skntk.io import get_labels, label_problem

    try:
        energies, forces = get_labels(atoms, name=name, finite=False)
    except ValueError:  # a structure without a label
        if y is None:
            if required:
                raise
            return None
        energies, forces = None, [None] * len(atoms)
    if y is not None:  # y replaces the stored energies; their forces are still used
        energies = np.asarray(y, dtype=np.float64).reshape(-1)
        if energies.shape[0] != len(atoms):
            raise ValueError(f"y has {energies.shape[0]} energies; X has {len(atoms)} structures.")
        bad = np.flatnonzero(~np.isfinite(energies))
        if bad.size:
            raise ValueError(f"y[{bad[0]}] is {energies[bad[0]]}; energies must be finite "
                             f"({bad.size} non-finite).")
    for i, (a, e, f) in enumerate(zip(atoms, energies, forces, strict=True)):
        problem = label_problem(a, e, f)  # the check every label passes (io)
        if problem is not None:
            raise ValueError(f"{name}[{i}] ({a.get_chemical_formula()}) {problem}.")
    return energies, forces


class SelectionPipeline(Pipeline):
    """A :class:`~sklearn.pipeline.Pipeline` ending in a selector, with :meth:`select`.

    ``fit(X_labelled)`` fits every step on the labelled structures (a PV step then hands the
    posterior features of the train set to the next selector, which uses them as centres);
    ``select(X_pool)`` featurises the pool and chains the selector steps by indices (a PV step
    with ``shortlist_size`` passes its streamed top-M on; the next step sees only those) until
    the final selector picks. :meth:`score`
    turns a selection into one number for ``GridSearchCV``: by default the error of linearised
    fine-tuning on the labelled structures plus the selected ones, on the rest of the pool.

    Parameters
    ----------
    steps : list of (str, estimator) tuples
        Transformers (any upstream featuriser, then selectors with ``transform``), last a selector.
    scoring : callable or None, default=None
        Objective of :meth:`score`. ``None``: linearised fine-tuning (see :meth:`score`). A
        callable ``scoring(train_atoms, rest_atoms) -> float`` (larger is better) gets the
        labelled structures given to ``fit`` followed by the selected pool structures, and the
        unselected pool structures; e.g. real fine-tuning for small searches::

            from skntk.finetune import MLIPRegressor
            scoring = lambda train, rest: MLIPRegressor(model, epochs=30,
                                                        random_state=0).fit(train).score(rest)
    feature_cache : str, os.PathLike or None, default=None
        Directory of the content-addressed feature cache (:mod:`skntk.cache`). When set,
        :meth:`select` featurises an Atoms pool into it in shards (resumable: a rerun computes
        only what is missing) and streams the shards, so memory is flat in the pool size; the
        final step loads only the shortlisted rows.
    n_jobs : int or None, default=None
        Featurisation workers with ``feature_cache`` (joblib; inside
        ``joblib.parallel_config(backend="dask")`` they run on a Dask cluster).
    scheduler_address : str or None, default=None
        With ``feature_cache``: featurise on the ``dask.distributed`` scheduler at this address.
    progress_bar : bool, default=False
        With ``feature_cache``: a tqdm bar over the featurised pool.
    error_prefix : str or None, default=None
        With ``feature_cache``: prefixed to errors about the pool source (the command line's
        ``"--pool"``).
    memory, transform_input, verbose
        As for :class:`~sklearn.pipeline.Pipeline`.

    Attributes
    ----------
    selected_idx_ : ndarray of int
        Indices into the pool of the last :meth:`select`.
    pool_index_ : ndarray of int or None
        Pool index of each candidate when duplicates were set aside (``None``: none were).
    pool_features_ : PoolFeatures or None
        With ``feature_cache`` and a pool of Atoms: the features of the pool's distinct
        structures (copies of labelled ones included) in the cache, read on demand; ``None``
        otherwise.
    timings_ : dict of str to float
        Seconds of the last :meth:`select`: ``"features"`` (the steps before the first
        selector), then one entry per later step, by name.

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

    def __init__(self, steps, *, scoring=None, feature_cache=None, n_jobs=None,
                 scheduler_address=None, progress_bar=False, error_prefix=None,
                 transform_input=None, memory=None, verbose=False):
        super().__init__(steps, transform_input=transform_input, memory=memory, verbose=verbose)
        self.scoring = scoring
        self.feature_cache = feature_cache
        self.n_jobs = n_jobs
        self.scheduler_address = scheduler_address
        self.progress_bar = progress_bar
        self.error_prefix = error_prefix

    def fit(self, X, y=None, **params):
        """Fit every step on the labelled ``X`` (as :meth:`Pipeline.fit`).

        ``X`` and ``y`` are also remembered (by reference) for :meth:`score`, which fits the
        linearised fine-tuning model on them together with the selected structures.

        Parameters
        ----------
        X : any input the first step accepts (e.g. list of ase.Atoms, arrays, FeatureBlocks)
            Labelled structures. Features (arrays, FeatureBlocks) given to a pipeline whose
            featuriser is fitted (holds a ``model_``) fit only the selector steps: the
            featuriser is kept as it is.
        y : array-like of shape (n_structures,) or None, default=None
            Energies (eV) or targets; ``None`` for Atoms uses their stored labels in :meth:`score`.
        **params
            Routed as :meth:`sklearn.pipeline.Pipeline.fit` does.

        Returns
        -------
        self : SelectionPipeline
        """
        n_upstream = len(self._upstream_steps()) if self._skips_featuriser(X) else 0
        if n_upstream:
            self[n_upstream:].fit(X, y, **params)  # the same step objects, fitted in place
        else:
            super().fit(X, y, **params)
        self._labelled = (X, y) if _reiterable(X) else None
        return self

    def _skips_featuriser(self, X):
        """Whether ``X`` already is the output of the fitted featuriser (so it is not applied)."""
        return _is_features(X) and self._model_step() is not None

    @available_if(_final_estimator_has("select"))
    def select(self, X, n_to_select=None):
        """Pick structures of the pool ``X``: selector steps chained by indices.

        ``X`` goes through the steps before the first selector (the featuriser); then every
        selector step but the last picks candidates (a PV step: its streamed top-M,
        :meth:`~skntk.selection.pv.ChunkedPosteriorVarianceSelector.shortlist`; any other
        selector: its ``select``), the next step sees only those candidates, transformed by the
        step that picked them, and the last step picks the batch. Indices map back to ``X``.
        No step holds more than the shortlist's transformed rows.

        Parameters
        ----------
        X : any input the first step accepts, or a pool source
            Candidate pool: arrays, FeatureBlocks, a list of ase.Atoms, or (with a featuriser
            first) an extxyz / ASE-readable path, an ``ase.db``, a glob pattern or an iterator
            of Atoms. With ``feature_cache`` set, an Atoms pool is featurised into that cache
            shard by shard (:func:`skntk.parallel.featurize`, ``n_jobs`` workers) and streamed
            from it: memory stays flat in the pool size. Features given to a pipeline whose
            featuriser is fitted go to the selectors as they are.
        n_to_select : int, float or None, default=None
            Overrides the final selector's ``n_to_select``.

        Returns
        -------
        selected_idx : ndarray of int of shape (n_to_select,)
            Indices into ``X`` in selection order (also ``selected_idx_``).

        Notes
        -----
        A pool of ``ase.Atoms`` is deduplicated first (same atomic numbers, cell and pbc,
        positions up to wrapping and a global translation: :class:`skntk.io.DuplicateIndex`): only
        the first copy of a structure is a candidate, a ``UserWarning`` says how many copies were
        set aside, and the indices returned point into the original ``X``. A batch never holds
        two copies of one structure. Pool structures that duplicate the labelled Atoms given to
        :meth:`fit` are never candidates (one ``UserWarning`` names them). With
        ``feature_cache``, an int ``n_to_select`` above the distinct candidates is refused
        before any selector runs, naming the copies set aside.
        """
        idx, _ = self._select_chain(X, n_to_select)
        return idx

    def _featurise_pool(self, X, n_to_select=None):
        """``(upstream features, pool index of each candidate or None)`` of the pool ``X``."""
        upstream_steps = self._upstream_steps()
        model_step = self._model_step()
        self.pool_features_ = None
        is_source = isinstance(X, (str, os.PathLike)) or _is_atoms_input(X) or (
            model_step is not None and not _is_features(X))
        if self.feature_cache is not None and upstream_steps and is_source:
            if len(upstream_steps) != 1:
                raise ValueError("feature_cache needs the featuriser to be the only step before "
                                 f"the first selector; got {len(upstream_steps)} steps.")
            feats = self._featurize_cached(upstream_steps[0], X)
            _warn_duplicates(len(feats), feats.n_pool)
            cands = _drop_labelled(feats, self._labelled_index())
            _check_budget(getattr(self._final_estimator, "n_to_select", None)
                          if n_to_select is None else n_to_select, feats, cands)
            self.pool_features_ = feats
            return cands, (None if len(cands) == cands.n_pool else cands.pool_index)
        if model_step is not None and is_source and not _is_atoms_input(X):
            from skntk.io import read_structures

            X = read_structures(X)  # a file, glob or iterator: read once, deduplicated below
        X, first = _deduplicate(X, self._labelled_index() if _is_atoms_input(X) else None)
        return self._upstream_transform(X), first

    def _featurize_cached(self, featurizer, X):
        """:func:`skntk.parallel.featurize` of the pool ``X`` into ``feature_cache``."""
        from skntk.parallel import featurize

        return featurize(featurizer, X, self.feature_cache, n_jobs=self.n_jobs,
                         scheduler_address=self.scheduler_address,
                         progress_bar=self.progress_bar, error_prefix=self.error_prefix)

    def _labelled_index(self):
        """DuplicateIndex of the labelled Atoms given to :meth:`fit` (None for features)."""
        return _labelled_index(self._labelled_atoms())

    def _select_chain(self, X, n_to_select=None):
        """``(indices into X, upstream features)`` of a selection (see :meth:`select`)."""
        t = time.perf_counter()
        upstream, first = self._featurise_pool(X, n_to_select)
        timings = {"features": time.perf_counter() - t}
        Xt, cand = upstream, None  # cand: indices into upstream of the rows Xt holds
        started, narrowed_by = False, None
        for _, name, step in pipeline_steps(self, with_final=False):
            if not started and not isinstance(step, BaseSelector):
                continue  # upstream steps: already applied
            started = True
            t = time.perf_counter()
            if isinstance(step, BaseSelector):
                local = np.asarray(step.shortlist(Xt) if hasattr(step, "shortlist")
                                   else step.select(Xt), dtype=np.int64)
                if not (local.size == len(Xt) and np.array_equal(local, np.arange(len(Xt)))):
                    cand = local if cand is None else cand[local]
                    narrowed_by = name
                    Xt = Xt.take(local) if isinstance(Xt, FeatureData) else _index(Xt, local)
            if isinstance(Xt, FeatureData):  # in memory (a cached pool no selector narrowed)
                Xt = Xt.to_blocks()
            Xt = step.transform(Xt)
            timings[name] = time.perf_counter() - t
        final_name = self.steps[-1][0]
        t = time.perf_counter()
        if isinstance(Xt, FeatureData) and not hasattr(self._final_estimator, "shortlist"):
            Xt = Xt.to_blocks()  # a lazy pool into a selector that cannot stream
        if cand is not None:  # a budget above the shortlist: say where the candidates went
            budget = self._final_estimator.n_to_select if n_to_select is None else n_to_select
            resolve_n_to_select(budget, len(cand), what=(
                f"candidates left by step {narrowed_by!r} (the pool holds {len(upstream)} "
                f"structures)"))
        idx = np.asarray(self._final_estimator.select(Xt, n_to_select), dtype=np.int64)
        timings[final_name] = time.perf_counter() - t
        self.timings_ = timings
        if cand is not None:
            idx = cand[idx]
        if first is not None:
            idx = np.asarray(first)[idx]
        self.selected_idx_ = idx
        self.pool_index_ = first
        return idx, upstream

    def _upstream_steps(self):
        """The fitted steps before the first selector."""
        out = []
        for _, _, step in pipeline_steps(self, with_final=False):
            if isinstance(step, BaseSelector):
                break
            out.append(step)
        return out

    def _upstream_transform(self, X):
        if self._skips_featuriser(X):
            return X
        for step in self._upstream_steps():
            X = step.transform(X)
        return X

    @available_if(_final_estimator_has("select"))
    def score(self, X, y=None, **params):
        """Selection quality at the final step's budget (one float, larger is better).

        Selects from the pool ``X``, then evaluates the batch on the unselected rest of ``X``:

        - **Atoms** (the default objective, *linearised fine-tuning*): minus the RMSE on the
          unselected structures of the pretrained model fine-tuned to first order on the labelled
          structures given to :meth:`fit` plus the selected ones — a ridge / linearised-GP mean on
          the upstream features (the NTK rows) fitted to the residuals ``y − f(θ₀)`` of the
          featuriser's model, after per-element composition offsets refitted on labelled ∪
          selected (:mod:`skntk.selection._scoring`). Units: eV/atom for energy rows of a
          ``normalize="atoms"`` featuriser, eV/Å for force components of exact force/joint rows,
          pooled row by row. Labels come from the structures (``skntk.io.get_labels``); ``y``,
          when given, replaces their energies. Invariant to a constant per-atom shift of the
          energies or to any per-element reference.
        - **Arrays / FeatureBlocks**: minus the RMSE (units of ``y``) of a ridge on the upstream
          features fitted on the labelled (when :meth:`fit` had ``y``) and selected structures,
          targets centred on their mean (:func:`~skntk.selection._base.selection_score`).
        - ``scoring=callable``: ``scoring(labelled + selected atoms, rest atoms)``.

        The yardstick uses the *upstream* features (the output of the steps before the first
        selector), so it does not change with the selectors' own parameters (σ², reduction,
        shortlist size, kernel), which is what ``GridSearchCV`` needs to compare them.

        Parameters
        ----------
        X : any input the first step accepts
            A pool with labels.
        y : ndarray of shape (n_structures,) or sequence of per-structure arrays, or None
            Energies (eV), or per-row targets for each block (arrays only); ``None`` for Atoms
            uses their stored labels.

        Returns
        -------
        score : float
        """
        atoms_in = _is_atoms_input(X) or (
            not isinstance(X, (np.ndarray, FeatureBlocks)) and self._model_step() is not None)
        if atoms_in:
            from skntk.atoms import as_atoms_list

            X = as_atoms_list(X)
        if self.scoring is not None:
            if not atoms_in:
                raise ValueError("scoring=callable needs a pool of ase.Atoms.")
            idx = self.select(X)
            rest = np.setdiff1d(np.arange(len(X)), idx)
            lab = self._labelled_atoms()
            train = (lab or []) + [X[i] for i in idx]
            return float(self.scoring(train, [X[i] for i in rest]))
        idx, upstream = self._select_chain(X)
        if isinstance(upstream, FeatureData):  # features streamed from the cache: the yardstick
            upstream = upstream.to_blocks()  # needs them all
        if self.pool_index_ is not None:  # duplicates set aside: score on the distinct ones
            X = [X[i] for i in self.pool_index_] if atoms_in else _index(X, self.pool_index_)
            y = None if y is None else _index_targets(y, self.pool_index_)
            idx = np.searchsorted(self.pool_index_, idx)
        if atoms_in:
            return self._linearised_score(X, as_blocks(upstream), y, idx)
        if y is None:
            raise ValueError("SelectionPipeline.score needs targets y for the structures in X.")
        labelled = None
        lab = getattr(self, "_labelled", None)
        if lab is not None and lab[1] is not None:
            labelled = (as_blocks(self._upstream_transform(lab[0])), lab[1])
        return selection_score(as_blocks(upstream), y, idx, labelled=labelled)

    def _model_step(self):
        """The first upstream step holding an MLIP handle (``model_``), or None."""
        for step in self._upstream_steps():
            if getattr(step, "model_", None) is not None:
                return step
        return None

    def _labelled_atoms(self):
        lab = getattr(self, "_labelled", None)
        if lab is None or not (_is_atoms_input(lab[0]) or isinstance(lab[0], str)):
            return None
        from skntk.atoms import as_atoms_list

        return as_atoms_list(lab[0])

    def _linearised_score(self, atoms, upstream, y, idx):
        from skntk.selection._scoring import linearised_finetune_score

        step = self._model_step()
        pool_labels = _atoms_labels(atoms, y)  # no label: the error names the structure
        lab_atoms = self._labelled_atoms()
        lab_labels = lab_blocks = None
        if lab_atoms:
            lab_labels = _atoms_labels(lab_atoms, self._labelled[1], required=False,
                                       name="labelled")
            if lab_labels is not None:
                lab_blocks = as_blocks(self._upstream_transform(lab_atoms))
            else:
                warnings.warn(f"score: the {len(lab_atoms)} structures given to fit have no energy "
                              "labels; the yardstick is fitted on the selected structures only.",
                              UserWarning, stacklevel=3)

        def predict(structures):
            if step is None or structures is None:
                return None
            return _model_predictions(step.model_, structures,
                                      device=getattr(step, "device_", "cpu"),
                                      batch_size=getattr(step, "batch_size", 16))

        return linearised_finetune_score(
            lab_blocks, lab_atoms, lab_labels, upstream, atoms, pool_labels, idx,
            lab_pred=predict(lab_atoms if lab_blocks is not None else None),
            pool_pred=predict(atoms),
            per_atom=getattr(step, "normalize", "atoms") == "atoms",
            kind_hint=getattr(step, "kind", None))


def _model_predictions(model, atoms, *, device="cpu", batch_size=16):
    """Energies (eV) and forces (eV/Å) of the MLIP handle ``model`` in eval mode on ``device``
    (:func:`skntk.finetune.predict_energies_forces` with the network's state restored after).

    Returns
    -------
    energies : ndarray of shape (n_structures,)
    forces : list of ndarray of shape (n_atoms_i, 3)
    """
    from skntk.models.base import module_state
    from skntk.models.predict import predict_energies_forces

    with module_state(model.module, device=device, train=False):
        return predict_energies_forces(model, list(atoms), batch_size=batch_size, device=device)


def _seed_of(random_state):
    """One int seed for every step: ``None`` → 0, an int as is, a RandomState → one draw."""
    if random_state is None:
        return 0
    if isinstance(random_state, Integral) and not isinstance(random_state, bool):
        if not 0 <= random_state < 2**32:
            raise ValueError(f"The 'random_state' parameter of make_pv_lcmd_pipeline must be an "
                             f"int in [0, {2**32 - 1}], a RandomState instance or None. Got "
                             f"{random_state!r} instead.")
        return int(random_state)
    if not isinstance(random_state, np.random.RandomState):
        raise ValueError(f"The 'random_state' parameter of make_pv_lcmd_pipeline must be an int in "
                         f"[0, {2**32 - 1}], a RandomState instance or None. Got "
                         f"{random_state!r} instead.")
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


def _seeded(transformer, seed):
    """``transformer`` with every ``random_state`` parameter that is ``None`` set to ``seed``
    (a clone when something changes; the caller's object is left alone)."""
    if not hasattr(transformer, "get_params"):
        return transformer
    unset = {k: seed for k, v in transformer.get_params(deep=True).items()
             if (k == "random_state" or k.endswith("__random_state")) and v is None}
    if not unset:
        return transformer
    return clone(transformer).set_params(**unset)


def make_pv_lcmd_pipeline(transformer=None, *, n_to_select=None, shortlist_size=None,
                          sigma2=1e-3, normalize=True, reduction="trace", criterion="variance",
                          kernel="auto", gram_features="auto", n_sketch_features=1024,
                          random_state=None, working_memory=None, scoring=None,
                          progress_bar=False, device=None, feature_cache=None, n_jobs=None,
                          scheduler_address=None, error_prefix=None):
    """The paper's selection chain: PV screen → top-M shortlist → LCMD in posterior space.

    Reproducible by construction: the same inputs give the same indices in every call and every
    process. ``random_state`` seeds every random step built here (the LCMD gram sketch, when
    the exact gram route is not affordable) and every ``random_state`` of ``transformer`` that is
    ``None`` (the NTK sketch and force probes); a seed already set on the transformer is kept.

    Parameters
    ----------
    transformer : estimator or None, default=None
        Upstream featuriser (e.g. an NTK transformer turning ``list[ase.Atoms]`` into
        ``FeatureBlocks``); ``None`` when the inputs already are features. If it has
        ``random_state=None`` parameters, the pipeline holds a clone with them set to the seed.
    n_to_select : int, float or None, default=None
        Batch size ``B`` chosen by LCMD.
    shortlist_size : int or None, default=None
        Size ``M`` of the PV shortlist handed to LCMD (``None``: LCMD sees the whole pool;
        :func:`default_shortlist_size` gives the command line's ``max(5 B, 50)``).
    sigma2, normalize, reduction, criterion
        Of the :class:`~skntk.selection.pv.ChunkedPosteriorVarianceSelector` step ``"pv"``.
    kernel, gram_features, n_sketch_features
        Of the :class:`~skntk.selection.lcmd.LCMDSelector` step ``"lcmd"`` (``gram_features="auto"``
        takes the exact, seed-free route whenever it fits the memory budget).
    random_state : int, RandomState instance or None, default=None
        Seed of every step; ``None`` is the fixed seed 0, a ``RandomState`` gives one draw shared
        by all steps.
    working_memory : float or None, default=None
        MiB budget of both selector steps.
    scoring : callable or None, default=None
        Objective of :meth:`SelectionPipeline.score` (``None``: linearised fine-tuning).
    progress_bar : bool, default=False
        tqdm bars of both selector steps (structures scored by PV, LCMD's picks) and, with
        ``feature_cache``, of the pool's featurisation.
    device : str or None, default=None
        Where both steps' matrix products run (``None``: NumPy on the host; ``"cuda"``; ``"auto"``:
        CUDA when there is one).
    feature_cache, n_jobs, scheduler_address, error_prefix
        Of :class:`SelectionPipeline`: an Atoms pool is featurised into the cache directory
        ``feature_cache`` (``n_jobs`` workers, or a Dask cluster) and streamed from it.

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
    >>> shortlist = pipe["pv"].shortlist_idx_  # PV's streamed top-40, best first
    >>> len(set(idx.tolist())), set(idx.tolist()) <= set(shortlist.tolist())
    (5, True)
    """
    seed = _seed_of(random_state)
    steps = [] if transformer is None else [("features", _seeded(transformer, seed))]
    steps.append(("pv", ChunkedPosteriorVarianceSelector(
        sigma2, normalize=normalize, reduction=reduction, criterion=criterion,
        shortlist_size=shortlist_size, working_memory=working_memory,
        progress_bar=progress_bar, device=device)))
    steps.append(("lcmd", LCMDSelector(
        n_to_select, kernel=kernel, gram_features=gram_features,
        n_sketch_features=n_sketch_features, random_state=seed,
        working_memory=working_memory, progress_bar=progress_bar, device=device)))
    return SelectionPipeline(steps, scoring=scoring, feature_cache=feature_cache, n_jobs=n_jobs,
                             scheduler_address=scheduler_address, progress_bar=progress_bar,
                             error_prefix=error_prefix)

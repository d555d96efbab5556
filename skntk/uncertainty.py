"""Error bars from one model: calibrated force errors from the NTK posterior, in eV/Å.

A fine-tuned model's error on a structure ``x`` grows with how far ``x`` is from what the model
was fitted on (its *novelty*, the posterior variance ``PV(x)`` of the linearised model,
:class:`~skntk.selection._posterior.FeaturePosterior`) and with the scale of the forces (a 10 %
error on a 5 eV/Å force is 0.5 eV/Å). :class:`ForceUncertainty` combines both in a small
monotone map fitted on structures the model did not train on, and bounds the error by split
conformal prediction. :class:`UncertaintyCalculator` reports the error bar next to the model's
energy and forces in ASE, and :class:`UncertaintyObserver` watches it along an MD trajectory.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from scipy.optimize import lsq_linear
from sklearn.base import BaseEstimator, clone
from sklearn.utils.validation import check_is_fitted

from skntk._sklearn_compat import HasMethods, Interval, StrOptions, _fit_context
from skntk.atoms import as_atoms_list
from skntk.blocks import as_blocks
from skntk.io import free_atoms, get_labels
from skntk.models.base import MLIP
from skntk.models.predict import predict_energies_forces
from skntk.selection._posterior import FeaturePosterior
from skntk.selection.pv import pv_mean

logger = logging.getLogger(__name__)

__all__ = ["ForceUncertainty", "UncertaintyCalculator", "UncertaintyObserver",
           "UncertaintyThresholdExceeded", "conformal_quantile", "DEFAULT_FEATURIZER_PARAMS"]

#: The featuriser ``ForceUncertainty(featurizer=None)`` builds for the model being judged:
#: ``ForceNTKTransformer(model, **DEFAULT_FEATURIZER_PARAMS)`` (chosen by measurement, see
#: docs/uncertainty.md).
DEFAULT_FEATURIZER_PARAMS = {"kind": "energy", "n_features": 256, "random_state": 0}

#: Floors of the map's inputs and targets before their logarithm (PV in kernel units, forces
#: and errors in eV/Å): a zero would otherwise send the log-linear fit to minus infinity.
_PV_FLOOR = 1e-12
_FORCE_FLOOR = 1e-6
_ERROR_FLOOR = 1e-6

_INPUTS = {"pv+force": ("pv", "force"), "pv": ("pv",), "force": ("force",)}


def conformal_quantile(scores, coverage):
    """Split-conformal quantile: the ``⌈(n + 1) · coverage⌉``-th smallest of ``n`` scores.

    For a new score exchangeable with the calibration ``scores``,
    ``P(s_new <= q) >= coverage`` (Vovk et al. 2005; Angelopoulos & Bates 2021).

    Parameters
    ----------
    scores : array-like of shape (n,)
        Calibration scores.
    coverage : float
        Nominal coverage ``1 − α`` in (0, 1).

    Returns
    -------
    q : float
        The quantile; ``inf`` when ``⌈(n + 1) · coverage⌉ > n`` (too few scores for that
        coverage: no finite bound has the guarantee).

    Examples
    --------
    >>> conformal_quantile([3.0, 1.0, 2.0, 5.0, 4.0], 0.5)
    3.0
    >>> conformal_quantile([3.0, 1.0, 2.0], 0.9)
    inf
    """
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be in (0, 1); got {coverage!r}.")
    s = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    k = math.ceil((s.shape[0] + 1) * coverage - 1e-12)
    return float(s[k - 1]) if k <= s.shape[0] else math.inf


def _design(log_pv, log_f, inputs):
    """Columns ``[1, log PV, log |F̂|]`` of the map, those that ``inputs`` names."""
    cols = [np.ones_like(log_pv if log_pv is not None else log_f)]
    for name in _INPUTS[inputs]:
        cols.append(log_pv if name == "pv" else log_f)
    return np.stack(cols, axis=1)


def _fit_log_map(D, errors):
    """Least squares of ``log e`` on ``D`` with non-negative slopes (a monotone map).

    Returns the coefficients and the residual variance ``s² = RSS / (n − p)`` of the log-errors
    (the lognormal likelihood's scale; ``n − p`` at least 1).
    """
    y = np.log(np.maximum(errors, _ERROR_FLOOR))
    lb = np.r_[-np.inf, np.zeros(D.shape[1] - 1)]
    coef = lsq_linear(D, y, bounds=(lb, np.full(D.shape[1], np.inf)), method="bvls",
                      tol=1e-12).x
    resid = y - D @ coef
    s2 = float(resid @ resid / max(D.shape[0] - D.shape[1], 1))
    return coef, s2


def _warn_if_flat(coef, inputs, errors, pred):
    """Warn when every slope of a fitted map is 0: the error bar is then one constant."""
    if coef.shape[0] > 1 and not np.any(coef[1:] > 0):
        names = " or ".join({"pv": "log PV", "force": "log |F̂|"}[n] for n in _INPUTS[inputs])
        warnings.warn(f"the {errors.shape[0]} calibration structures show no increase of the force "
                      f"error with {names} (every slope of the map is 0): every structure gets "
                      f"the same predicted error, {float(pred[0]):.3g} eV/Å, which bounds but "
                      f"does not rank; calibrate on more, or more varied, structures.",
                      UserWarning, stacklevel=4)


def _apply_log_map(D, coef, s2):
    """Expected error ``exp(D β + s²/2)``, the mean of the fitted lognormal."""
    return np.exp(D @ coef + 0.5 * s2)


def _atom_variance(psi, offsets, kind):
    """Per-atom force variance ``tr Σ_ii / 3`` (mean over the atom's 3 force rows) of force or
    joint blocks; the energy row of a joint block is skipped. Shape (n_atoms,)."""
    sq = np.einsum("ij,ij->i", psi, psi)
    if kind == "joint":
        keep = np.ones(sq.shape[0], dtype=bool)
        keep[np.asarray(offsets[:-1])[np.diff(offsets) > 0]] = False
        sq = sq[keep]
    return sq.reshape(-1, 3).mean(axis=1)


def _model_digest(model):
    from skntk.cache import model_digest as digest

    return digest(model)


def _featurizer_model(featurizer):
    """The MLIP a featuriser computes features of (fitted ``model_`` or its ``model``), or None."""
    model = getattr(featurizer, "model_", None)
    if model is None and hasattr(featurizer, "get_params"):
        model = featurizer.get_params(deep=False).get("model")
    return model


class ForceUncertainty(BaseEstimator):
    """Predicted force error of a model per structure (and per atom), in eV/Å.

    ``fit(atoms, calibration_atoms)`` builds the feature-space posterior of the linearised model
    from the structures it was trained on (``atoms``; labels not needed),

        ``A = c² Σ_t G_tᵀ G_t + σ² I``,   ``Σ(x) = Ψ_x Ψ_xᵀ``,   ``Ψ_x = σ c G_x L⁻ᵀ``

    (:class:`~skntk.selection._posterior.FeaturePosterior`, the one the selectors use), with
    ``G_x`` the rows of ``featurizer``, and reduces it to ``PV(x) = tr Σ(x) / m_x`` (posterior
    variance per row, :func:`~skntk.selection.pv.pv_mean`). It then **calibrates** a monotone
    map on labelled structures the model did not train on (``calibration_atoms``):

        ``log e(x) = a + b · log PV(x) + c · log |F̂|(x) + ε``,   ``ε ~ N(0, s²)``,  ``b, c >= 0``

    with ``e(x)`` the force MAE of the model over the free atoms of ``x`` (eV/Å) and ``|F̂|(x)``
    the mean norm of the model's own predicted forces on them (eV/Å): least squares on the
    log-errors with non-negative slopes (the lognormal likelihood's maximum under the
    constraint), ``s² = RSS / (n − p)``. :meth:`predict` returns the expected error,
    ``ê(x) = exp(a + b log PV + c log |F̂| + s²/2)``. ``inputs`` keeps one input only (``"pv"``:
    novelty alone; ``"force"``: the force scale alone, no featurisation).

    :meth:`predict_interval` bounds the error by split conformal prediction: with the
    calibration scores ``s_i = e_i / ê(x_i)`` (``n`` of them) and ``q`` the
    ``⌈(n + 1) · coverage⌉``-th smallest, ``P(e(x) <= q · ê(x)) >= coverage`` for a structure
    ``x`` **exchangeable with the calibration structures** (drawn from the same distribution,
    independently). It is not guaranteed for structures from another distribution (hotter MD,
    other chemistry) nor for one chosen *because* its ``ê`` is large; there it is approximate.

    Per atom (``predict(..., return_atoms=True)``): the same map fitted on per-atom errors (mean
    absolute force component error of each free atom) with the per-atom posterior variance
    ``tr Σ_ii / 3`` (3x3 diagonal block of the atom) and ``|F̂_i|``. It needs per-atom rows:
    a featuriser with ``kind="force"`` or ``"joint"`` and ``force_rows="exact"`` (or
    ``"forward"``, the same rows); probe rows (``force_rows="probes"``) and energy rows have no
    per-atom layout and are refused. The energy error per atom (eV/atom, :meth:`predict_energy`)
    is calibrated the same way when the calibration structures carry energies.

    Parameters
    ----------
    featurizer : transformer or None, default=None
        Structure featuriser (list of ``ase.Atoms`` to blocks or a 2-D array; any featuriser
        :func:`skntk.testing.check_featurizer` accepts), cloned in ``fit``. ``None``:
        ``ForceNTKTransformer(model, **DEFAULT_FEATURIZER_PARAMS)`` (energy NTK rows of the
        judged model, ``d = 256``: they ranked errors as well as joint rows at 0.58× one E+F
        per structure instead of 4–19×, docs/uncertainty.md). A
        featuriser of another model than ``model`` is refused (model digests compared).
    model : MLIP, str or None, default=None
        The model whose errors are predicted (the fine-tuned handle); a name or path goes
        through :func:`skntk.models.load`. ``None``: the featuriser's model.
    inputs : {"pv+force", "pv", "force"}, default="pv+force"
        Inputs of the calibration map (see above); the default ranked at least as well as either
        input alone in the measurement of docs/uncertainty.md.
    sigma2 : float, default=1e-2
        Noise variance σ² of the posterior, relative to the normalised kernel (1e-2 and 1e-1
        ranked best of 1e-4..1e-1 in the measurement of docs/uncertainty.md; the selectors'
        default is 1e-3).
    min_calibration : int, default=10
        Fewest calibration structures accepted (at least 4); below it ``fit`` raises a
        ``ValueError``. A finite 90 % conformal bound needs at least 9 (``n >= c / (1 − c)``
        for coverage ``c``); a few more keep the three-coefficient map from overfitting.
    batch_size : int, default=16
        Structures per model evaluation (predicted forces).
    working_memory : float or None, default=None
        MiB budget of the posterior's chunks; ``None`` uses scikit-learn's config.

    Attributes
    ----------
    model_ : MLIP
        The judged model (the handle itself, not a copy).
    featurizer_ : transformer or None
        The fitted clone of the featuriser (``None`` for ``inputs="force"``).
    posterior_ : FeaturePosterior or None
        Posterior of the training structures' features (``None`` for ``inputs="force"``).
    elements_ : frozenset of int
        Elements of the training structures; other elements are refused.
    n_train_ : int
        Training structures in the posterior.
    n_calibration_ : int
        Calibration structures.
    coef_ : ndarray of shape (1 + n_inputs,)
        ``[a, b, c]`` (or ``[a, b]`` with one input) of the per-structure map.
    residual_var_ : float
        ``s²`` of the per-structure map (log-errors).
    calibration_errors_ : ndarray of shape (n_calibration_,)
        True force MAE of each calibration structure (eV/Å).
    calibration_predictions_ : ndarray of shape (n_calibration_,)
        ``ê`` of each calibration structure (eV/Å).
    calibration_scores_ : ndarray of shape (n_calibration_,)
        Conformal scores ``e_i / ê_i``, sorted.
    per_atom_ : bool
        Whether the rows are per atom (``predict(..., return_atoms=True)`` available).
    atom_coef_ : ndarray of shape (1 + n_inputs,) or None
        Per-atom map (per-atom rows only).
    atom_residual_var_ : float or None
    energy_coef_ : ndarray of shape (1 + n_inputs,) or None
        Map of the energy error per atom (eV/atom); ``None`` without energy labels.
    energy_residual_var_ : float or None
    cv_ : int
        Folds of the K-fold calibration (only after ``from_regressor(..., cv=K)``).

    See Also
    --------
    ForceUncertainty.from_regressor : error bars for a fitted :class:`~skntk.MLIPRegressor`.
    ChunkedPosteriorVarianceSelector : the same posterior, used to pick structures to label.

    Examples
    --------
    >>> import numpy as np
    >>> from ase.build import molecule
    >>> from ase.calculators.emt import EMT
    >>> from skntk.models.builtin import BuiltinMLIP
    >>> model = BuiltinMLIP([1, 6, 7, 8], cutoff=4.0, n_hidden=8, n_blocks=1)
    >>> def frames(n, seed):
    ...     out = []
    ...     for k in range(n):
    ...         a = molecule("CH3OH")
    ...         a.rattle(0.02 + 0.01 * k, seed=seed + k)
    ...         a.calc = EMT()
    ...         _ = a.get_forces()
    ...         out.append(a)
    ...     return out
    >>> est = ForceUncertainty(model=model).fit(frames(8, 0), calibration_atoms=frames(12, 100))
    >>> est.predict(frames(3, 500)).shape
    (3,)
    """

    _parameter_constraints = {
        "featurizer": [HasMethods(["fit", "transform"]), None],
        "model": [MLIP, str, os.PathLike, None],
        "inputs": [StrOptions(set(_INPUTS))],
        "sigma2": [Interval(Real, 0, None, closed="neither")],
        "min_calibration": [Interval(Integral, 4, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "working_memory": [Interval(Real, 0, None, closed="neither"), None],
    }

    def __init__(self, featurizer=None, *, model=None, inputs="pv+force", sigma2=1e-2,
                 min_calibration=10, batch_size=16, working_memory=None):
        self.featurizer = featurizer
        self.model = model
        self.inputs = inputs
        self.sigma2 = sigma2
        self.min_calibration = min_calibration
        self.batch_size = batch_size
        self.working_memory = working_memory

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.target_tags.required = False
        tags.requires_fit = True
        return tags

    # -- fitting -------------------------------------------------------------------------------
    def _resolve(self):
        """The judged model and an unfitted featuriser of it; refuses a featuriser of another
        model."""
        from skntk.models import resolve_model
        from skntk.transformers import ForceNTKTransformer

        name = type(self).__name__
        feat_model = None if self.featurizer is None else _featurizer_model(self.featurizer)
        if self.model is None and feat_model is None:
            raise ValueError(f"{name} needs the model being judged: pass model=<MLIP handle> "
                             f"(or a featuriser with a model parameter).")
        model = resolve_model(self.model if self.model is not None else feat_model, name)
        if self.featurizer is None:
            featurizer = ForceNTKTransformer(model, **DEFAULT_FEATURIZER_PARAMS)
        else:
            featurizer = clone(self.featurizer)
            if feat_model is None and "model" in featurizer.get_params(deep=False):
                featurizer.set_params(model=model)  # a featuriser waiting for its model
            elif feat_model is not None and self.model is not None:
                other = resolve_model(feat_model, name)
                if other is not model:
                    mine, theirs = _model_digest(model), _model_digest(other)
                    if mine != theirs:
                        raise ValueError(
                            f"the featuriser computes features of another model than the one "
                            f"being judged ({type(other).__name__} with weights "
                            f"{theirs['state_sha256'][:12]}, not {type(model).__name__} with "
                            f"weights {mine['state_sha256'][:12]}): build the featuriser from "
                            f"the judged model, e.g. ForceNTKTransformer(model=reg.model_).")
        return model, featurizer

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, atoms, calibration_atoms=None):
        """Build the posterior from the training structures and calibrate it.

        Parameters
        ----------
        atoms : list of ase.Atoms of length n_train, or a structure file path
            The structures the model was trained on (labels not needed).
        calibration_atoms : list of ase.Atoms of length n_calibration, or a path
            Labelled structures (energies and forces, as :func:`skntk.io.get_labels` reads them)
            the model did **not** train on, at least ``min_calibration`` of them.
            :meth:`from_regressor` passes a regressor's validation split.

        Returns
        -------
        self : ForceUncertainty
        """
        name = type(self).__name__
        if calibration_atoms is None:
            raise ValueError(
                f"{name}.fit needs calibration_atoms: at least {self.min_calibration} labelled "
                f"structures the model did not train on (ForceUncertainty.from_regressor uses "
                f"the regressor's validation split).")
        model, featurizer = self._resolve()
        X = model.validate(atoms)
        cal = model.validate(calibration_atoms)
        if len(cal) < self.min_calibration:
            raise ValueError(
                f"calibration_atoms has {len(cal)} structures; {name} needs at least "
                f"min_calibration={self.min_calibration} to calibrate its error bars.")
        self._fit_posterior(model, featurizer, X)
        self._check_elements(cal, "calibration_atoms")
        self._calibrate(self._inputs(cal), cal)
        return self

    def _fit_posterior(self, model, featurizer, X):
        """Set ``model_``, ``elements_``, ``n_train_``, ``featurizer_``, ``posterior_`` and
        ``per_atom_`` from the validated training structures ``X``."""
        self.model_ = model
        self.elements_ = frozenset(int(z) for a in X for z in a.numbers)
        self.n_train_ = len(X)
        if self.inputs == "force":
            self.featurizer_, self.posterior_ = None, None
            self.per_atom_ = False
            return
        self.featurizer_ = featurizer.fit(X)
        train = as_blocks(self.featurizer_.transform(X))
        self.posterior_ = FeaturePosterior(self.sigma2,
                                           working_memory=self.working_memory).fit(train)
        self.per_atom_ = train.kind in ("force", "joint")

    def fit_posterior(self, atoms):
        """The first half of :meth:`fit`: the posterior of the training structures, no map.

        For callers that calibrate from errors they recorded themselves
        (:meth:`calibrate_pairs`, as :class:`~skntk.al.OnTheFlyLearner` does); until then the
        estimator predicts nothing.

        Parameters
        ----------
        atoms : list of ase.Atoms of length n_train, or a structure file path
            The structures the model was trained on (labels not needed).

        Returns
        -------
        self : ForceUncertainty
        """
        for attr in ("coef_", "calibration_scores_"):
            self.__dict__.pop(attr, None)
        model, featurizer = self._resolve()
        self._fit_posterior(model, featurizer, model.validate(atoms))
        return self

    def calibrate_pairs(self, log_pv, log_f, errors, *, atoms=None):
        """The second half of :meth:`fit` from recorded pairs: map inputs and true errors.

        Each pair is a structure the judged model (or an earlier model of the same run) had not
        trained on: ``log PV`` and ``log |F̂|`` as :meth:`fit` computes them, and the true force
        MAE there. The per-structure map and the conformal scores are fitted as in :meth:`fit`;
        the energy map is not (``energy_coef_`` is None).

        Parameters
        ----------
        log_pv : ndarray of shape (n_pairs,) or None
            Log posterior variance per structure (``None`` for ``inputs="force"``).
        log_f : ndarray of shape (n_pairs,)
            Log mean predicted force norm over free atoms (eV/Å).
        errors : ndarray of shape (n_pairs,)
            True force MAE over free atoms (eV/Å).
        atoms : tuple of three ndarrays of shape (n_atom_pairs,) or None, default=None
            The same per atom (per-atom rows only): ``(log_pv, log_f, errors)``.

        Returns
        -------
        self : ForceUncertainty
        """
        check_is_fitted(self, "model_")
        errors = np.asarray(errors, dtype=np.float64)
        if errors.shape[0] < self.min_calibration:
            raise ValueError(f"{errors.shape[0]} calibration pairs; {type(self).__name__} needs "
                             f"at least min_calibration={self.min_calibration}.")
        D = _design(log_pv, np.asarray(log_f, dtype=np.float64), self.inputs)
        self._fit_structure_map(D, errors)
        self.energy_coef_, self.energy_residual_var_ = None, None
        self.atom_coef_, self.atom_residual_var_ = None, None
        if self.per_atom_ and atoms is not None:
            a_pv, a_f, a_err = (np.asarray(v, dtype=np.float64) for v in atoms)
            self.atom_coef_, self.atom_residual_var_ = _fit_log_map(
                _design(a_pv, a_f, self.inputs), a_err)
        return self

    def _fit_structure_map(self, D, errors):
        """The per-structure map on design ``D`` and true errors (n,), and its conformal scores
        (the part :meth:`_calibrate` and :meth:`calibrate_pairs` share)."""
        self.coef_, self.residual_var_ = _fit_log_map(D, errors)
        pred = _apply_log_map(D, self.coef_, self.residual_var_)
        _warn_if_flat(self.coef_, self.inputs, errors, pred)
        self.n_calibration_ = errors.shape[0]
        self.calibration_errors_ = errors
        self.calibration_predictions_ = pred
        self.calibration_scores_ = np.sort(errors / pred)

    def _calibrate(self, inputs, cal):
        """Fit the maps (structure, atom, energy) and the conformal scores on labelled ``cal``,
        whose map inputs (:meth:`_inputs`) are ``inputs``."""
        energies, forces = np.zeros(len(cal)), []
        for i, a in enumerate(cal):
            try:
                e, f = get_labels([a])
            except ValueError:
                e, f = None, [None]
            if e is None or f[0] is None:
                what = "energy" if e is None else "force"
                raise ValueError(f"calibration_atoms[{i}] ({a.get_chemical_formula()}) has no "
                                 f"{what} label; calibration needs DFT energies and forces.")
            energies[i] = e[0]
            forces.append(f[0])
        errors, atom_errors = [], []
        for f_ref, f_hat, free in zip(forces, inputs["forces"], inputs["free"], strict=True):
            err = np.abs(f_hat - f_ref)[free]  # [n_free, 3]
            errors.append(float(err.mean()) if err.size else 0.0)
            atom_errors.append(err.mean(axis=1))
        errors = np.asarray(errors)
        D = _design(inputs["log_pv"], inputs["log_f"], self.inputs)
        self._fit_structure_map(D, errors)
        n_atoms = np.array([len(a) for a in cal], dtype=np.float64)
        e_err = np.abs(inputs["energies"] - energies) / n_atoms
        self.energy_coef_, self.energy_residual_var_ = _fit_log_map(D, e_err)
        self.atom_coef_, self.atom_residual_var_ = None, None
        if self.per_atom_:
            free = np.concatenate(inputs["free"])
            Da = _design(inputs["atom_log_pv"], inputs["atom_log_f"], self.inputs)[free]
            self.atom_coef_, self.atom_residual_var_ = _fit_log_map(
                Da, np.concatenate(atom_errors))

    # -- inputs of the map ---------------------------------------------------------------------
    def _check_elements(self, X, name="X", index=None):
        for k, a in enumerate(X):
            i = k if index is None else int(index[k])
            unseen = sorted(set(a.numbers.tolist()) - self.elements_)
            if unseen:
                from ase.data import chemical_symbols

                names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in unseen)
                raise ValueError(
                    f"{name}[{i}] ({a.get_chemical_formula()}) contains {names}, which the "
                    f"posterior never saw (its training structures contain "
                    f"Z={sorted(self.elements_)}); its error bar would mean nothing.")

    def _inputs(self, X, forces=None, energies=None, blocks=None):
        """Map inputs of validated structures ``X``: log PV and log mean |F̂| per structure (and
        per atom with per-atom rows), the model's energies, forces and free-atom masks.
        ``forces``/``energies``: the model's own predictions, ``blocks``: the featuriser's rows
        of ``X``, when already computed."""
        if forces is None or energies is None:
            energies, forces = predict_energies_forces(self.model_, X,
                                                       batch_size=self.batch_size)
        free = [free_atoms(a) for a in X]
        fnorm = [np.linalg.norm(f, axis=1) for f in forces]
        mean_f = np.array([n[m].mean() if m.any() else n.mean() for n, m in zip(fnorm, free,
                                                                                 strict=True)])
        out = {"energies": np.asarray(energies, dtype=np.float64), "forces": forces,
               "free": free, "log_f": np.log(np.maximum(mean_f, _FORCE_FLOOR)), "log_pv": None,
               "atom_log_f": np.log(np.maximum(np.concatenate(fnorm), _FORCE_FLOOR)),
               "atom_log_pv": None}
        if self.posterior_ is None:
            return out
        blocks = as_blocks(self.featurizer_.transform(X) if blocks is None else blocks)
        pv = np.empty(len(X))
        atom_pv = []
        for sl, psi, offsets in self.posterior_.iter_transform(blocks):
            pv[sl] = pv_mean(psi, offsets)
            if self.per_atom_:
                atom_pv.append(_atom_variance(psi, offsets, blocks.kind))
        out["log_pv"] = np.log(np.maximum(pv, _PV_FLOOR))
        if self.per_atom_:
            out["atom_log_pv"] = np.log(np.maximum(np.concatenate(atom_pv), _PV_FLOOR))
        return out

    def _checked(self, atoms, return_atoms=False, fitted="coef_"):
        """Validated ``atoms``, refused when not fitted (``fitted``: the attribute that must
        exist), when an element is unseen or when per-atom output has no per-atom rows."""
        check_is_fitted(self, fitted)
        if return_atoms and not self.per_atom_:
            raise ValueError(
                "return_atoms=True needs per-atom rows: a featuriser with kind='force' or "
                "'joint' and force_rows='exact' (or 'forward'); this one gives "
                f"{self._rows_description()}, which have no per-atom layout.")
        X = self.model_.validate(atoms)
        self._check_elements(X)
        return X

    def _rows_description(self):
        f = self.featurizer_
        if f is None:
            return "no rows (inputs='force')"
        kind = getattr(f, "kind", None)
        route = getattr(f, "force_rows_", None)
        if kind in ("force", "joint") and route is not None:
            return f"{kind} rows by force_rows={route!r}"
        return f"rows of kind {kind!r}" if kind is not None else "one row per structure"

    def _predict_from(self, inputs):
        D = _design(inputs["log_pv"], inputs["log_f"], self.inputs)
        return _apply_log_map(D, self.coef_, self.residual_var_)

    def _predict_atoms_from(self, inputs):
        Da = _design(inputs["atom_log_pv"], inputs["atom_log_f"], self.inputs)
        flat = _apply_log_map(Da, self.atom_coef_, self.atom_residual_var_)
        ptr = np.cumsum([0] + [len(f) for f in inputs["forces"]])
        return [flat[ptr[i]:ptr[i + 1]] for i in range(len(ptr) - 1)]

    # -- prediction ----------------------------------------------------------------------------
    def predict(self, atoms, return_atoms=False, *, forces=None, energies=None):
        """Expected force MAE of the model on each structure, in eV/Å.

        Parameters
        ----------
        atoms : list of ase.Atoms of length n_structures, ase.Atoms or a path
        return_atoms : bool, default=False
            Also return the expected error of each atom (mean absolute force component error,
            eV/Å); needs per-atom rows (see the class docstring), else a ``ValueError``.
        forces : list of ndarray of shape (n_atoms_i, 3), optional
            The model's own forces on ``atoms`` (eV/Å) when already computed (an MD step's,
            from :func:`~skntk.finetune.predict_energies_forces`): the model is not run again.
            Given together with ``energies``.
        energies : array-like of shape (n_structures,), optional
            The model's own energies (eV), with ``forces``.

        Returns
        -------
        error : ndarray of shape (n_structures,)
            Expected force MAE over the free atoms of each structure (eV/Å).
        atom_errors : list of ndarray of shape (n_atoms_i,)
            Only with ``return_atoms=True``.

        Raises
        ------
        ValueError
            A structure with an element the training structures do not contain (named by index,
            formula and element), or ``return_atoms=True`` without per-atom rows.
        """
        X = self._checked(atoms, return_atoms)
        return self.predict_from_inputs(self._given_inputs(X, forces, energies), return_atoms)

    def map_inputs(self, atoms, *, forces=None, energies=None):
        """What the calibrated map reads, per structure and per atom (the first half of
        :meth:`predict`): for a caller that also needs the model's predictions, such as an MD
        driver that records calibration pairs (:meth:`calibrate_pairs`).

        Parameters
        ----------
        atoms : list of ase.Atoms of length n_structures, ase.Atoms or a path
        forces, energies : optional
            The model's own forces and energies, as in :meth:`predict`.

        Returns
        -------
        inputs : dict
            ``log_pv`` (n_structures,) log posterior variance (None for ``inputs="force"``),
            ``log_f`` (n_structures,) log mean predicted force norm over free atoms (eV/Å),
            ``atom_log_pv`` (None without per-atom rows) and ``atom_log_f`` (n_atoms_total,),
            ``forces`` (list of (n_atoms_i, 3), eV/Å), ``energies`` (n_structures,), ``free``
            (list of boolean masks).
        """
        X = self._checked(atoms, fitted="model_")
        return self._given_inputs(X, forces, energies)

    def predict_from_inputs(self, inputs, return_atoms=False):
        """The second half of :meth:`predict`: the calibrated map applied to :meth:`map_inputs`.

        Returns
        -------
        error : ndarray of shape (n_structures,)
            Expected force MAE over the free atoms of each structure (eV/Å).
        atom_errors : list of ndarray of shape (n_atoms_i,)
            Only with ``return_atoms=True`` (per-atom rows only, else a ``ValueError``).
        """
        check_is_fitted(self, "coef_")
        if return_atoms and (self.atom_coef_ is None or inputs.get("atom_log_pv") is None):
            raise ValueError(
                "return_atoms=True needs per-atom rows and a per-atom calibration; this "
                f"estimator has {self._rows_description()}"
                + ("" if self.per_atom_ else ", which have no per-atom layout") + ".")
        err = self._predict_from(inputs)
        return (err, self._predict_atoms_from(inputs)) if return_atoms else err

    def _given_inputs(self, X, forces, energies):
        """:meth:`_inputs` of validated ``X``, with the caller's forces and energies checked."""
        if (forces is None) != (energies is None):
            raise ValueError("predict needs forces and energies together (the model's own), "
                             "or neither.")
        if forces is not None:
            if len(forces) != len(X) or len(energies) != len(X):
                raise ValueError(f"{len(forces)} forces and {len(energies)} energies given "
                                 f"for {len(X)} structures.")
            for i, (a, f) in enumerate(zip(X, forces, strict=True)):
                if np.shape(f) != (len(a), 3):
                    raise ValueError(f"forces[{i}] has shape {np.shape(f)}; structure {i} "
                                     f"({a.get_chemical_formula()}) needs ({len(a)}, 3).")
            forces = [np.asarray(f, dtype=np.float64) for f in forces]
            energies = np.asarray(energies, dtype=np.float64)
        return self._inputs(X, forces=forces, energies=energies)

    def predict_interval(self, atoms, coverage=0.9):
        """Upper bound of each structure's force MAE with the given coverage, in eV/Å.

        ``q · ê(x)`` with ``q`` the split-conformal quantile of the calibration scores
        (:func:`conformal_quantile`): ``P(e(x) <= q · ê(x)) >= coverage`` for structures
        exchangeable with the calibration set (see the class docstring).

        Parameters
        ----------
        atoms : list of ase.Atoms of length n_structures, ase.Atoms or a path
        coverage : float, default=0.9
            Nominal coverage in (0, 1).

        Returns
        -------
        upper : ndarray of shape (n_structures,)
            Upper bounds in eV/Å; ``inf`` when the calibration set is too small for that
            coverage (``⌈(n + 1) · coverage⌉ > n``, with a warning).
        """
        X = self._checked(atoms)
        q = conformal_quantile(self.calibration_scores_, coverage)
        if math.isinf(q):
            need = math.ceil(coverage / (1 - coverage) - 1e-9)
            warnings.warn(f"coverage={coverage} needs at least {need} calibration structures; "
                          f"{self.n_calibration_} were given: the bounds are infinite.",
                          UserWarning, stacklevel=2)
        return q * self._predict_from(self._inputs(X))

    def predict_energy(self, atoms):
        """Expected absolute energy error per atom of each structure, in eV/atom.

        Parameters
        ----------
        atoms : list of ase.Atoms of length n_structures, ase.Atoms or a path

        Returns
        -------
        error : ndarray of shape (n_structures,)
        """
        X = self._checked(atoms)
        if self.energy_coef_ is None:
            raise ValueError("no energy error map: this estimator was calibrated without energy "
                             "labels (calibrate_pairs fits the force map only).")
        inputs = self._inputs(X)
        D = _design(inputs["log_pv"], inputs["log_f"], self.inputs)
        return _apply_log_map(D, self.energy_coef_, self.energy_residual_var_)

    # -- integration ---------------------------------------------------------------------------
    @classmethod
    def from_regressor(cls, reg, calibration_atoms=None, *, atoms=None, cv=None, **kwargs):
        """Error bars for the model a fitted :class:`~skntk.MLIPRegressor` trained, in one line.

        The posterior is built from the structures the regressor trained on
        (``atoms[reg.train_indices_]``) and the judged model is ``reg.model_``; calibration uses
        ``calibration_atoms`` when given, else the regressor's validation split
        (``atoms[reg.validation_indices_]``), which it did not train on (it chose the epoch
        kept, a mild optimism).

        Parameters
        ----------
        reg : MLIPRegressor
            A fitted regressor.
        calibration_atoms : list of ase.Atoms or None, default=None
            Labelled structures the regressor did not train on.
        atoms : list of ase.Atoms of length n_structures
            The structures passed to ``reg.fit`` (required, by keyword).
        cv : int or None, default=None
            Calibrate by ``cv``-fold refits instead (for labelled sets too small to spare a
            validation split): ``clone(reg)`` is refitted on each ``(cv − 1)/cv`` of ``atoms``
            and its error bar inputs and errors on the held-out fold, computed with its own
            posterior, become calibration data for all ``n_structures`` (``cv`` fine-tunings).
            The fold models stand in for ``reg.model_``, which trained on more data: the
            calibration is then approximate (slightly pessimistic), not exchangeable.
        **kwargs
            Parameters of :class:`ForceUncertainty` (``featurizer``, ``inputs``, ...).

        Returns
        -------
        estimator : ForceUncertainty
            Fitted.

        Raises
        ------
        ValueError
            ``atoms`` missing or not the regressor's structures, or fewer calibration
            structures than ``min_calibration`` (raise ``validation_fraction`` or pass
            ``calibration_atoms``).
        """
        check_is_fitted(reg, "model_")
        if not hasattr(reg, "train_indices_"):
            raise ValueError(f"{type(reg).__name__} has no train_indices_; refit it with this "
                             f"version of skntk.")
        if atoms is None:
            raise ValueError("from_regressor needs atoms=: the structures passed to reg.fit.")
        X = as_atoms_list(atoms)
        n = len(reg.train_indices_) + len(reg.validation_indices_)
        if len(X) != n:
            raise ValueError(f"atoms has {len(X)} structures; the regressor was fitted on {n}.")
        est = cls(model=reg.model_, **kwargs)
        if cv is not None:
            if calibration_atoms is not None:
                raise ValueError("pass either calibration_atoms or cv, not both.")
            return est._fit_cv(reg, X, cv)
        if calibration_atoms is None:
            calibration_atoms = [X[i] for i in reg.validation_indices_]
            if len(calibration_atoms) < est.min_calibration:
                raise ValueError(
                    f"the regressor's validation split has {len(calibration_atoms)} structures; "
                    f"calibration needs at least min_calibration={est.min_calibration}: pass "
                    f"calibration_atoms, refit with a larger validation_fraction, or use "
                    f"cv=5 (K-fold refits).")
        return est.fit([X[i] for i in reg.train_indices_], calibration_atoms)

    def _fit_cv(self, reg, X, cv):
        """Posterior of ``reg``'s training structures; calibration by ``cv``-fold refits of
        ``reg`` (see :meth:`from_regressor`)."""
        from sklearn.model_selection import KFold

        from skntk._sklearn_compat import validate_params

        validate_params(self)
        if not isinstance(cv, Integral) or not 2 <= cv <= len(X):
            raise ValueError(f"cv must be an integer from 2 to the {len(X)} structures; "
                             f"got {cv!r}.")
        if len(X) < self.min_calibration:
            raise ValueError(
                f"atoms has {len(X)} structures; K-fold calibration needs at least "
                f"min_calibration={self.min_calibration}.")
        model, featurizer = self._resolve()
        X = model.validate(X)
        self._fit_posterior(model, featurizer, [X[i] for i in reg.train_indices_])
        parts, held_all = [], []
        folds = KFold(int(cv), shuffle=True, random_state=0).split(np.arange(len(X)))
        for tr, te in folds:
            reg_k = clone(reg).fit([X[i] for i in tr])
            feat_k = None
            if self.featurizer is not None:
                feat_k = clone(self.featurizer)
                if "model" in feat_k.get_params(deep=False):
                    feat_k.set_params(model=reg_k.model_)
            sub = clone(self).set_params(model=reg_k.model_, featurizer=feat_k)
            sub._fit_posterior(*sub._resolve(), [X[tr[i]] for i in reg_k.train_indices_])
            held = [X[i] for i in te]
            sub._check_elements(held, "atoms", index=te)
            parts.append(sub._inputs(held))
            held_all.extend(held)
        inputs = {}
        for key in parts[0]:
            vals = [p[key] for p in parts]
            if vals[0] is None:
                inputs[key] = None
            elif isinstance(vals[0], list):
                inputs[key] = [v for p in vals for v in p]
            else:
                inputs[key] = np.concatenate(vals)
        self._calibrate(inputs, held_all)
        self.cv_ = int(cv)
        return self

    def calculator(self, every=1):
        """An ASE calculator: the model's energy and forces plus this error bar.

        Parameters
        ----------
        every : int, default=1
            Recompute the error bar every ``every`` calculations (see
            :class:`UncertaintyCalculator`).

        Returns
        -------
        calc : UncertaintyCalculator
        """
        check_is_fitted(self, "coef_")
        return UncertaintyCalculator(self, every=every)


class UncertaintyCalculator(Calculator):
    """ASE calculator: a model's energy and forces with its predicted force error.

    ``results`` hold ``energy``, ``free_energy`` (eV) and ``forces`` (n_atoms, 3, eV/Å) of the
    judged model (``estimator.model_``), ``force_uncertainty`` (expected force MAE of the
    structure, eV/Å, :meth:`ForceUncertainty.predict`), with per-atom rows
    ``force_uncertainties`` (n_atoms,) as well, and ``uncertainty_fresh`` (bool): the error bar
    is recomputed on the first calculation and every ``every``-th after it; the calculations in
    between reuse the last value (``uncertainty_fresh=False``: the number belongs to an earlier
    geometry). The model's forces are computed once and shared with the error bar.

    Parameters
    ----------
    estimator : ForceUncertainty
        Fitted.
    every : int, default=1
        Recompute the error bar every ``every`` calculations.
    **kwargs
        Passed to :class:`ase.calculators.calculator.Calculator`.

    Attributes
    ----------
    n_calls : int
        Calculations done.
    """

    implemented_properties = ["energy", "free_energy", "forces", "force_uncertainty",
                              "force_uncertainties"]

    def __init__(self, estimator, every=1, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(every, Integral) or every < 1:
            raise ValueError(f"every must be an integer >= 1; got {every!r}.")
        self.estimator = estimator
        self.every = int(every)
        self.n_calls = 0
        self._last = None

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """Energy, forces and (every ``every`` calls) the error bar of ``atoms``."""
        super().calculate(atoms, properties, system_changes)
        est = self.estimator
        model = est.model_
        with torch.enable_grad():
            batch = model.collate([self.atoms])
            energy, forces = model.energy_and_forces(batch, create_graph=False)
        e = float(energy.detach().reshape(-1)[0])
        f = forces.detach().to("cpu", torch.float64).numpy()
        fresh = self._last is None or self.n_calls % self.every == 0
        if fresh:
            X = est._checked([self.atoms], False)
            inputs = est._inputs(X, forces=[f], energies=np.array([e]))
            self._last = {"force_uncertainty": float(est._predict_from(inputs)[0])}
            if est.per_atom_:
                self._last["force_uncertainties"] = est._predict_atoms_from(inputs)[0]
        self.n_calls += 1
        self.results = {"energy": e, "free_energy": e, "forces": f, "uncertainty_fresh": fresh,
                        **{k: (v.copy() if isinstance(v, np.ndarray) else v)
                           for k, v in self._last.items()}}


class UncertaintyThresholdExceeded(RuntimeError):
    """Raised by :class:`UncertaintyObserver` (``stop=True``) when the predicted force error
    passes its threshold; ``step``, ``uncertainty`` and ``threshold`` say where."""

    def __init__(self, message, *, step, uncertainty, threshold):
        super().__init__(message)
        self.step = step
        self.uncertainty = uncertainty
        self.threshold = threshold


class UncertaintyObserver:
    """Log the predicted force error along a trajectory; flag or stop at a threshold.

    Attach it to an ASE dynamics (``dyn.attach(observer, interval=1)``). Each call reads the
    error bar of the current geometry: from the calculator's results when ``source`` is an
    :class:`UncertaintyCalculator` attached to ``atoms`` (no extra cost: MD has already
    computed the forces there), or by :meth:`ForceUncertainty.predict` when ``source`` is the
    estimator (any calculator drives the dynamics).

    ASE dynamics have no stop hook: with ``stop=True`` the observer raises
    :class:`UncertaintyThresholdExceeded` out of ``dyn.run()`` (catch it; ``atoms`` are left at
    the flagged geometry); with ``stop=False`` it only records the first step above the
    threshold in ``exceeded_at`` and lets the run go on.

    Parameters
    ----------
    source : UncertaintyCalculator or ForceUncertainty
        Where the error bar comes from.
    atoms : ase.Atoms
        The structure the dynamics moves.
    threshold : float or None, default=None
        Force error in eV/Å (e.g. 0.05–0.15, DP-GEN's trust levels); ``None`` only logs.
    stop : bool, default=False
        Raise :class:`UncertaintyThresholdExceeded` when the threshold is passed.

    Attributes
    ----------
    steps : list of int
        Call counter of each record (0, 1, ...; times ``interval`` for the MD step).
    uncertainties : list of float
        Predicted force error of each record, eV/Å.
    fresh : list of bool
        Whether each value was recomputed at that geometry (see ``every`` of the calculator).
    exceeded_at : int or None
        First record (``steps`` entry) above ``threshold``.
    """

    def __init__(self, source, atoms, threshold=None, *, stop=False):
        if not isinstance(source, (UncertaintyCalculator, ForceUncertainty)):
            raise TypeError(f"source must be an UncertaintyCalculator or a fitted "
                            f"ForceUncertainty; got {type(source).__name__}.")
        self.source = source
        self.atoms = atoms
        self.threshold = threshold
        self.stop = stop
        self.steps, self.uncertainties, self.fresh = [], [], []
        self.exceeded_at = None

    def __call__(self):
        step = len(self.steps)
        if isinstance(self.source, UncertaintyCalculator):
            if self.atoms.calc is not self.source:
                raise ValueError("the UncertaintyCalculator is not the calculator of atoms; "
                                 "attach it (atoms.calc = calc) or pass the estimator.")
            u = float(self.source.get_property("force_uncertainty", self.atoms))
            fresh = bool(self.source.results.get("uncertainty_fresh", True))
        else:
            u, fresh = float(self.source.predict([self.atoms])[0]), True
        self.steps.append(step)
        self.uncertainties.append(u)
        self.fresh.append(fresh)
        logger.info("step %d: predicted force error %.4g eV/Å", step, u)
        if self.threshold is not None and u > self.threshold and self.exceeded_at is None:
            self.exceeded_at = step
            if self.stop:
                raise UncertaintyThresholdExceeded(
                    f"predicted force error {u:.4g} eV/Å at step {step} exceeds the threshold "
                    f"{self.threshold} eV/Å.", step=step, uncertainty=u,
                    threshold=self.threshold)

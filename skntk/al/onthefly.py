"""On-the-fly active learning in molecular dynamics, driven by one model's calibrated error bar.

:class:`OnTheFlyLearner` runs MD with the model's calculator; every ``every`` steps it predicts
the model's force error at the current frame (:class:`~skntk.uncertainty.ForceUncertainty`, eV/Å)
and, above ``threshold``, labels the frame with the oracle, adds it to the labelled set and
fine-tunes the model from its pretrained weights every ``refit_every`` new labels. Everything is
on disk as it happens (``checkpoint_dir``): a killed run resumes where it was and never labels a
frame twice.

**Cold start.** Until the model has been fine-tuned on ``n_initial`` labels and its error bar has
``min_calibration`` calibration pairs, every check labels its frame (the first check is the
starting frame); with ``target_fraction``, the 5 calibrated checks that follow record their
predictions without labelling, to define the quantile threshold; checks predicted exactly at
the threshold (a flat map ties them all) label in the share that keeps the target fraction.
**Calibration.** Each frame labelled after the first fine-tuning gives one pair
(the map inputs of the model of that moment, its true force error there): the frame was new to
that model, so the pairs are out-of-sample errors, collected at no extra oracle cost. The map is
refitted on all pairs at every refit. The cold-start pairs are frames taken as MD produced them;
the later ones were labelled *because* their predicted error was large, and belong to earlier
models: the regression of error on the inputs stays consistent under such selection on the
inputs, but the coverage of conformal bounds is then approximate, not guaranteed.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, clone

from skntk.al.loop import _atomic_json, _atomic_text, _content_hash, _describe

logger = logging.getLogger(__name__)

__all__ = ["OnTheFlyLearner", "OnTheFlyResult", "quantile_threshold", "trigger"]


def trigger(predicted, threshold, *, cold):
    """Whether a check labels its frame: always during the cold start, else when the predicted
    force error exceeds the threshold (both eV/Å; strictly greater).

    >>> trigger(0.2, 0.1, cold=False), trigger(0.1, 0.1, cold=False), trigger(0.0, 0.1, cold=True)
    (True, False, True)
    """
    return bool(cold or predicted > threshold)


def _tied(predicted, threshold):
    """Predictions equal to the threshold (up to round-off): the ties of a flat map."""
    return np.isclose(predicted, threshold, rtol=1e-12, atol=0.0)


def quantile_threshold(recent, target_fraction):
    """The ``target_fraction`` threshold of the last checks' predicted errors ``recent`` (eV/Å)
    and the share of checks predicted exactly at it that should label: ``(f - above) / tied``
    of the window, clipped to [0, 1], so that about ``f`` of the checks label even when
    predictions tie (a flat map predicts one value for every frame: without the share, no check
    would ever exceed the threshold again). ``(nan, 0.0)`` below 5 predictions.

    >>> quantile_threshold([0.2] * 6, 0.25)
    (0.2, 0.25)
    >>> thr, share = quantile_threshold([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 0.25)
    >>> round(thr, 6), share
    (0.475, 0.0)
    """
    recent = np.asarray(recent, dtype=float)
    if len(recent) < 5:
        return float("nan"), 0.0
    thr = float(np.quantile(recent, 1 - target_fraction))
    tied = _tied(recent, thr)
    above = float(np.mean((recent > thr) & ~tied))
    share = (target_fraction - above) / float(np.mean(tied)) if tied.any() else 0.0
    return thr, float(min(max(share, 0.0), 1.0))


@dataclass
class OnTheFlyResult:
    """What :meth:`OnTheFlyLearner.run` returns.

    Attributes
    ----------
    history : list of dict
        One entry per fine-tuning (``generation`` 1, 2, ...): ``n_labels``, ``md_steps``,
        ``threshold`` (eV/Å), ``n_calibration`` (pairs), ``map`` (the calibrated map's
        ``coef`` ``[a, b, c]`` of ``log e = a + b log PV + c log |F̂|`` as
        :class:`~skntk.ForceUncertainty` orders them, and ``residual_var``; None before
        ``min_calibration`` pairs), ``predicted`` / ``true``
        (``{test_set: mean predicted / true force MAE}`` with ``test_sets``, eV/Å), ``metrics``
        (``{test_set: evaluate(...) dict}``),
        ``seconds`` (``md``, ``uncertainty``, ``oracle``, ``refit`` so far).
    checks : list of dict
        Every check: ``step``, ``predicted`` (eV/Å; NaN during the cold start), ``threshold``,
        ``labelled`` (bool), ``cold`` (bool), ``generation``; a labelled check after the first
        fine-tuning also has ``true``, the force MAE (eV/Å, free atoms) of the model that ran the
        MD on that frame against its new label: ``predicted`` against ``true`` over these checks is
        a prospective calibration check on the frames the MD visits.
    labelled : list of ase.Atoms
        The labelled frames (with ``info["md_step"]``), in labelling order.
    failed : list of dict
        Frames whose labelling failed: ``step`` and ``error``.
    model : MLIP
        The last fine-tuned handle (the pretrained one when no refit happened).
    uncertainty : ForceUncertainty or None
        The last calibrated error bar.
    stop_reason : str
        Why the run ended (``"n_steps"``, ``"budget"``, or what stopped the trajectory).
    """

    history: list
    checks: list
    labelled: list = field(repr=False)
    failed: list
    model: object = field(repr=False)
    uncertainty: object = field(repr=False)
    stop_reason: str = ""

    def plot(self, ax=None):
        """Predicted force error along the trajectory, the threshold, and the labelled frames."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        steps = np.array([c["step"] for c in self.checks])
        pred = np.array([c["predicted"] for c in self.checks], dtype=float)
        thr = np.array([c["threshold"] for c in self.checks], dtype=float)
        lab = np.array([c["labelled"] for c in self.checks], dtype=bool)
        ax.plot(steps, pred, ".-", lw=0.8, label="predicted force error")
        ax.step(steps, thr, where="post", color="k", ls="--", lw=0.8, label="threshold")
        y = np.where(np.isfinite(pred), pred, np.nanmax(np.r_[pred, thr, 0.0]))
        ax.plot(steps[lab], y[lab], "rv", label="labelled")
        ax.set_xlabel("MD step")
        ax.set_ylabel("force error (eV/Å)")
        ax.legend(fontsize=8)
        return ax


class OnTheFlyLearner(BaseEstimator):
    """MD with a model that calls the oracle only where its calibrated error bar is too large.

    Parameters
    ----------
    model : MLIP or str
        The pretrained handle (or a name / path for :func:`skntk.models.load`): it runs the MD
        until the first fine-tuning, and every refit starts from its weights.
    oracle : CalculatorOracle
        Labels frames (tblite GFN2-xTB, EMT, any ASE calculator); called only for checks above
        the threshold (and the cold start), at most ``budget`` times.
    threshold : float or None, default=0.1
        Predicted force error (eV/Å) above which a frame is labelled; ``None`` with
        ``target_fraction``.
    every : int, default=10
        MD steps between checks.
    budget : int, default=20
        Oracle calls at most (failed ones count); the run stops when it is spent.
    refit_every : int, default=2
        Fine-tune after this many new labels, and once more when the run stops at the budget or
        the step count with labels not yet fitted (the result's model has trained on them all).
    temperature_K : float, default=300.0
        Langevin temperature (and initial Maxwell-Boltzmann velocities).
    timestep_fs : float, default=0.5
        MD time step in fs.
    friction : float, default=0.01
        Langevin friction in 1/fs.
    reduction : {"structure", "max_atom"}, default="structure"
        What the threshold applies to: the predicted force MAE of the frame, or the largest
        predicted per-atom error (needs per-atom rows: ``uncertainty`` with a featuriser of
        ``kind="force"`` or ``"joint"`` and ``force_rows="exact"``).
    target_fraction : float or None, default=None
        Instead of a fixed ``threshold``: label about this fraction of the checks, with the
        threshold at the ``1 - target_fraction`` quantile of the predicted errors of the last
        ``window`` calibrated checks (the first 5 calibrated checks only record their predictions:
        the cold start does not spend labels on defining the quantile); checks predicted exactly
        at the threshold (a flat map ties them all) label in the share that keeps the fraction
        (:func:`quantile_threshold`).
    window : int, default=20
        Checks the ``target_fraction`` threshold looks back on.
    n_initial : int, default=2
        Labels of the cold start before the first fine-tuning.
    min_calibration : int, default=4
        Calibration pairs needed before the threshold is used (see the module docstring).
    restart : {"current", "trusted"}, default="current"
        After a label, go on from that frame or from the last checked frame below the threshold.
    max_failures : int, default=5
        Consecutive failed labels after which the run stops (the oracle is never retried on the
        same frame).
    regressor : MLIPRegressor or None, default=None
        Fine-tuning recipe (cloned each refit; its ``model`` is set to ``model``). ``None``:
        ``MLIPRegressor(model, epochs=20)``.
    uncertainty : ForceUncertainty or None, default=None
        Error-bar template (cloned each refit, ``model`` set to the refitted handle). ``None``:
        ``ForceUncertainty()`` with its defaults.
    test_sets : dict of str to list of ase.Atoms, list of ase.Atoms or None, default=None
        Labelled structures the user brings, evaluated at each refit (never oracle calls).
    dynamics : callable or None, default=None
        ``dynamics(atoms, timestep_fs, temperature_K, rng) -> ase.md.MolecularDynamics`` for
        other ASE dynamics; ``None``: :class:`ase.md.langevin.Langevin`.
    checkpoint_dir : str, os.PathLike or None, default=None
        Where labels, models, calibration pairs, the trajectory at the checks and the log are
        written as they happen; a rerun with the same arguments resumes.
    random_state : int or None, default=None
        Seeds the velocities, the Langevin noise and every fine-tuning.
    progress_bar : bool, default=True

    Examples
    --------
    See ``examples/onthefly_emt.py`` and docs/onthefly.md.
    """

    def __init__(self, model, oracle, *, threshold=0.1, every=10, budget=20, refit_every=2,
                 temperature_K=300.0, timestep_fs=0.5, friction=0.01, reduction="structure",
                 target_fraction=None, window=20, n_initial=2, min_calibration=4,
                 restart="current", max_failures=5, regressor=None, uncertainty=None,
                 test_sets=None, dynamics=None, checkpoint_dir=None, random_state=None,
                 progress_bar=True):
        self.model = model
        self.oracle = oracle
        self.threshold = threshold
        self.every = every
        self.budget = budget
        self.refit_every = refit_every
        self.temperature_K = temperature_K
        self.timestep_fs = timestep_fs
        self.friction = friction
        self.reduction = reduction
        self.target_fraction = target_fraction
        self.window = window
        self.n_initial = n_initial
        self.min_calibration = min_calibration
        self.restart = restart
        self.max_failures = max_failures
        self.regressor = regressor
        self.uncertainty = uncertainty
        self.test_sets = test_sets
        self.dynamics = dynamics
        self.checkpoint_dir = checkpoint_dir
        self.random_state = random_state
        self.progress_bar = progress_bar

    # -- set-up --------------------------------------------------------------------------------
    def _check_params(self):
        def positive_int(name, minimum=1):
            v = getattr(self, name)
            if not isinstance(v, Integral) or isinstance(v, bool) or v < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}; got {v!r}.")

        for name in ("every", "budget", "refit_every", "n_initial", "window", "max_failures"):
            positive_int(name)
        positive_int("min_calibration", 4)
        if self.threshold is None and self.target_fraction is None:
            raise ValueError("give threshold (eV/Å) or target_fraction.")
        if self.threshold is not None and (not isinstance(self.threshold, Real)
                                           or not self.threshold > 0):
            raise ValueError(f"threshold must be a force error > 0 in eV/Å; got "
                             f"{self.threshold!r}.")
        if self.target_fraction is not None and not 0 < self.target_fraction < 1:
            raise ValueError(f"target_fraction must be in (0, 1); got {self.target_fraction!r}.")
        for name in ("temperature_K", "timestep_fs", "friction"):
            v = getattr(self, name)
            if not isinstance(v, Real) or not v > 0:
                raise ValueError(f"{name} must be > 0; got {v!r}.")
        if self.reduction not in ("structure", "max_atom"):
            raise ValueError(f"reduction must be 'structure' or 'max_atom'; got "
                             f"{self.reduction!r}.")
        if self.restart not in ("current", "trusted"):
            raise ValueError(f"restart must be 'current' or 'trusted'; got {self.restart!r}.")
        if not hasattr(self.oracle, "label"):
            raise TypeError(f"oracle must have a label(structures) method (CalculatorOracle); "
                            f"got {type(self.oracle).__name__}.")

    def _templates(self, model):
        from skntk.finetune import MLIPRegressor
        from skntk.uncertainty import ForceUncertainty

        reg = clone(self.regressor) if self.regressor is not None else MLIPRegressor(
            model, epochs=20, progress_bar=False)
        reg.set_params(model=model)
        unc = clone(self.uncertainty) if self.uncertainty is not None else ForceUncertainty()
        unc.set_params(min_calibration=self.min_calibration)
        if self.reduction == "max_atom":
            feat = unc.featurizer
            kind = getattr(feat, "kind", None)
            rows = getattr(feat, "force_rows", None)
            if kind not in ("force", "joint") or rows not in ("exact", "forward"):
                raise ValueError(
                    "reduction='max_atom' needs per-atom rows: pass uncertainty=ForceUncertainty("
                    "ForceNTKTransformer(kind='joint', force_rows='exact', ...)); the error bar "
                    f"would use kind={kind!r}, force_rows={rows!r}.")
        return reg, unc

    def _config(self, start, tests):
        keys = [k for k in self.get_params(deep=False)
                if k not in ("progress_bar", "test_sets", "model", "oracle", "regressor",
                             "uncertainty", "dynamics", "checkpoint_dir")]
        cfg = {k: getattr(self, k) for k in keys}
        cfg.update(model=_describe(self.model), oracle=_describe(self.oracle),
                   regressor=_describe(self.regressor), uncertainty=_describe(self.uncertainty),
                   dynamics=None if self.dynamics is None else _describe(self.dynamics),
                   start=_content_hash([start]),
                   test_sets={k: _content_hash(v) for k, v in sorted(tests.items())})
        return cfg

    # -- the run -------------------------------------------------------------------------------
    def run(self, atoms, n_steps):
        """Run (or resume) on-the-fly learning from ``atoms`` for at most ``n_steps`` MD steps.

        Parameters
        ----------
        atoms : ase.Atoms
            The starting structure (velocities drawn at ``temperature_K`` unless it has
            momenta).
        n_steps : int
            MD steps at most; the run also stops when the budget is spent.

        Returns
        -------
        result : OnTheFlyResult
        """
        from ase import Atoms
        from tqdm.auto import tqdm

        from skntk.atoms import as_atoms_list
        from skntk.models import resolve_model

        self._check_params()
        if not isinstance(atoms, Atoms):
            raise TypeError(f"atoms must be one ase.Atoms (the MD start); got "
                            f"{type(atoms).__name__}.")
        if not isinstance(n_steps, Integral) or n_steps < 1:
            raise ValueError(f"n_steps must be an integer >= 1; got {n_steps!r}.")
        pretrained = resolve_model(self.model, type(self).__name__)
        try:
            pretrained.validate([atoms])
        except ValueError as err:
            raise ValueError(f"the starting structure cannot be evaluated by the model: "
                             f"{err}") from None
        tests = self.test_sets or {}
        if not isinstance(tests, dict):
            tests = {"test": tests}
        tests = {str(k): as_atoms_list(v, name=f"test_sets[{k!r}]") for k, v in tests.items()}
        reg_t, unc_t = self._templates(pretrained)
        run = _Run(self, pretrained, reg_t, unc_t, tests, atoms)
        bar = tqdm(total=n_steps, initial=run.step, desc="on-the-fly MD", unit="step",
                   disable=not self.progress_bar)
        try:
            reason = run.loop(n_steps, bar)
        finally:
            bar.close()
        return run.result(reason)


#: What a checkpoint holds of a run besides the labels, the models and the MD state.
_STATE = ("step", "generation", "n_oracle", "failed", "checks", "history", "pairs", "seconds",
          "since_refit", "consecutive_failures", "trusted", "written", "fitted", "tie_credit")


class _Run:
    """One run's state; its ``_commit`` is what a resumed run reads back."""

    def __init__(self, est, pretrained, reg_t, unc_t, tests, start):
        self.est, self.pretrained, self.reg_t, self.unc_t, self.tests = (est, pretrained, reg_t,
                                                                         unc_t, tests)
        root = np.random.SeedSequence(est.random_state)
        self.seed_md, self.seed_fit = (int(s) for s in root.generate_state(2))
        self.ckpt = None if est.checkpoint_dir is None else Path(est.checkpoint_dir)
        self.step, self.generation, self.n_oracle = 0, 0, 0
        self.labelled, self.failed, self.checks, self.history = [], [], [], []
        self.frames = []  # frames of the checks since the last commit (model geometry, no labels)
        self.written = {"trajectory.extxyz": 0, "log.jsonl": 0, "n_checks": 0}  # what is on disk
        self.pairs = {"log_pv": [], "log_f": [], "error": [], "atom_log_pv": [],
                      "atom_log_f": [], "atom_error": []}
        self.seconds = dict.fromkeys(("md", "uncertainty", "oracle", "refit"), 0.0)
        self.since_refit, self.consecutive_failures = 0, 0
        # what the current error bar was fitted on: labels, calibration pairs, per-atom pairs
        self.fitted = (0, 0, 0)
        self.model, self.unc = pretrained, None
        self.atoms = start.copy()
        self.atoms.calc = None
        self.trusted = None
        self.tie_credit = 0.0
        self.rng = np.random.RandomState(self.seed_md % (2 ** 32))
        state = self._open(est._config(start, tests))
        if state is None:
            from ase.md import velocitydistribution as vd

            if not self.atoms.get_momenta().any():
                if hasattr(vd, "thermalize_momenta"):  # ASE >= 3.29
                    vd.thermalize_momenta(self.atoms, est.temperature_K, rng=self.rng)
                else:
                    vd.MaxwellBoltzmannDistribution(self.atoms, temperature_K=est.temperature_K,
                                                    rng=self.rng)
                vd.Stationary(self.atoms)
        else:
            self._restore(state)
        self.atoms.calc = self.model.calculator()
        self.dyn = self._dynamics()

    # -- checkpoint ----------------------------------------------------------------------------
    def _open(self, config):
        if self.ckpt is None:
            return None
        (self.ckpt / "labels").mkdir(parents=True, exist_ok=True)
        cfg = self.ckpt / "config.json"
        config = json.loads(json.dumps(config))
        if cfg.exists():
            old = json.loads(cfg.read_text())
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            if diff:
                raise ValueError(f"checkpoint {str(self.ckpt)!r} was written with other "
                                 f"arguments (differing: {', '.join(diff)}); use another "
                                 f"checkpoint_dir.")
        else:
            _atomic_json(cfg, config)
        path = self.ckpt / "state.pkl"
        return pickle.loads(path.read_bytes()) if path.exists() else None

    def _commit(self):
        if self.ckpt is None:
            return
        a = self.atoms.copy()
        a.calc = None
        self._append()  # first the trajectory and log, then the state that counts them
        state = {k: getattr(self, k) for k in _STATE}
        state.update(n_labelled=len(self.labelled), atoms=a, rng=self.rng.get_state())
        tmp = self.ckpt / "state.pkl.tmp"
        tmp.write_bytes(pickle.dumps(state))
        os.replace(tmp, self.ckpt / "state.pkl")
        _atomic_json(self.ckpt / "history.json", self.history)

    def _append(self):
        """Append the checks since the last commit to ``trajectory.extxyz`` (their frames) and
        ``log.jsonl``, and note the files' sizes (a resume cuts what came after)."""
        import ase.io

        new = self.checks[self.written["n_checks"]:]
        with open(self.ckpt / "trajectory.extxyz", "a") as fh:
            if self.frames:
                ase.io.write(fh, self.frames, format="extxyz")
        with open(self.ckpt / "log.jsonl", "a") as fh:
            fh.writelines(json.dumps(c) + "\n" for c in new)
        self.frames = []
        self.written = {name: (self.ckpt / name).stat().st_size
                        for name in ("trajectory.extxyz", "log.jsonl")}
        self.written["n_checks"] = len(self.checks)

    def _restore(self, state):
        import ase.io

        for k in _STATE:
            setattr(self, k, state[k])
        for name in ("trajectory.extxyz", "log.jsonl"):  # checks after the state: replayed
            path = self.ckpt / name
            if path.exists() and path.stat().st_size > self.written[name]:
                os.truncate(path, self.written[name])
        self.labelled = [ase.io.read(self.ckpt / "labels" / f"{k}.extxyz", format="extxyz")
                         for k in range(state["n_labelled"])]
        self.atoms = state["atoms"]
        self.rng.set_state(state["rng"])
        if self.generation > 0:
            self.model = self._load_model(self.generation)
            self.unc = self._fit_uncertainty()

    def _save_model(self, g):
        if self.ckpt is not None:
            torch.save(self.model.module.state_dict(), self.ckpt / "model.pt.tmp")
            os.replace(self.ckpt / "model.pt.tmp", self.ckpt / f"model-{g}.pt")

    def _load_model(self, g):
        model = self.pretrained.copy()
        state = torch.load(self.ckpt / f"model-{g}.pt", map_location="cpu", weights_only=True)
        model.module.load_state_dict(state)
        return model

    # -- MD ------------------------------------------------------------------------------------
    def _dynamics(self):
        from ase import units

        est = self.est
        if est.dynamics is not None:
            return est.dynamics(self.atoms, est.timestep_fs, est.temperature_K, self.rng)
        from ase.md.langevin import Langevin

        return Langevin(self.atoms, est.timestep_fs * units.fs, temperature_K=est.temperature_K,
                        friction=est.friction / units.fs, fixcm=False, rng=self.rng)

    def _frame_problem(self):
        """Why the model cannot evaluate the current frame, or None."""
        try:
            self.model.validate([self.atoms])
        except ValueError as err:
            return str(err)
        f = self.atoms.get_forces()
        if not np.all(np.isfinite(f)):
            return "the model's forces are not finite"
        return None

    # -- checks, labels, refits ----------------------------------------------------------------
    def _threshold(self):
        """The threshold (eV/Å) and the share of checks tied with it that label: the fixed
        ``threshold`` (no share), or :func:`quantile_threshold` of the predictions of the last
        ``window`` calibrated checks, whether they labelled or not (NaN below 5: no label)."""
        est = self.est
        if est.target_fraction is None:
            return float(est.threshold), 0.0
        recent = [c["predicted"] for c in self.checks
                  if np.isfinite(c["predicted"])][-est.window:]
        return quantile_threshold(recent, est.target_fraction)

    def _inputs(self):
        """Map inputs of the current frame under the current error bar (model forces reused)."""
        e = float(self.atoms.get_potential_energy())
        f = np.asarray(self.atoms.get_forces(), dtype=np.float64)
        return self.unc.map_inputs([self.atoms], forces=[f], energies=[e])

    def _predict(self, inputs):
        if self.est.reduction == "max_atom":
            return float(self.unc.predict_from_inputs(inputs, return_atoms=True)[1][0].max())
        return float(self.unc.predict_from_inputs(inputs)[0])

    def _check(self):
        calibrated = self.unc is not None and hasattr(self.unc, "coef_")
        t0 = time.perf_counter()
        inputs = self._inputs() if self.unc is not None else None
        predicted = self._predict(inputs) if calibrated else float("nan")
        self.seconds["uncertainty"] += time.perf_counter() - t0
        threshold, share = self._threshold()
        # the cold start ends with the calibration; a check before the target_fraction
        # threshold exists is recorded, not labelled (predicted > NaN is False)
        cold = not calibrated
        label = trigger(predicted, threshold, cold=cold)
        if not label and not cold and share > 0.0 and _tied(predicted, threshold):
            # a tie with the quantile: label the window's share of tied checks (credit carried)
            self.tie_credit += share
            if self.tie_credit >= 1.0 - 1e-9:
                label, self.tie_credit = True, self.tie_credit - 1.0
        label = label and self.n_oracle < self.est.budget
        frame = self.atoms.copy()
        frame.calc = None
        frame.info["md_step"] = self.step
        check = {"step": self.step, "predicted": predicted, "threshold": threshold,
                 "labelled": False, "cold": cold, "generation": self.generation}
        if not label and not cold and np.isfinite(threshold):
            self.trusted = (self.atoms.get_positions(), self.atoms.get_momenta(), self.step)
        if label:
            check["labelled"] = self._label(frame, inputs)
            if check["labelled"] and inputs is not None:
                check["true"] = self.pairs["error"][-1]  # the pair _label just added
        self.checks.append(check)
        if self.ckpt is not None:
            self.frames.append(frame)
        return check

    def _label(self, frame, inputs):
        """Label ``frame`` (reusing a label a killed run left on disk); True when it worked."""
        import ase.io

        k = len(self.labelled)
        path = None if self.ckpt is None else self.ckpt / "labels" / f"{k}.extxyz"
        fail = None if self.ckpt is None else self.ckpt / "labels" / f"failed-step{self.step}.txt"
        t0 = time.perf_counter()
        if path is not None and path.exists():  # labelled before a kill: never twice
            res_atoms, error = ase.io.read(path, format="extxyz"), None
            if res_atoms.info.get("md_step") != self.step:
                raise RuntimeError(f"label {path} is of MD step {res_atoms.info.get('md_step')}, "
                                   f"but the resumed run is at step {self.step}: the checkpoint "
                                   f"does not replay; use another checkpoint_dir.")
        elif fail is not None and fail.exists():
            res_atoms, error = None, fail.read_text()
        else:
            (res,) = self.est.oracle.label([frame])
            res_atoms, error = res.atoms, res.error
            if error is None:
                res_atoms.info["md_step"] = self.step
            if path is not None:
                if error is None:
                    tmp = path.with_name(path.name + ".tmp")
                    ase.io.write(tmp, res_atoms, format="extxyz")
                    os.replace(tmp, path)
                    res_atoms = ase.io.read(path, format="extxyz")  # the bytes a resume reads
                else:
                    _atomic_text(fail, error)
        self.seconds["oracle"] += time.perf_counter() - t0
        self.n_oracle += 1
        if error is not None:
            self.failed.append({"step": self.step, "error": error})
            self.consecutive_failures += 1
            logger.warning("labelling the frame of MD step %d failed: %s", self.step, error)
            return False
        self.consecutive_failures = 0
        self.labelled.append(res_atoms)
        self.since_refit += 1
        if inputs is not None:
            self._add_pair(inputs, res_atoms)
        return True

    def _add_pair(self, inputs, labelled):
        """One calibration pair: the map inputs of the model of this moment and its true force
        error on the frame (new to it)."""
        from skntk.io import free_atoms, get_labels

        _, (f_ref,) = get_labels([labelled])
        free = free_atoms(labelled)
        err = np.abs(inputs["forces"][0] - f_ref)[free]
        p = self.pairs
        p["log_pv"].append(None if inputs["log_pv"] is None else float(inputs["log_pv"][0]))
        p["log_f"].append(float(inputs["log_f"][0]))
        p["error"].append(float(err.mean()))
        if inputs.get("atom_log_pv") is not None:
            p["atom_log_pv"].extend(inputs["atom_log_pv"][free].tolist())
            p["atom_log_f"].extend(inputs["atom_log_f"][free].tolist())
            p["atom_error"].extend(err.mean(axis=1).tolist())

    def _fit_uncertainty(self):
        """The error bar of the current model, from the labels and pairs of its refit
        (``self.fitted``: a resumed run must not add labels or pairs that came later)."""
        n_labels, n_pairs, n_atoms = self.fitted
        unc = clone(self.unc_t).set_params(model=self.model)
        unc.fit_posterior(self.labelled[:n_labels])
        p = {k: v[:n_atoms if k.startswith("atom_") else n_pairs] for k, v in self.pairs.items()}
        if len(p["error"]) >= self.est.min_calibration:
            atoms = None
            if p["atom_error"]:
                atoms = (np.array(p["atom_log_pv"]), np.array(p["atom_log_f"]),
                         np.array(p["atom_error"]))
            pv = None if p["log_pv"] and p["log_pv"][0] is None else np.array(p["log_pv"])
            unc.calibrate_pairs(pv, np.array(p["log_f"]), np.array(p["error"]), atoms=atoms)
        return unc

    def _refit(self):
        t0 = time.perf_counter()
        self.generation += 1
        reg = clone(self.reg_t).set_params(
            random_state=int(np.random.SeedSequence([self.seed_fit, self.generation])
                             .generate_state(1)[0]))
        reg.fit(self.labelled)
        self.model = reg.model_
        self.since_refit = 0
        self._save_model(self.generation)
        self.fitted = (len(self.labelled), len(self.pairs["error"]),
                       len(self.pairs["atom_error"]))
        self.unc = self._fit_uncertainty()
        self.seconds["refit"] += time.perf_counter() - t0
        entry = {"generation": self.generation, "n_labels": len(self.labelled),
                 "md_steps": self.step, "n_oracle": self.n_oracle,
                 "threshold": self._threshold()[0], "n_calibration": len(self.pairs["error"]),
                 "map": ({"coef": self.unc.coef_.tolist(),
                          "residual_var": float(self.unc.residual_var_)}
                         if hasattr(self.unc, "coef_") else None),
                 "seconds": dict(self.seconds)}
        if self.tests:
            from skntk.metrics import evaluate

            calibrated = hasattr(self.unc, "coef_")
            entry["metrics"] = {k: evaluate(self.model, v) for k, v in self.tests.items()}
            entry["true"] = {k: m["force_mae"] for k, m in entry["metrics"].items()}
            entry["predicted"] = {k: (float(np.mean(self.unc.predict(v))) if calibrated
                                      else float("nan")) for k, v in self.tests.items()}
        self.history.append(entry)
        # the MD goes on with the new model (from the trusted frame with restart="trusted")
        if self.est.restart == "trusted" and self.trusted is not None:
            pos, mom, _ = self.trusted
            self.atoms.set_positions(pos)
            self.atoms.set_momenta(mom)
        self.atoms.calc = self.model.calculator()

    def loop(self, n_steps, bar):
        est = self.est
        if not self.checks:  # the starting frame is the first check
            self._step_check(bar)
        while True:
            if est.n_initial <= len(self.labelled) and (
                    self.generation == 0 or self.since_refit >= est.refit_every):
                if self.since_refit > 0:
                    self._refit()
            self._commit()
            if self.n_oracle >= est.budget:
                return self._last_refit("budget")
            if self.consecutive_failures >= est.max_failures:
                return (f"{self.consecutive_failures} labels failed in a row (last: "
                        f"{self.failed[-1]['error']})")
            if self.step >= n_steps:
                return self._last_refit("n_steps")
            n = min(est.every, n_steps - self.step)
            t0 = time.perf_counter()
            self.dyn.run(n)
            self.seconds["md"] += time.perf_counter() - t0
            self.step += n
            bar.update(n)
            problem = self._frame_problem()
            if problem is not None:
                self._commit()
                return f"stopped at MD step {self.step}: {problem}"
            self._step_check(bar)

    def _last_refit(self, reason):
        """At the budget or the step count: one more refit when labels came in since the last,
        so that the result's model has trained on every label."""
        if self.since_refit > 0 and len(self.labelled) >= self.est.n_initial:
            self._refit()
            self._commit()
        return reason

    def _step_check(self, bar):
        c = self._check()
        bar.set_postfix(labels=len(self.labelled), error=f"{c['predicted']:.3g}")

    def result(self, reason):
        checks = [dict(c) for c in self.checks]
        logger.info("on-the-fly run ended (%s): %d labels, %d MD steps", reason,
                    len(self.labelled), self.step)
        return OnTheFlyResult(history=self.history, checks=checks, labelled=list(self.labelled),
                              failed=list(self.failed), model=self.model,
                              uncertainty=self.unc, stop_reason=reason)

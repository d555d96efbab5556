"""The active-learning loop: select → label → fine-tune → evaluate, round after round, resumable.

:class:`ActiveLearningLoop` composes a selector (a :class:`~skntk.pipeline.SelectionPipeline` with a
featuriser, a :class:`~skntk.al.committee.CommitteeSelector`, a
:class:`~skntk.selection.baselines.RandomSelector`), a regressor
(:class:`~skntk.finetune.MLIPRegressor`) and an oracle (:mod:`skntk.al.oracles`). Every round
fine-tunes from the **pretrained** model on all labels so far, so rounds are comparable.

With a ``checkpoint_dir`` every finished step is on disk before the next begins: the picks of a
round (``round-<k>-picks.json``) before labelling, each label as soon as it exists
(``labels/<i>.extxyz``), the round's state (``state.json``, written atomically) after evaluation.
A killed run restarted with the same arguments resumes from its last finished round, reuses the
recorded picks and labels (nothing is labelled twice) and ends in the state an uninterrupted run
reaches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, clone
from sklearn.pipeline import Pipeline
from tqdm.auto import tqdm

from skntk.atoms import as_atoms_list, validate_structures
from skntk.io import get_labels
from skntk.metrics import evaluate

logger = logging.getLogger(__name__)

__all__ = ["ActiveLearningLoop", "ActiveLearningResult"]

_STAGES = ("featurize", "select", "label", "finetune", "evaluate")


@dataclass
class ActiveLearningResult:
    """What :meth:`ActiveLearningLoop.run` returns.

    Attributes
    ----------
    history : list of dict
        One entry per round (round 0: the initial labelled set): ``round``, ``n_labelled``,
        ``metrics`` (``{test_set: evaluate(...) dict}``), ``timings`` (seconds per stage:
        featurize, select, label, finetune, evaluate; ``committee_finetune`` for a committee),
        ``finetune`` (``best_epoch``: the epoch whose weights were kept, 0 = the pretrained
        ones; ``epochs_run``: the epochs trained before early stopping; ``max_epochs``: the cap),
        ``selected`` (pool indices labelled in that round), ``failed`` (pool index → reason).
    selected : list of int
        Pool indices in labelling order (successful labels only).
    failed : dict of int to str
        Pool indices whose labelling failed, with the reason.
    model : MLIP
        The last fine-tuned handle.
    labelled : list of ase.Atoms
        The initial labelled structures followed by the new labels, in labelling order.
    """

    history: list
    selected: list
    failed: dict
    model: object
    labelled: list = field(default_factory=list, repr=False)

    def to_frame(self):
        """The history as a long :class:`pandas.DataFrame`: one row per (round, test set)."""
        import pandas as pd

        rows = []
        for h in self.history:
            for name, m in h["metrics"].items():
                rows.append({"round": h["round"], "n_labelled": h["n_labelled"], "test_set": name,
                             **{k: v for k, v in m.items() if not isinstance(v, dict)},
                             **{f"time_{k}": v for k, v in h["timings"].items()}})
        return pd.DataFrame(rows)

    def plot(self, metric="force_mae", ax=None):
        """Learning curves: ``metric`` against the number of labels, one line per test set.

        Returns the matplotlib ``Axes``.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        names = sorted({n for h in self.history for n in h["metrics"]})
        for name in names:
            pts = [(h["n_labelled"], h["metrics"][name][metric]) for h in self.history
                   if name in h["metrics"]]
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        unit = "eV/Å" if metric.startswith("force") else "eV/atom"
        ax.set_xlabel("labelled structures")
        ax.set_ylabel(f"{metric} ({unit})")
        ax.legend()
        return ax


def _content_hash(structures) -> str:
    """One hash of the structures' contents (:func:`skntk.io.structure_hash`), in order."""
    from skntk.io import structure_hash

    return hashlib.sha256("".join(map(structure_hash, structures)).encode()).hexdigest()[:16]


#: Parameters that never change a result (what is shown, where the work runs, how errors read).
_UNDESCRIBED = ("progress_bar", "verbose", "n_jobs", "scheduler_address", "error_prefix")


def _describe(obj) -> str:
    """A description of an argument that is stable across processes (no memory addresses)."""
    from skntk.models.base import MLIP

    if isinstance(obj, MLIP):  # the weights too: another model with the same repr differs
        h = hashlib.sha256()
        for name, t in obj.module.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
        return f"{obj!r}[state {h.hexdigest()[:12]}]"
    if hasattr(obj, "get_params"):
        params = obj.get_params(deep=False)
        items = ", ".join(f"{k}={_describe(params[k])}" for k in sorted(params)
                          if k not in _UNDESCRIBED)
        return f"{type(obj).__name__}({items})"
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(_describe(v) for v in obj) + "]"
    if hasattr(obj, "parameters") and hasattr(obj, "calculate"):  # an ASE calculator
        params = {k: repr(v) for k, v in sorted(dict(obj.parameters).items())}
        return f"{type(obj).__name__}({params})"
    if type(obj).__module__.startswith("skntk.al"):  # oracles: their arguments
        items = ", ".join(f"{k}={_describe(v)}" for k, v in sorted(vars(obj).items())
                          if not k.startswith("_") and k != "n_jobs")
        return f"{type(obj).__name__}({items})"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


def _top_level_args(text: str):
    """``(name, {arg: value})`` of ``"Name(a=1, b=Other(x=2))"`` (as :func:`_describe` writes),
    or ``None`` when ``text`` has another shape."""
    m = re.fullmatch(r"(\w+)\((.*)\)", text, flags=re.DOTALL)
    if m is None:
        return None
    args, depth, start, body = {}, 0, 0, m.group(2)
    for k, ch in enumerate(body + ","):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            item = body[start:k].strip()
            start = k + 1
            if not item:
                continue
            if "=" not in item:
                return None
            key, value = item.split("=", 1)
            args[key.strip()] = value
    return m.group(1), args


def _differences(key: str, old, new) -> str:
    """``key.field: checkpoint X vs now Y`` for the fields that differ (nested estimators are
    followed), instead of two whole descriptions."""
    if isinstance(old, str) and isinstance(new, str):
        a, b = _top_level_args(old), _top_level_args(new)
        if a is not None and b is not None and a[0] == b[0]:
            fields = sorted(k for k in set(a[1]) | set(b[1]) if a[1].get(k) != b[1].get(k))
            if fields:
                return "; ".join(_differences(f"{key}.{f}", a[1].get(f), b[1].get(f))
                                 for f in fields)
    return f"{key}: checkpoint {_short(old)} vs now {_short(new)}"


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + " ...'"


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _featurizer_of(selector):
    """The first step of a pipeline when it featurises (not a selector), else ``None``.

    The loop computes its features (once, or each round with ``refeaturize="current"``) and hands
    them to the pipeline, which passes features by its fitted featuriser."""
    from skntk.selection._base import BaseSelector

    if isinstance(selector, Pipeline) and len(selector.steps) > 1:
        first = selector.steps[0][1]
        if hasattr(first, "transform") and not isinstance(first, BaseSelector) \
                and not hasattr(first, "select"):
            return first
    return None


def _seed_all(estimator, seed: int):
    """Set every ``random_state`` parameter left at ``None`` (at any depth) to ``seed``."""
    if not hasattr(estimator, "get_params"):
        return estimator
    unset = {k: seed for k, v in estimator.get_params(deep=True).items()
             if k.split("__")[-1] == "random_state" and v is None}
    return estimator.set_params(**unset) if unset else estimator


class ActiveLearningLoop(BaseEstimator):
    """Rounds of select → label → fine-tune → evaluate, resumable from a checkpoint directory.

    Parameters
    ----------
    selector : estimator with ``fit(X_labelled)`` and ``select(X_candidates, n_to_select)``
        A :class:`~skntk.pipeline.SelectionPipeline` whose first step featurises ``ase.Atoms``
        (the loop computes the pool's features once and passes each round's rows to its
        ``fit`` and ``select``, which skip the fitted featuriser), a
        :class:`~skntk.al.committee.CommitteeSelector`, a
        :class:`~skntk.selection.baselines.RandomSelector`, or anything taking lists of Atoms.
    regressor : MLIPRegressor
        Fine-tuned from its (pretrained) ``model`` on all labels each round.
    oracle : PoolOracle or CalculatorOracle
    n_rounds : int, default=3
        Rounds of selection after round 0 (the initial labelled set).
    batch_size : int, default=10
        Structures selected per round (failed labels are not replaced).
    test_sets : dict of str to list of ase.Atoms, list of ase.Atoms or None, default=None
        Labelled structures evaluated every round (a list is named ``"test"``).
    refeaturize : {"pretrained", "current"}, default="pretrained"
        Features of the pretrained model (computed once; the paper) or of the latest fine-tuned
        model (the featuriser's ``model`` parameter is set to it each round).
    groups : str or None, default=None
        ``info`` key for per-subgroup test metrics (:func:`skntk.metrics.evaluate`).
    checkpoint_dir : str, os.PathLike or None, default=None
        Where rounds are saved; a rerun with the same arguments resumes (a finished run returns
        at once; a larger ``n_rounds`` continues it); a directory written with other arguments,
        or holding more rounds than ``n_rounds``, is refused.
    feature_cache : str, os.PathLike or None, default=None
        Directory of the content-addressed feature cache (:func:`skntk.cache.transform_cached`)
        for the pretrained features; ``None``: ``checkpoint_dir/features`` (no cache without a
        checkpoint). Runs that share one directory (methods on the same pool and model, e.g. the
        evidence harness) compute each structure's features once.
    random_state : int or None, default=None
        Seeds the whole run: every unset ``random_state`` of the selector, and each round's
        fine-tuning (``SeedSequence(random_state)`` spawns one seed per round).
    uncertainty : ForceUncertainty or None, default=None
        With ``test_sets``: each round builds this error bar for the round's model
        (:meth:`~skntk.uncertainty.ForceUncertainty.from_regressor`: the posterior of its
        training structures, calibrated on the regressor's validation split) and records, per
        test set, the mean predicted and true force MAE and their Spearman correlation over the
        structures (``history[k]["uncertainty"]``), or why it could not (a validation split below
        ``min_calibration``).
    progress_bar : bool, default=True

    Examples
    --------
    See ``examples/active_learning_emt.py`` and docs/active_learning.md.
    """

    def __init__(self, selector, regressor, oracle, *, n_rounds=3, batch_size=10,
                 test_sets=None, refeaturize="pretrained", groups=None, checkpoint_dir=None,
                 feature_cache=None, random_state=None, uncertainty=None, progress_bar=True):
        self.selector = selector
        self.regressor = regressor
        self.oracle = oracle
        self.n_rounds = n_rounds
        self.batch_size = batch_size
        self.test_sets = test_sets
        self.refeaturize = refeaturize
        self.groups = groups
        self.checkpoint_dir = checkpoint_dir
        self.feature_cache = feature_cache
        self.random_state = random_state
        self.uncertainty = uncertainty
        self.progress_bar = progress_bar

    # -- set-up --------------------------------------------------------------------------------
    def _validate(self, labelled, pool):
        if self.refeaturize not in ("pretrained", "current"):
            raise ValueError(f"refeaturize must be 'pretrained' or 'current'; got "
                             f"{self.refeaturize!r}.")
        for name in ("n_rounds", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < (0 if name == "n_rounds" else 1):
                raise ValueError(f"{name} must be an int >= {0 if name == 'n_rounds' else 1}; "
                                 f"got {v!r}.")
        labelled = as_atoms_list(labelled, name="labelled")
        pool = as_atoms_list(pool, name="pool")
        if not labelled:
            raise ValueError("labelled is empty: the loop fine-tunes on it in round 0.")
        if not pool:
            raise ValueError("pool is empty: nothing to select from.")
        validate_structures(labelled, name="labelled")  # refused before any work
        validate_structures(pool, name="pool")
        get_labels(labelled, name="labelled")
        tests = self.test_sets
        if tests is None:
            tests = {}
        elif not isinstance(tests, dict):
            tests = {"test": tests}
        tests = {str(k): as_atoms_list(v, name=f"test_sets[{k!r}]") for k, v in tests.items()}
        return labelled, pool, tests

    def _config(self, labelled, pool, tests):
        extra = {} if self.uncertainty is None else {"uncertainty": _describe(self.uncertainty)}
        return extra | {
            "selector": _describe(self.selector),
            "regressor": _describe(self.regressor),
            "oracle": _describe(self.oracle),
            "batch_size": int(self.batch_size),
            "refeaturize": self.refeaturize,
            "groups": self.groups,
            "random_state": self.random_state,
            "labelled": _content_hash(labelled),
            "pool": _content_hash(pool),
            "test_sets": {k: _content_hash(v) for k, v in sorted(tests.items())},
        }

    def _open_checkpoint(self, config):
        if self.checkpoint_dir is None:
            return None, None
        ckpt = Path(self.checkpoint_dir)
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "labels").mkdir(exist_ok=True)
        cfg_path = ckpt / "config.json"
        if cfg_path.exists():
            old = json.loads(cfg_path.read_text())
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            if diff:
                detail = "; ".join(_differences(k, old.get(k), config.get(k)) for k in diff)
                raise ValueError(f"checkpoint {str(ckpt)!r} was written with other arguments "
                                 f"({detail}); use another checkpoint_dir.")
        else:
            _atomic_json(cfg_path, config)
        state_path = ckpt / "state.json"
        state = json.loads(state_path.read_text()) if state_path.exists() else None
        return ckpt, state

    # -- the loop ------------------------------------------------------------------------------
    def run(self, labelled, pool) -> ActiveLearningResult:
        """Run (or resume) the rounds.

        Parameters
        ----------
        labelled : list of ase.Atoms
            Initial labelled structures (labels as :func:`skntk.io.get_labels` reads them).
        pool : list of ase.Atoms
            Candidates; the oracle labels those picked.

        Returns
        -------
        result : ActiveLearningResult
        """
        labelled, pool, tests = self._validate(labelled, pool)
        config = self._config(labelled, pool, tests)
        ckpt, state = self._open_checkpoint(config)
        # round k fine-tunes with seeds[k] and the selector has a seed of its own; none depends on
        # n_rounds (generate_state is prefix-stable), so a run grown to more rounds repeats the
        # rounds of the shorter one
        root = np.random.SeedSequence(self.random_state)
        seeds = root.generate_state(self.n_rounds + 1)
        selector = _seed_all(clone(self.selector), int(root.spawn(1)[0].generate_state(1)[0]))
        featurizer = _featurizer_of(selector)

        excluded = self._excluded(labelled, pool)
        history, selected, failed = [], [], {}
        labels: dict[int, object] = {}
        model = None
        if state is not None:
            history = state["history"]
            if len(history) > self.n_rounds + 1:  # never a longer run's history or model
                raise ValueError(
                    f"checkpoint {str(ckpt)!r} holds {len(history) - 1} finished rounds "
                    f"(rounds 0-{len(history) - 1}, {history[-1]['n_labelled']} labelled "
                    f"structures, the model of round {len(history) - 1}); n_rounds="
                    f"{self.n_rounds} asks for fewer: pass n_rounds={len(history) - 1} to read it "
                    f"(result.history[:{self.n_rounds + 1}] is the shorter run's history) or "
                    f"use another checkpoint_dir.")
            selected = [int(i) for i in state["selected"]]
            failed = {int(k): v for k, v in state["failed"].items()}
            labels = {i: self._read_label(ckpt, i) for i in selected}
            model = self._load_model(ckpt)
        done = len(history)
        features = None
        bar = tqdm(range(done, self.n_rounds + 1), desc="active learning",
                   disable=not self.progress_bar, unit="round")
        for rnd in bar:
            timings = dict.fromkeys(_STAGES, 0.0)
            new, new_failed = [], {}
            if rnd > 0:
                picks = self._read_picks(ckpt, rnd)
                if picks is None:
                    if features is None and featurizer is not None \
                            and self.refeaturize == "pretrained":
                        features = self._featurize(featurizer, labelled + pool, labelled, ckpt,
                                                   timings)
                    picks = self._select(selector, featurizer, features, labelled, pool,
                                         labels, selected, failed, model, timings, excluded)
                    if ckpt is not None:
                        _atomic_json(ckpt / f"round-{rnd}-picks.json", picks)
                new, new_failed = self._label(pool, picks, labels, failed, ckpt, timings)
                selected += new
                failed.update(new_failed)
            train = labelled + [labels[i] for i in selected]
            t0 = time.perf_counter()
            reg = clone(self.regressor).set_params(random_state=int(seeds[rnd]))
            reg.fit(train)
            model = reg.model_
            timings["finetune"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            metrics = {name: evaluate(reg, atoms, groups=self.groups)
                       for name, atoms in tests.items()}
            timings["evaluate"] = time.perf_counter() - t0
            entry = {"round": rnd, "n_labelled": len(train), "metrics": metrics,
                     "finetune": {"best_epoch": int(reg.best_epoch_),
                                  "epochs_run": int(reg.history_[-1]["epoch"]),
                                  "max_epochs": int(reg.epochs)},
                     "timings": timings, "selected": new,
                     "failed": {str(k): v for k, v in new_failed.items()}}
            if self.uncertainty is not None and tests:
                t0 = time.perf_counter()
                entry["uncertainty"] = _error_bars(self.uncertainty, reg, train, tests)
                timings["uncertainty"] = time.perf_counter() - t0
            history.append(entry)
            if ckpt is not None:
                self._commit(ckpt, history, selected, failed, model)
            logger.info("round %d: %d labelled, %s", rnd, len(train),
                        {k: round(m.get("force_mae", float("nan")), 4)
                         for k, m in metrics.items()})
        if model is None:  # n_rounds finished earlier and nothing was loaded
            raise RuntimeError("no model: the checkpoint holds no finished round.")
        return ActiveLearningResult(history=history, selected=selected, failed=failed,
                                    model=model,
                                    labelled=labelled + [labels[i] for i in selected])

    # -- stages --------------------------------------------------------------------------------
    def _featurize(self, featurizer, structures, fit_on, ckpt, timings):
        from skntk.cache import transform_cached

        t0 = time.perf_counter()
        featurizer.fit(fit_on)
        cache = self.feature_cache if self.feature_cache is not None else (
            None if ckpt is None else ckpt / "features")
        if cache is not None:
            out = transform_cached(featurizer, structures, cache)
        else:
            out = featurizer.transform(structures)
        timings["featurize"] += time.perf_counter() - t0
        return out

    @staticmethod
    def _excluded(labelled, pool) -> set:
        """Pool indices that are never candidates: later copies of a pool structure and copies of
        labelled structures (:class:`skntk.io.DuplicateIndex`); one warning for each kind."""
        import warnings

        from skntk.io import DuplicateIndex, duplicate_signature
        from skntk.pipeline import (
            _labelled_index,
            duplicates_message,
            labelled_duplicates_message,
        )

        lab = _labelled_index(labelled)
        seen, copies, of_labelled = DuplicateIndex(), set(), []
        for i, atoms in enumerate(pool):
            sig = duplicate_signature(atoms)
            if lab is not None and lab.find(sig) is not None:
                of_labelled.append(i)
                continue
            n_seen = len(seen)
            if seen.add(sig) < n_seen:  # a copy of an earlier pool structure
                copies.add(i)
        if copies:
            warnings.warn(duplicates_message(len(copies)), UserWarning, stacklevel=3)
        if of_labelled:
            warnings.warn(labelled_duplicates_message(
                len(of_labelled), len(pool),
                (f"pool[{i}] ({pool[i].get_chemical_formula()})" for i in of_labelled)),
                UserWarning, stacklevel=3)
        return copies | set(of_labelled)

    def _select(self, selector, featurizer, features, labelled, pool, labels, selected,
                failed, model, timings, excluded=frozenset()):
        """Pool indices of the round's picks: the selector fitted on the training structures
        (their features when the loop featurises) selects among the candidates."""
        taken = set(selected) | set(failed) | set(excluded)
        candidates = np.array([i for i in range(len(pool)) if i not in taken], dtype=np.int64)
        n = min(int(self.batch_size), candidates.size)
        if n == 0:
            return []
        train_atoms = labelled + [labels[i] for i in selected]
        L = len(labelled)
        if featurizer is not None and self.refeaturize == "current" and model is not None:
            featurizer.set_params(model=model)
            t0 = time.perf_counter()
            featurizer.fit(train_atoms)
            feats = featurizer.transform(train_atoms + [pool[i] for i in candidates])
            timings["featurize"] += time.perf_counter() - t0
            train_f, cand_f = feats[np.arange(len(train_atoms))], feats[
                np.arange(len(train_atoms), len(feats))]
        elif featurizer is not None and features is not None:
            train_f = features[np.concatenate([np.arange(L), L + np.asarray(selected, int)])]
            cand_f = features[L + candidates]
        else:
            train_f, cand_f = train_atoms, [pool[i] for i in candidates]
        t0 = time.perf_counter()
        selector.fit(train_f)  # features pass the pipeline's fitted featuriser as they are
        idx = np.asarray(selector.select(cand_f, n), dtype=np.int64)
        timings["select"] += time.perf_counter() - t0
        fit_time = getattr(selector, "fit_time_", None)
        if fit_time is not None:
            timings["committee_finetune"] = float(fit_time)
        return [int(i) for i in candidates[idx]]

    def _label(self, pool, picks, labels, failed, ckpt, timings):
        todo = [i for i in picks if i not in labels and i not in failed]
        new_failed = {}
        done = {}
        if ckpt is not None:  # labelled before an interruption: reuse, never label twice
            for i in list(todo):
                path = ckpt / "labels" / f"{i}.extxyz"
                fail = ckpt / "labels" / f"{i}.failed"
                if path.exists():
                    done[i] = self._read_label(ckpt, i)
                    todo.remove(i)
                elif fail.exists():
                    new_failed[i] = fail.read_text()
                    todo.remove(i)
        t0 = time.perf_counter()
        for i in todo:  # one at a time, so each label is on disk as soon as it exists
            (res,) = self.oracle.label([pool[i]])
            error = res.error  # the oracle saw one structure: "structure 0" is pool[i]
            if error is not None:
                error = re.sub(r"^structure 0\b", f"pool[{i}]", error)
            if error is None:  # any oracle's label passes the check labels pass on entry
                try:
                    get_labels([res.atoms], require_forces=True)
                except (ValueError, TypeError) as exc:  # "X[0] (H2O) has ..." -> "pool[i] ..."
                    error = (f"the oracle's label is refused: pool[{i}] "
                             f"{str(exc).removeprefix('X[0] ')}")
            if error is None:
                done[i] = res.atoms
                if ckpt is not None:  # what a resumed run will read: use the same bytes now
                    self._write_label(ckpt, i, res.atoms)
                    done[i] = self._read_label(ckpt, i)
            else:
                new_failed[i] = error
                logger.warning("labelling pool structure %d failed: %s", i, error)
                if ckpt is not None:
                    _atomic_text(ckpt / "labels" / f"{i}.failed", error)
        timings["label"] += time.perf_counter() - t0
        labels.update(done)
        return [i for i in picks if i in done], new_failed

    # -- persistence ---------------------------------------------------------------------------
    @staticmethod
    def _write_label(ckpt, i, atoms):
        import ase.io

        path = ckpt / "labels" / f"{i}.extxyz"
        tmp = path.with_name(path.name + ".tmp")
        ase.io.write(tmp, atoms, format="extxyz")
        os.replace(tmp, path)

    @staticmethod
    def _read_label(ckpt, i):
        import ase.io

        return ase.io.read(ckpt / "labels" / f"{i}.extxyz", format="extxyz")

    @staticmethod
    def _read_picks(ckpt, rnd):
        if ckpt is None:
            return None
        path = ckpt / f"round-{rnd}-picks.json"
        return [int(i) for i in json.loads(path.read_text())] if path.exists() else None

    def _commit(self, ckpt, history, selected, failed, model):
        torch.save(model.module.state_dict(), ckpt / "model.pt.tmp")
        os.replace(ckpt / "model.pt.tmp", ckpt / "model.pt")
        _atomic_json(ckpt / "state.json", {
            "history": history, "selected": selected,
            "failed": {str(k): v for k, v in failed.items()}})
        with open(ckpt / "history.jsonl", "w") as fh:  # the log, rewritten from the state
            for h in history:
                fh.write(json.dumps(h) + "\n")

    def _load_model(self, ckpt):
        from skntk.models import resolve_model

        base = resolve_model(self.regressor.model, "ActiveLearningLoop")
        model = base.copy()
        state = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
        model.module.load_state_dict(state)
        return model


def _error_bars(template, reg, train, tests):
    """``{test_set: {"predicted", "true", "spearman"}}`` of the round's error bar (mean predicted
    and true per-structure force MAE, eV/Å, and their rank correlation), or ``{"skipped": why}``
    when the regressor's validation split is too small to calibrate it."""
    from scipy.stats import spearmanr

    from skntk.io import free_atoms, get_labels
    from skntk.models.predict import predict_energies_forces
    from skntk.uncertainty import ForceUncertainty

    params = {k: v for k, v in clone(template).get_params(deep=False).items() if k != "model"}
    try:
        est = ForceUncertainty.from_regressor(reg, atoms=train, **params)
    except ValueError as err:
        return {"skipped": str(err)}
    out = {}
    for name, atoms in tests.items():
        _, forces = get_labels(atoms)
        keep = [i for i, f in enumerate(forces) if f is not None]
        if len(keep) < 2:
            continue
        X = est.model_.validate([atoms[i] for i in keep])
        e_hat, f_hat = predict_energies_forces(est.model_, X, batch_size=est.batch_size)
        pred = est.predict(X, forces=f_hat, energies=e_hat)
        true = np.array([np.abs(f - forces[i])[free_atoms(a)].mean() for i, a, f in
                         zip(keep, X, f_hat, strict=True)])
        out[name] = {"predicted": float(pred.mean()), "true": float(true.mean()),
                     "spearman": float(spearmanr(pred, true).statistic)}
    return out


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

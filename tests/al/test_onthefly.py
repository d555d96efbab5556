"""OnTheFlyLearner: a tiny built-in model learning EMT on a Cu slab, end to end, resumed after a
SIGKILL, against a plain reference of its trigger, and its refusals."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import fcc111
from ase.calculators.emt import EMT

from skntk import CalculatorOracle, MLIPRegressor, OnTheFlyLearner
from skntk.al.onthefly import trigger
from tests.builders import tiny_builtin

ROOT = Path(__file__).resolve().parents[2]


def start():
    return fcc111("Cu", (2, 2, 1), vacuum=4.0)


def learner(model, oracle=None, **kw):
    params = dict(threshold=0.05, every=4, budget=6, refit_every=2, temperature_K=600,
                  timestep_fs=2.0, random_state=0, progress_bar=False,
                  regressor=MLIPRegressor(model, epochs=3, parameters="all", progress_bar=False))
    params.update(kw)
    return OnTheFlyLearner(model, oracle or CalculatorOracle(EMT()), **params)


class CountingOracle(CalculatorOracle):
    """EMT labels; remembers the MD step of every frame it labels."""

    def __init__(self, calculator, n_jobs=1):
        super().__init__(calculator, n_jobs)
        self.steps = []

    def label(self, structures):
        self.steps += [a.info.get("md_step") for a in structures]
        return super().label(structures)


class FailingOracle(CalculatorOracle):
    def label(self, structures):
        from skntk.al.oracles import LabelResult

        return [LabelResult(None, "SCF did not converge", 0.0) for _ in structures]


def reference_labels(checks, budget):
    """The trigger written plainly: a check labels during the cold start or above the
    threshold, while oracle calls remain."""
    calls, out = 0, []
    for c in checks:
        want = (c["cold"] or c["predicted"] > c["threshold"]) and calls < budget
        calls += want
        out.append(want)
    return out


@pytest.fixture
def model():
    return tiny_builtin((29,))


def test_end_to_end_labels_refits_and_stops_at_the_budget(model, one_torch_thread):
    oracle = CountingOracle(EMT())
    tests = {"md": [start()]}
    a = tests["md"][0]
    a.rattle(0.05, seed=1)
    a.calc = EMT()
    a.get_forces()
    res = learner(model, oracle, test_sets=tests).run(start(), 400)
    assert res.stop_reason == "budget"
    assert len(res.labelled) == 6 == len(oracle.steps)  # the budget, each frame labelled once
    assert [c["step"] for c in res.checks if c["labelled"]] == oracle.steps
    assert len(set(oracle.steps)) == len(oracle.steps)
    assert [c["labelled"] for c in res.checks] == reference_labels(res.checks, 6)
    # cold start: the first n_initial + min_calibration labels are unconditional
    assert all(c["cold"] for c in res.checks[:6]) and res.checks[0]["step"] == 0
    for lab in res.labelled:  # EMT's own energy and forces at the model's MD frame
        ref = lab.copy()
        ref.calc = EMT()
        assert lab.get_potential_energy() == pytest.approx(ref.get_potential_energy())
        np.testing.assert_allclose(lab.get_forces(), ref.get_forces(), atol=1e-10)
    assert [h["n_labels"] for h in res.history] == [2, 4, 6]
    assert all(set(h["true"]) == {"md"} for h in res.history)
    assert res.model is not model and res.uncertainty.n_calibration_ == 4
    assert [h["map"] is None for h in res.history] == [True, True, False]
    np.testing.assert_array_equal(res.history[-1]["map"]["coef"], res.uncertainty.coef_)


def test_calibrated_checks_follow_the_threshold(model, one_torch_thread):
    """A larger budget and a threshold inside the range of the predicted errors: some calibrated
    checks label and some do not, exactly as the plain trigger says."""
    res = learner(model, budget=12, threshold=0.3, every=2).run(start(), 300)
    warm = [c for c in res.checks if not c["cold"]]
    assert warm, "the run never left the cold start"
    assert [c["labelled"] for c in res.checks] == reference_labels(res.checks, 12)
    assert trigger(0.31, 0.3, cold=False) and not trigger(0.3, 0.3, cold=False)


def test_target_fraction_threshold_leaves_the_cold_start(model, one_torch_thread):
    """``target_fraction``: once 5 checks have a calibrated prediction, the threshold is the
    ``1 - f`` quantile of the last ``window`` of them (written plainly here), and checks below
    it are not labelled — the run no longer labels every check."""
    res = learner(model, threshold=None, target_fraction=0.25, window=8, budget=14,
                  every=2).run(start(), 200)
    preds = []
    for c in res.checks:
        ref = np.quantile(preds[-8:], 0.75) if len(preds[-8:]) >= 5 else np.nan
        np.testing.assert_equal(c["threshold"], ref)
        if np.isfinite(c["predicted"]):
            preds.append(c["predicted"])
    warm = [c for c in res.checks if not c["cold"]]
    assert warm, "the run never left the cold start"
    assert any(not c["labelled"] for c in warm) and any(c["labelled"] for c in warm)
    assert [c["labelled"] for c in res.checks] == reference_labels(res.checks, 14)
    # the 5 calibrated checks that define the quantile record their predictions, no label
    defining = [c for c in warm if not np.isfinite(c["threshold"])]
    assert len(defining) == 5 and not any(c["labelled"] for c in defining)


def test_the_last_labels_are_fitted_when_the_run_stops(model, one_torch_thread):
    """A budget that is not a multiple of refit_every: the run ends with one more refit, so the
    result's model has trained on every label."""
    res = learner(model, budget=5, refit_every=2).run(start(), 400)
    assert res.stop_reason == "budget" and len(res.labelled) == 5
    assert [h["n_labels"] for h in res.history] == [2, 4, 5]
    res = learner(model, budget=6, refit_every=4).run(start(), 12)  # stops at n_steps: 4 checks
    assert res.stop_reason == "n_steps" and len(res.labelled) == 4
    assert [h["n_labels"] for h in res.history] == [2, 4]


def test_true_error_of_labelled_checks(model, one_torch_thread, tmp_path):
    """A labelled check after the first fine-tuning records ``true``: the force MAE of the model
    that ran the MD there (reloaded here from the checkpoint of its generation) against the
    frame's label, written plainly; cold-start labels of the pretrained model have none."""
    import torch

    res = learner(model, budget=6, checkpoint_dir=tmp_path).run(start(), 400)
    labelled = [c for c in res.checks if c["labelled"]]
    assert [("true" in c) for c in labelled] == [c["generation"] >= 1 for c in labelled]
    by_step = {a.info["md_step"]: a for a in res.labelled}
    for c in labelled[2:]:
        gen = model.copy()
        gen.module.load_state_dict(torch.load(tmp_path / f"model-{c['generation']}.pt",
                                              weights_only=True))
        frame = by_step[c["step"]]
        x = frame.copy()
        x.calc = gen.calculator()
        err = np.abs(x.get_forces() - frame.get_forces()).mean()
        assert c["true"] == pytest.approx(err, rel=1e-6)


def test_same_seed_same_run(model, one_torch_thread):
    a = learner(model, budget=4).run(start(), 100)
    b = learner(model, budget=4).run(start(), 100)
    assert json.dumps(a.checks) == json.dumps(b.checks)  # NaN (cold start) compares as text
    for x, y in zip(a.labelled, b.labelled, strict=True):
        np.testing.assert_array_equal(x.positions, y.positions)


SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from ase.build import fcc111
    from ase.calculators.emt import EMT
    from skntk import CalculatorOracle, MLIPRegressor, OnTheFlyLearner
    from skntk.models.builtin import BuiltinMLIP

    ckpt, log, kill = sys.argv[1], sys.argv[2], sys.argv[3]

    def event(what):
        with open(log, "a") as fh:
            fh.write(what + "\\n")
        n = sum(1 for line in open(log) if line.split()[0] == what.split()[0])
        if kill == f"{what.split()[0]}:{n}":
            os.kill(os.getpid(), signal.SIGKILL)

    class LoggingOracle(CalculatorOracle):
        def label(self, structures):
            event(f"start {structures[0].info['md_step']}")
            out = super().label(structures)
            with open(log, "a") as fh:
                fh.write(f"done {structures[0].info['md_step']}\\n")
            return out

    class KillableRegressor(MLIPRegressor):
        def fit(self, X, y=None):
            event(f"fit {len(X)}")
            return super().fit(X, y)

    model = BuiltinMLIP([29], n_hidden=8, n_blocks=1, random_state=0)
    learner = OnTheFlyLearner(
        model, LoggingOracle(EMT()), threshold=0.05, every=4, budget=6, refit_every=2,
        temperature_K=600, timestep_fs=2.0, random_state=0, progress_bar=False,
        checkpoint_dir=ckpt,
        regressor=KillableRegressor(model, epochs=3, parameters="all", progress_bar=False))
    a = fcc111("Cu", (2, 2, 1), vacuum=4.0)
    res = learner.run(a, 400)
    print("RESULT", [c["step"] for c in res.checks if c["labelled"]], res.stop_reason)
""")


def _run(tmp_path, ckpt, log, kill):
    script = tmp_path / "otf.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(script), str(ckpt), str(log), kill],
                          capture_output=True, text=True, env=env, timeout=600)


def test_resumes_after_sigkill_without_labelling_twice(tmp_path):
    whole = _run(tmp_path, tmp_path / "a", tmp_path / "a.log", "never")
    assert whole.returncode == 0, whole.stderr[-2000:]
    # killed while fine-tuning on 4 labels (the 4th on disk, the run's state not yet saved),
    # then while calling the oracle for the 6th label; resumed after each
    for kill in ("fit:2", "start:6", "never"):
        run = _run(tmp_path, tmp_path / "b", tmp_path / "b.log", kill)
        assert run.returncode == (0 if kill == "never" else -9), run.stderr[-2000:]
    # the same run as the uninterrupted one ...
    assert run.stdout.splitlines()[-1] == whole.stdout.splitlines()[-1]

    def fits(path):  # the history less its wall times
        return [{k: v for k, v in h.items() if k != "seconds"}
                for h in json.loads(path.read_text())]

    assert fits(tmp_path / "b" / "history.json") == fits(tmp_path / "a" / "history.json")
    # the appended trajectory and log hold each check once, as in the uninterrupted run
    assert (tmp_path / "b" / "log.jsonl").read_text() == (tmp_path / "a" / "log.jsonl").read_text()
    n_checks = len((tmp_path / "a" / "log.jsonl").read_text().splitlines())
    ta, tb = (ase.io.read(tmp_path / d / "trajectory.extxyz", ":") for d in "ab")
    assert len(ta) == len(tb) == n_checks
    for x, y in zip(ta, tb, strict=True):
        np.testing.assert_array_equal(x.positions, y.positions)
    # ... and no label was computed twice: the 4th, on disk before the kill, was reused
    log = (tmp_path / "b.log").read_text().splitlines()
    done = [line.split()[1] for line in log if line.startswith("done")]
    assert len(done) == len(set(done)) == 6
    assert sum(line.startswith("fit 4") for line in log) == 2  # the killed fit ran again


@pytest.mark.parametrize("kw, match", [
    ({"threshold": 0}, "threshold must be a force error > 0"),
    ({"threshold": -0.1}, "threshold must be a force error > 0"),
    ({"budget": 0}, "budget must be an integer >= 1"),
    ({"every": 0}, "every must be an integer >= 1"),
    ({"threshold": None}, "give threshold"),
    ({"target_fraction": 1.5}, "target_fraction must be in"),
    ({"reduction": "mean"}, "reduction must be"),
])
def test_bad_parameters_one_line(model, kw, match):
    with pytest.raises(ValueError, match=match) as err:
        learner(model, **kw).run(start(), 10)
    assert "\n" not in str(err.value)


def test_start_the_model_cannot_evaluate(model):
    gold = fcc111("Au", (2, 2, 1), vacuum=4.0)
    with pytest.raises(ValueError, match="starting structure cannot be evaluated.*Au"):
        learner(model).run(gold, 10)


def test_an_oracle_that_always_fails_stops_the_run(model, one_torch_thread):
    res = learner(model, FailingOracle(EMT()), budget=20, max_failures=3).run(start(), 400)
    assert res.stop_reason.startswith("3 labels failed in a row")
    assert "SCF did not converge" in res.stop_reason
    assert res.labelled == [] and len(res.failed) == 3 and res.history == []
    assert [f["step"] for f in res.failed] == [0, 4, 8]  # each frame tried once


def test_calibrate_pairs_equals_fit_on_the_same_structures(model, one_torch_thread):
    """The driver's calibration from recorded pairs is fit's calibration, given the same pairs."""
    from skntk import ForceUncertainty
    from skntk.io import free_atoms, get_labels

    def frames(n, seed):
        out = []
        for k in range(n):
            a = start()
            a.rattle(0.05, seed=seed + k)
            a.calc = EMT()
            a.get_forces()
            out.append(a)
        return out

    train, cal = frames(4, 0), frames(10, 100)
    ref = ForceUncertainty(model=model).fit(train, cal)
    est = ForceUncertainty(model=model).fit_posterior(train)
    with pytest.raises(Exception, match="not fitted|coef_"):
        est.predict(cal)  # no map yet
    inputs = est.map_inputs(cal)
    _, forces = get_labels(cal)
    errors = [np.abs(f_hat - f)[free_atoms(a)].mean()
              for a, f, f_hat in zip(cal, forces, inputs["forces"], strict=True)]
    est.calibrate_pairs(inputs["log_pv"], inputs["log_f"], errors)
    np.testing.assert_allclose(est.coef_, ref.coef_, rtol=1e-10)
    np.testing.assert_allclose(est.calibration_scores_, ref.calibration_scores_, rtol=1e-10)
    np.testing.assert_allclose(est.predict(train), ref.predict(train), rtol=1e-10)
    with pytest.raises(ValueError, match="min_calibration=10"):
        est.calibrate_pairs(inputs["log_pv"][:3], inputs["log_f"][:3], errors[:3])


def test_quantile_threshold_keeps_the_fraction_when_predictions_tie():
    """A flat map predicts one value for every check: the quantile equals it, no check exceeds
    it, and the tie share (written plainly here) labels the target fraction of them."""
    from skntk.al.onthefly import quantile_threshold

    rng = np.random.default_rng(0)
    for f in (0.1, 0.25, 0.5):
        for recent in (np.full(20, 0.3), rng.uniform(0.1, 0.5, 20), np.r_[np.full(10, 0.2),
                                                                          np.full(10, 0.4)]):
            thr, share = quantile_threshold(recent, f)
            assert thr == pytest.approx(np.quantile(recent, 1 - f))
            tied = np.isclose(recent, thr, rtol=1e-12, atol=0)
            above = np.mean((recent > thr) & ~tied)
            want = min(max((f - above) / tied.mean(), 0), 1) if tied.any() else 0.0
            assert share == pytest.approx(want)
            if tied.any():  # strictly above, plus the tied share of the ties: the fraction
                assert above + share * tied.mean() == pytest.approx(f)
    assert quantile_threshold(np.full(20, 0.3), 0.25) == (0.3, 0.25)
    assert np.isnan(quantile_threshold([0.3] * 4, 0.25)[0])


def test_flat_map_still_labels_the_target_fraction(model, one_torch_thread, monkeypatch):
    """With every prediction equal (a flat map), the run goes on labelling about
    ``target_fraction`` of its checks instead of stopping for good."""
    from skntk.al import onthefly

    monkeypatch.setattr(onthefly._Run, "_predict", lambda self, inputs: 0.3)
    res = learner(model, threshold=None, target_fraction=0.25, window=8, budget=30,
                  every=2).run(start(), 200)
    warm = [c for c in res.checks if not c["cold"] and np.isfinite(c["threshold"])]
    assert len(warm) >= 20
    frac = np.mean([c["labelled"] for c in warm])
    assert 0.2 <= frac <= 0.3, frac

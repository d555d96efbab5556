"""Tests of skntk.al.loop.ActiveLearningLoop on tiny EMT problems (built-in model, Cu slabs)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.calculator import all_changes
from ase.calculators.emt import EMT

from skntk.al import ActiveLearningLoop, CalculatorOracle, CommitteeSelector
from skntk.al.config import METHODS, build_selector
from skntk.finetune import MLIPRegressor
from skntk.metrics import evaluate
from skntk.pipeline import make_pv_lcmd_pipeline
from skntk.selection.baselines import RandomSelector
from skntk.transformers import ForceNTKTransformer

STAGES = ("featurize", "select", "label", "finetune", "evaluate")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class CountingOracle:
    """A CalculatorOracle that records the ``pool_id`` of every structure it is asked to label."""

    def __init__(self, calculator):
        self.inner = CalculatorOracle(calculator)
        self.calls = []

    def label(self, structures):
        self.calls.extend(int(a.info["pool_id"]) for a in structures)
        return self.inner.label(structures)


class FailingEMT(EMT):
    """EMT that fails (like an unconverged SCF) on structures marked ``info["bad"]``."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        if atoms is not None and atoms.info.get("bad"):
            raise RuntimeError("SCF did not converge (marked bad)")
        super().calculate(atoms, properties, system_changes)


def regressor(model, epochs=1):
    return MLIPRegressor(model, parameters="all", epochs=epochs, learning_rate=1e-2)


def emt_energy(a):
    b = a.copy()
    b.calc = EMT()
    return b.get_potential_energy(), b.get_forces()


# -- budgets, picks, labels -----------------------------------------------------------------------
def test_rounds_respect_budgets_and_label_each_pick_once(cu_slabs, tiny_model):
    labelled, pool, test = cu_slabs(3, 0), cu_slabs(12, 1, label=False), cu_slabs(3, 2)
    oracle = CountingOracle(EMT())
    loop = ActiveLearningLoop(RandomSelector(), regressor(tiny_model), oracle, n_rounds=3,
                              batch_size=3, test_sets=test, random_state=0, progress_bar=False)
    res = loop.run(labelled, pool)
    assert [h["round"] for h in res.history] == [0, 1, 2, 3]
    assert [h["n_labelled"] for h in res.history] == [3 + 3 * k for k in range(4)]
    assert res.history[0]["selected"] == [] and res.failed == {}
    assert [i for h in res.history for i in h["selected"]] == res.selected
    assert len(res.selected) == len(set(res.selected)) == 9
    assert all(0 <= i < len(pool) for i in res.selected)
    # every pick labelled exactly once, in labelling order
    assert oracle.calls == res.selected
    assert len(res.labelled) == 3 + 9
    for a, i in zip(res.labelled[3:], res.selected, strict=True):
        np.testing.assert_allclose(a.positions, pool[i].positions, atol=1e-12)
        e, f = emt_energy(pool[i])
        assert a.get_potential_energy() == pytest.approx(e, rel=1e-12)
        np.testing.assert_allclose(a.get_forces(), f, atol=1e-12)
    assert all(a.calc is None for a in pool)  # the pool is never labelled in place
    assert set(res.history[-1]["metrics"]) == {"test"}


def test_budget_larger_than_pool(cu_slabs, tiny_model):
    oracle = CountingOracle(EMT())
    loop = ActiveLearningLoop(RandomSelector(), regressor(tiny_model), oracle, n_rounds=3,
                              batch_size=3, random_state=1, progress_bar=False)
    res = loop.run(cu_slabs(2, 0), cu_slabs(5, 1, label=False))
    assert [h["n_labelled"] for h in res.history] == [2, 5, 7, 7]
    assert [len(h["selected"]) for h in res.history] == [0, 3, 2, 0]
    assert sorted(res.selected) == list(range(5)) and sorted(oracle.calls) == list(range(5))
    assert all(h["metrics"] == {} for h in res.history)


def test_failed_labels_recorded_and_never_repicked(cu_slabs, tiny_model):
    pool = cu_slabs(12, 3, label=False)
    bad = {1, 4, 7, 10}
    for i in bad:
        pool[i].info["bad"] = True
    oracle = CountingOracle(FailingEMT())
    loop = ActiveLearningLoop(RandomSelector(), regressor(tiny_model), oracle, n_rounds=4,
                              batch_size=4, random_state=0, progress_bar=False)
    res = loop.run(cu_slabs(3, 0), pool)
    assert set(res.failed) == bad
    assert set(res.selected) == set(range(12)) - bad and not set(res.selected) & bad
    for reason in res.failed.values():
        assert "RuntimeError" in reason and "marked bad" in reason, reason
    # each structure was sent to the oracle exactly once, failed ones included
    assert sorted(oracle.calls) == list(range(12))
    n = 3
    for h in res.history[1:4]:
        assert len(h["selected"]) + len(h["failed"]) == 4
        assert {int(k) for k in h["failed"]} <= bad and not set(h["selected"]) & bad
        n += len(h["selected"])
        assert h["n_labelled"] == n
    last = res.history[4]  # pool exhausted: nothing picked, the loop still finishes the round
    assert last["selected"] == [] and last["failed"] == {} and last["n_labelled"] == 3 + 8
    assert {int(k) for h in res.history for k in h["failed"]} == bad


# -- metrics, timings ----------------------------------------------------------------------------
def test_history_metrics_equal_evaluate_and_timings(cu_slabs, tiny_model):
    tests = {"near": cu_slabs(3, 5), "far": cu_slabs(2, 6)}
    for name, frames in tests.items():
        for k, a in enumerate(frames):
            a.info["grp"] = f"{name}{k % 2}"
    loop = ActiveLearningLoop(RandomSelector(), regressor(tiny_model, epochs=2),
                              CountingOracle(EMT()), n_rounds=2, batch_size=2, test_sets=tests,
                              groups="grp", random_state=0, progress_bar=False)
    res = loop.run(cu_slabs(3, 0), cu_slabs(8, 1, label=False))
    last = res.history[-1]["metrics"]
    assert set(last) == {"near", "far"}
    for name, frames in tests.items():
        ref = evaluate(res.model, frames, groups="grp")
        assert set(ref) == set(last[name])
        for k, v in ref.items():
            if k == "groups":
                assert set(v) == set(last[name]["groups"]) == {f"{name}0", f"{name}1"}
                for g, m in v.items():
                    assert m == pytest.approx(last[name]["groups"][g], rel=1e-10)
            else:
                assert last[name][k] == pytest.approx(v, rel=1e-10), k
    assert res.model is not tiny_model
    for h in res.history:
        t = h["timings"]
        assert set(STAGES) <= set(t) and all(v >= 0 for v in t.values())
        assert t["finetune"] > 0 and t["evaluate"] > 0
        if h["round"] == 0:
            assert t["label"] == 0 and t["select"] == 0
        else:
            assert t["label"] > 0 and t["select"] > 0
    df = res.to_frame()
    assert len(df) == 3 * 2 and {"time_finetune", "force_mae", "test_set"} <= set(df.columns)
    # each round records its fine-tuning; round 0 is the same fit as a regressor of the round's seed
    for h in res.history:
        ft = h["finetune"]
        assert ft["max_epochs"] == 2 and 0 <= ft["best_epoch"] <= ft["epochs_run"] <= 2
    seed0 = int(np.random.SeedSequence(0).generate_state(3)[0])
    ref = regressor(tiny_model, epochs=2).set_params(random_state=seed0).fit(cu_slabs(3, 0))
    assert res.history[0]["finetune"] == {"best_epoch": ref.best_epoch_,
                                          "epochs_run": ref.history_[-1]["epoch"],
                                          "max_epochs": 2}


def test_growing_n_rounds_repeats_the_shorter_run(cu_slabs, tiny_model, tmp_path):
    """Docs: ``n_rounds`` may grow and the run continues. The picks of a 2-round run are the first
    picks of a 3-round run with the same seed, and growing a finished 2-round checkpoint to 3
    rounds labels only the new round and ends where a fresh 3-round run ends."""
    lab, pool = cu_slabs(2, 0), cu_slabs(12, 1, label=False)

    def loop(n, ckpt=None, oracle=None):
        return ActiveLearningLoop(RandomSelector(), regressor(tiny_model), oracle or
                                  CountingOracle(EMT()), n_rounds=n, batch_size=2,
                                  checkpoint_dir=ckpt, random_state=3, progress_bar=False)

    short = loop(2, tmp_path / "grow").run(lab, pool)
    fresh = loop(3).run(lab, pool)
    assert fresh.selected[:4] == short.selected
    oracle = CountingOracle(EMT())
    grown = loop(3, tmp_path / "grow", oracle).run(lab, pool)
    assert grown.selected == fresh.selected
    assert oracle.calls == fresh.selected[4:]
    assert [h["n_labelled"] for h in grown.history] == [2, 4, 6, 8]


def test_invalid_arguments(cu_slabs, tiny_model):
    lab, pool = cu_slabs(2, 0), cu_slabs(3, 1, label=False)

    def loop(**kw):
        return ActiveLearningLoop(RandomSelector(), regressor(tiny_model), CountingOracle(EMT()),
                                  progress_bar=False, **kw)

    with pytest.raises(ValueError, match="refeaturize"):
        loop(refeaturize="latest").run(lab, pool)
    with pytest.raises(ValueError, match="batch_size"):
        loop(batch_size=0).run(lab, pool)
    with pytest.raises(ValueError, match="n_rounds"):
        loop(n_rounds=-1).run(lab, pool)
    with pytest.raises(ValueError, match="labelled is empty"):
        loop().run([], pool)
    with pytest.raises(ValueError, match="pool is empty"):
        loop().run(lab, [])


# -- refeaturize ----------------------------------------------------------------------------------
TRANSFORM_LOG = []
FIT_LOG = []


class LoggingNTK(ForceNTKTransformer):
    def transform(self, X):
        TRANSFORM_LOG.append((self.model, len(X)))
        return super().transform(X)


class LoggingRegressor(MLIPRegressor):
    def fit(self, X, y=None):
        super().fit(X, y)
        FIT_LOG.append(self.model_)
        return self


@pytest.mark.parametrize("mode", ["pretrained", "current"])
def test_refeaturize(cu_slabs, tiny_model, mode):
    TRANSFORM_LOG.clear()
    FIT_LOG.clear()
    sel = make_pv_lcmd_pipeline(LoggingNTK(tiny_model, kind="energy", n_features=32),
                                random_state=0)
    reg = LoggingRegressor(tiny_model, parameters="all", epochs=1, learning_rate=1e-2)
    L, P, B = 3, 10, 2
    loop = ActiveLearningLoop(sel, reg, CountingOracle(EMT()), n_rounds=3, batch_size=B,
                              refeaturize=mode, random_state=0, progress_bar=False)
    res = loop.run(cu_slabs(L, 0), cu_slabs(P, 1, label=False))
    assert len(FIT_LOG) == 4 and len(set(map(id, FIT_LOG))) == 4
    assert res.model is FIT_LOG[-1]
    assert len(res.selected) == len(set(res.selected)) == 3 * B
    feat_t = [h["timings"]["featurize"] for h in res.history]
    if mode == "pretrained":
        # the pool (with the initial labelled set) is featurised once, by the pretrained model
        assert len(TRANSFORM_LOG) == 1
        model, n = TRANSFORM_LOG[0]
        assert model is tiny_model and n == L + P
        assert feat_t[1] > 0 and feat_t[0] == feat_t[2] == feat_t[3] == 0
    else:
        # every round featurises its training set and remaining candidates with the model
        # fine-tuned in the round before
        assert len(TRANSFORM_LOG) == 3
        for k, (model, n) in enumerate(TRANSFORM_LOG):
            assert model is FIT_LOG[k] and model is not tiny_model
            assert n == (L + k * B) + (P - k * B)
        assert feat_t[0] == 0 and all(t > 0 for t in feat_t[1:])


def test_shared_feature_cache_featurises_once(cu_slabs, tiny_model, tmp_path):
    """Two runs (own checkpoints) sharing ``feature_cache`` compute the pool's features once; the
    second run's picks equal the first's, and a run without the cache gives the same picks."""
    lab, pool = cu_slabs(3, 0), cu_slabs(8, 1, label=False)

    def run(ckpt, cache):
        sel = make_pv_lcmd_pipeline(LoggingNTK(tiny_model, kind="energy", n_features=16),
                                    random_state=0, shortlist_size=6)
        loop = ActiveLearningLoop(sel, regressor(tiny_model), CountingOracle(EMT()), n_rounds=1,
                                  batch_size=2, checkpoint_dir=ckpt, feature_cache=cache,
                                  random_state=0, progress_bar=False)
        return loop.run(lab, pool)

    TRANSFORM_LOG.clear()
    first = run(tmp_path / "a", tmp_path / "shared")
    assert sum(n for _, n in TRANSFORM_LOG) == len(lab) + len(pool)
    TRANSFORM_LOG.clear()
    second = run(tmp_path / "b", tmp_path / "shared")
    assert sum(n for _, n in TRANSFORM_LOG) == 0
    assert second.selected == first.selected
    assert not (tmp_path / "b" / "features").exists()
    assert run(None, None).selected == first.selected


def test_committee_selector_timings(cu_slabs, tiny_model):
    sel = CommitteeSelector(regressor(tiny_model), n_members=2, random_state=0)
    loop = ActiveLearningLoop(sel, regressor(tiny_model), CountingOracle(EMT()), n_rounds=1,
                              batch_size=2, test_sets=cu_slabs(2, 4), random_state=0,
                              progress_bar=False)
    res = loop.run(cu_slabs(3, 0), cu_slabs(6, 1, label=False))
    assert "committee_finetune" not in res.history[0]["timings"]
    t = res.history[1]["timings"]
    assert set(STAGES) | {"committee_finetune"} == set(t)
    assert t["committee_finetune"] > 0
    assert len(res.history[1]["selected"]) == 2
    assert "time_committee_finetune" in res.to_frame().columns


# -- checkpoints: resume after SIGKILL ------------------------------------------------------------
SCRIPT = textwrap.dedent('''
    import json
    import os
    import sys
    import time
    from pathlib import Path

    import numpy as np
    from ase.build import fcc111
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    from skntk.al import ActiveLearningLoop, CalculatorOracle
    from skntk.finetune import MLIPRegressor
    from skntk.models.builtin import BuiltinMLIP
    from skntk.pipeline import make_pv_lcmd_pipeline
    from skntk.transformers import ForceNTKTransformer


    def slabs(n, seed, label):
        out = []
        for k in range(n):
            a = fcc111("Cu", (2, 2, 2), vacuum=4.0)
            a.rattle(0.1, seed=seed * 1000 + k)
            a.info["pool_id"] = k
            if label:
                b = a.copy()
                b.calc = EMT()
                a.calc = SinglePointCalculator(a, energy=b.get_potential_energy(),
                                               forces=b.get_forces())
            out.append(a)
        return out


    class LoggingOracle:
        """EMT labels; appends each labelled pool_id to a log file; with HANG_AT_CALL=n the
        n-th call (of this process) writes HANG_MARKER and hangs instead of labelling."""

        def __init__(self, log=None):
            self._inner = CalculatorOracle(EMT())
            self._log = log
            self.calls = []

        def label(self, structures):
            self.calls.extend(int(a.info["pool_id"]) for a in structures)
            hang = int(os.environ.get("HANG_AT_CALL", "0"))
            if hang and len(self.calls) >= hang:
                Path(os.environ["HANG_MARKER"]).write_text("hanging")
                time.sleep(600)
            res = self._inner.label(structures)
            if self._log:
                with open(self._log, "a") as fh:
                    fh.write("".join(f"{a.info['pool_id']}\\n" for a in structures))
            return res

        def __repr__(self):
            return "LoggingOracle(EMT())"


    def build(ckpt, batch_size=3, log=None):
        model = BuiltinMLIP([29], n_hidden=16, n_blocks=1, random_state=0)
        reg = MLIPRegressor(model, parameters="all", epochs=2, learning_rate=1e-2)
        sel = make_pv_lcmd_pipeline(ForceNTKTransformer(model, kind="energy", n_features=32),
                                    random_state=0)
        oracle = LoggingOracle(log)
        loop = ActiveLearningLoop(sel, reg, oracle, n_rounds=3, batch_size=batch_size,
                                  test_sets={"test": slabs(3, 9, True)}, checkpoint_dir=ckpt,
                                  random_state=0, progress_bar=False)
        return loop, slabs(3, 0, True), slabs(12, 1, False), oracle


    if __name__ == "__main__":
        import torch

        torch.set_num_threads(1)
        ckpt, log, out = sys.argv[1:4]
        loop, labelled, pool, oracle = build(ckpt, log=log)
        res = loop.run(labelled, pool)
        Path(out).write_text(json.dumps({"selected": res.selected, "failed": res.failed,
                                         "history": res.history, "calls": oracle.calls}))
''')


def _run_script(script, tmp, name):
    out = tmp / f"{name}.json"
    cmd = [sys.executable, str(script), str(tmp / name), str(tmp / f"{name}.log"), str(out)]
    return cmd, out


def _same_history(a, b, tol=1e-8):
    assert [h["round"] for h in a] == [h["round"] for h in b]
    for ha, hb in zip(a, b, strict=True):
        assert ha["n_labelled"] == hb["n_labelled"]
        assert ha["selected"] == hb["selected"] and ha["failed"] == hb["failed"]
        assert set(ha["metrics"]) == set(hb["metrics"])
        for name in ha["metrics"]:
            for k, v in ha["metrics"][name].items():
                assert hb["metrics"][name][k] == pytest.approx(v, rel=tol, abs=tol), (name, k)


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    script = tmp_path / "al_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    # uninterrupted, in its own directory
    cmd, out_a = _run_script(script, tmp_path, "full")
    r = subprocess.run(cmd, env=env, timeout=300, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    full = json.loads(out_a.read_text())
    assert len(full["history"]) == 4 and len(full["selected"]) == 9
    assert sorted(full["calls"]) == sorted(full["selected"])

    # killed with SIGKILL inside round 2, after its first label is on disk
    ckpt = tmp_path / "killed"
    marker = tmp_path / "hanging"
    cmd, out_b = _run_script(script, tmp_path, "killed")
    err = tmp_path / "killed.stderr"
    with open(err, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh, env={
            **env, "HANG_AT_CALL": "5", "HANG_MARKER": str(marker)})
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, err.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached round 2"
            time.sleep(0.1)
        state = json.loads((ckpt / "state.json").read_text())
        assert [h["round"] for h in state["history"]] == [0, 1]
        assert (ckpt / "round-2-picks.json").exists()
        assert not (ckpt / "round-3-picks.json").exists()
        assert len(list((ckpt / "labels").glob("*.extxyz"))) == 4
    finally:
        proc.kill()  # SIGKILL
        proc.wait(timeout=60)
    assert proc.returncode == -9
    assert not out_b.exists()
    before = (tmp_path / "killed.log").read_text().split()
    assert len(before) == 4

    # resumed to completion: only the 5 missing labels are computed
    r = subprocess.run(cmd, env=env, timeout=300, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    resumed = json.loads(out_b.read_text())
    labelled_ids = (tmp_path / "killed.log").read_text().split()
    assert len(resumed["calls"]) == 5
    assert len(labelled_ids) == len(set(labelled_ids)) == 9  # nothing labelled twice
    assert sorted(map(int, labelled_ids)) == sorted(full["selected"])
    assert resumed["selected"] == full["selected"]
    _same_history(full["history"], resumed["history"])

    # in this process: a finished run returns at once, without labelling anything
    spec = importlib.util.spec_from_file_location("al_script_for_test", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    loop, labelled, pool, oracle = mod.build(str(ckpt))
    t0 = time.perf_counter()
    res = loop.run(labelled, pool)
    assert time.perf_counter() - t0 < 30
    assert oracle.calls == []
    assert res.selected == full["selected"]
    _same_history(full["history"], res.history)
    assert len(res.labelled) == 3 + 9
    m = evaluate(res.model, loop.test_sets["test"])  # the saved model of the last round
    assert m["force_mae"] == pytest.approx(full["history"][-1]["metrics"]["test"]["force_mae"],
                                           rel=1e-6)

    # other arguments in the same directory are refused, naming what differs
    loop, labelled, pool, oracle = mod.build(str(ckpt), batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        loop.run(labelled, pool)
    assert oracle.calls == []
    assert json.loads((ckpt / "config.json").read_text())["batch_size"] == 3
    assert Path(ckpt / "state.json").exists()


# -- the named methods ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(set(METHODS) - {"committee"}))
def test_every_named_method_builds_and_picks_distinct_structures(cu_slabs, tiny_model, method):
    train, pool = cu_slabs(4, 1), cu_slabs(12, 2, label=False)
    sel = build_selector(method, tiny_model, n_to_select=3, shortlist_size=6, n_features=32,
                         force_rows="probes", n_probes=2)
    idx = sel.fit(train).select(pool)
    assert len(set(idx.tolist())) == 3 and all(0 <= i < 12 for i in idx)
    steps = dict(getattr(sel, "steps", []))
    if method == "density_pv_lcmd":
        assert steps["pv"].criterion == "density_weighted"
        assert set(idx.tolist()) <= set(steps["pv"].shortlist_idx_.tolist())
    if method == "lcmd_posterior":
        assert steps["lcmd"].features == "posterior"


def test_history_records_the_error_bars_of_each_round(cu_slabs, tiny_model, one_torch_thread):
    from skntk import ForceUncertainty

    tests = {"near": cu_slabs(4, 5)}
    reg = regressor(tiny_model, epochs=1).set_params(validation_fraction=0.5)
    loop = ActiveLearningLoop(RandomSelector(), reg, CountingOracle(EMT()), n_rounds=1,
                              batch_size=2, test_sets=tests, random_state=0, progress_bar=False,
                              uncertainty=ForceUncertainty(min_calibration=4))
    res = loop.run(cu_slabs(8, 0), cu_slabs(6, 1, label=False))
    for h in res.history:
        u = h["uncertainty"]["near"]
        assert u["predicted"] > 0 and -1 <= u["spearman"] <= 1
    # equal atom counts, all free: the mean per-structure MAE is evaluate's force MAE
    assert res.history[-1]["uncertainty"]["near"]["true"] == pytest.approx(
        evaluate(res.model, tests["near"])["force_mae"], rel=1e-10)
    # a validation split below min_calibration: recorded as skipped, the run goes on
    small = ActiveLearningLoop(RandomSelector(), regressor(tiny_model, epochs=1),
                               CountingOracle(EMT()), n_rounds=1, batch_size=2, test_sets=tests,
                               random_state=0, progress_bar=False,
                               uncertainty=ForceUncertainty(min_calibration=4))
    out = small.run(cu_slabs(4, 0), cu_slabs(6, 1, label=False))
    assert "min_calibration=4" in out.history[0]["uncertainty"]["skipped"]

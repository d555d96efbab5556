"""The evidence harness (benchmarks/al/harness.py) on a tiny config: resume and report."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from tests.builders import tiny_builtin

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "ethanol_40.extxyz"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("harness", ROOT / "benchmarks/al/harness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _config(tmp_path):
    model = tiny_builtin().save(tmp_path / "m.pt")
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(f"""
experiment = "tiny"
model = "{model}"
methods = ["random", "pv_lcmd", "maxdist_embedding"]
seeds = [0, 1]
[data]
split = "files"
source = "{DATA}"
n_labelled = 4
n_pool = 12
test = {{heldout = {{n = 8}}}}
[selector]
n_features = 16
shortlist_size = 6
[finetune]
parameters = "all"
epochs = 1
[loop]
n_rounds = 2
batch_size = 2
""")
    return cfg


def test_harness_resumes_and_reports(harness, tmp_path, capsys):
    cfg, out = _config(tmp_path), tmp_path / "out"
    assert harness.main(["run", str(cfg), "--out", str(out)]) == 0
    files = sorted(out.glob("*.json"))
    assert len(files) == 6  # 3 methods x 2 seeds
    rec = json.loads(files[0].read_text())
    for key in ("experiment", "split", "method", "seed", "config", "rounds"):
        assert key in rec
    assert [h["n_labelled"] for h in rec["rounds"]] == [4, 6, 8]
    for key in ("energy_mae", "energy_rmse", "force_mae", "force_rmse"):
        assert np.isfinite(rec["rounds"][-1]["metrics"]["heldout"][key])

    # an interrupted matrix: one result missing -> only that one runs again
    victim = out / "s1-pv_lcmd-1.json"
    before = {p.name: p.stat().st_mtime_ns for p in files}
    victim.unlink()
    capsys.readouterr()
    harness.main(["run", str(cfg), "--out", str(out)])
    log = capsys.readouterr().out
    assert log.count("ran ") == 1 and "ran s1-pv_lcmd-1.json" in log
    assert log.count("skip ") == 5
    for p in out.glob("*.json"):
        if p.name != victim.name:
            assert p.stat().st_mtime_ns == before[p.name]

    # the report's numbers are those of the JSONs
    records = [json.loads(p.read_text()) for p in out.glob("*.json")]
    summ = harness.summarise(records, "force_mae")
    for method in ("random", "pv_lcmd", "maxdist_embedding"):
        finals = [r["rounds"][-1]["metrics"]["heldout"]["force_mae"] for r in records
                  if r["method"] == method]
        n, mean, std, count = summ["heldout"][method]["rounds"][-1]
        assert count == 2 and n == 8
        assert mean == pytest.approx(np.mean(finals)) and std == pytest.approx(np.std(finals))
        if method != "random":
            rand = {r["seed"]: r["rounds"][-1]["metrics"]["heldout"]["force_mae"]
                    for r in records if r["method"] == "random"}
            mine = {r["seed"]: r["rounds"][-1]["metrics"]["heldout"]["force_mae"]
                    for r in records if r["method"] == method}
            ratio = np.median([mine[s] / rand[s] for s in rand])
            text = harness.report_markdown(out)
            row = next(line for line in text.splitlines()
                       if line.startswith(f"| {method} |") and "±" in line)
            assert f"{ratio:.3f}" in row
            assert f"{sum(mine[s] < rand[s] for s in rand)}/2" in row
    assert f"{np.mean(finals):.4f} ± {np.std(finals):.4f}" in harness.report_markdown(out)
    # related experiments (names differing after the last "_") get one table across them
    import shutil

    fam = tmp_path / "family"
    for suffix in ("90", "5"):
        shutil.copytree(out, fam / f"exp_{suffix}", ignore=shutil.ignore_patterns(".*"))
    groups = harness._families(sorted(fam.iterdir()))
    assert [d.name for d in groups["exp"]] == ["exp_5", "exp_90"]  # numeric order
    table = "\n".join(harness.across_markdown(groups["exp"]))
    n, mean, std, count = summ["heldout"]["pv_lcmd"]["rounds"][-1]
    row = next(line for line in table.splitlines() if line.startswith("| pv_lcmd |"))
    assert row.count(f"{mean:.4f} ± {std:.4f} (n=2;") == 2
    # compute per method: the loop's stage timings summed over rounds, averaged over seeds
    cost = harness.cost_summary(records)
    fine = [sum(h["timings"]["finetune"] for h in r["rounds"]) for r in records
            if r["method"] == "pv_lcmd"]
    assert cost["pv_lcmd"]["finetune"] == pytest.approx(np.mean(fine))
    assert cost["random"]["featurize"] == 0.0
    cost_table = harness.report_markdown(out).split("**Compute per run**")[1]
    row = next(line for line in cost_table.splitlines() if line.startswith("| pv_lcmd |"))
    assert f"{np.mean(fine):.0f}" in row

    # the summary across experiments and the pooled paired statistics, recomputed by hand
    text = "\n".join(harness.summary_markdown([out]))
    rand = {r["seed"]: r["rounds"][-1]["metrics"]["heldout"]["force_mae"]
            for r in records if r["method"] == "random"}
    mine = {r["seed"]: r["rounds"][-1]["metrics"]["heldout"]["force_mae"]
            for r in records if r["method"] == "pv_lcmd"}
    delta = [100 * (mine[s] / rand[s] - 1) for s in rand]
    wins = sum(d < 0 for d in delta)
    n, mean, std, _ = summ["heldout"]["pv_lcmd"]["rounds"][-1]
    row = next(line for line in text.splitlines()
               if line.startswith("| `pv_lcmd` | ") and "±" in line)
    assert f"{mean:.4f} ± {std:.4f} ({np.mean(delta):+.1f} %, {wins}/2)" in row
    half = 12.706205 * np.std(delta, ddof=1) / np.sqrt(2)  # t(0.975, 1 dof)
    pooled = next(line for line in text.splitlines()
                  if line.startswith("| `pv_lcmd` | 2 |"))
    assert f"{np.mean(delta):+.2f} [{np.mean(delta) - half:+.2f}, {np.mean(delta) + half:+.2f}]" \
        in pooled
    p_sign = {0: 0.5, 1: 1.0, 2: 0.5}[wins]  # two-sided binomial test, n = 2
    assert pooled.rstrip(" |").endswith(f"{p_sign:.2g}")
    # `docs` puts the tables where FINDINGS.md marks them
    page = tmp_path / "evidence.md"
    assert harness.main(["docs", "--results", str(fam), "--out", str(page)]) == 0
    body = page.read_text()
    assert harness.SUMMARY_MARK not in body and "All experiments pooled" in body
    assert body.index("All experiments pooled") < body.index("### exp: across experiments")


def test_feature_rank_reads_the_run_cache(harness, tmp_path):
    spec = importlib.util.spec_from_file_location("feature_rank",
                                                  ROOT / "benchmarks/al/feature_rank.py")
    fr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fr)
    # the spectrum summary against hand-made spectra
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 6)))
    flat = fr.spectrum_summary(q[:, :4] * 2.0)
    assert flat["effective_rank"] == pytest.approx(4.0) and flat["n_99pct_energy"] == 4
    assert flat["top_share"] == pytest.approx(0.25)
    one = fr.spectrum_summary(np.outer(np.arange(1.0, 5.0), [1.0, 2.0, 0.0]))
    assert one["effective_rank"] == pytest.approx(1.0) and one["top_share"] == pytest.approx(1.0)
    # rows of labelled ∪ pool as the loop's featuriser makes them, through the cache
    cfg = harness.load_config(_config(tmp_path))
    from skntk.models import load

    model = load(cfg["model"])
    out = tmp_path / "rank.json"
    assert fr.main([str(_config(tmp_path)), "--cache", str(tmp_path / "cache"), "--out",
                    str(out)]) == 0
    res = json.loads(out.read_text())["tiny"][0]
    assert res["n_structures"] == 4 + 12 and res["n_features"] == 16
    assert 1.0 <= res["energy"]["effective_rank"] <= min(16, res["n_structures"])
    assert any((tmp_path / "cache").iterdir())
    again = fr.rank_of(cfg, 0, tmp_path / "cache", model)
    assert again["joint"] == pytest.approx(res["joint"])


def test_subgroup_table_pairs_each_method_with_random_on_its_own_runs(harness):
    def rec(method, split, seed, value):
        metrics = {"heldout": {"force_mae": value, "groups": {"hot": {"force_mae": value}}}}
        return {"method": method, "split": split, "seed": seed, "rounds": [{"metrics": metrics}]}

    # random on three splits; "a" only on the first two: its Δ must use those two alone
    records = [rec("random", "s0", 0, 1.0), rec("random", "s1", 1, 2.0),
               rec("random", "s2", 2, 9.0), rec("a", "s0", 0, 0.9), rec("a", "s1", 1, 2.2)]
    table = "\n".join(harness.subgroup_markdown(records))
    row = next(line for line in table.splitlines() if line.startswith("| heldout / hot |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"{np.mean([0.9, 2.2]):.4f} ({np.mean([-10.0, 10.0]):+.1f} %, 1/2)"
    assert cells[2] == f"{np.mean([1.0, 2.0, 9.0]):.4f}"  # random: no pairs with itself


def _write_result(root, exp, model, method, seed, value):
    """One minimal result JSON (one round, test set ``t``) under ``root/exp``; its folder."""
    rounds = [{"round": 0, "n_labelled": 8, "metrics": {"t": {"force_mae": value}}}]
    rec = {"experiment": exp, "split": "s0", "method": method, "seed": seed, "seconds": 1.0,
           "rounds": rounds,
           "config": {"model": model, "data": {"split": "files", "test": {"t": {}}}}}
    d = root / exp
    d.mkdir(exist_ok=True)
    (d / f"s0-{method}-{seed}.json").write_text(json.dumps(rec))
    return d


def test_summary_never_pools_experiments_of_different_models(harness, tmp_path):
    def write(exp, model, method, seed, value):
        return _write_result(tmp_path, exp, model, method, seed, value)

    for seed in (0, 1):
        a = write("exp_a", "m1", "random", seed, 1.0)
        write("exp_a", "m1", "pv", seed, 0.5)  # -50 % under m1
        b = write("exp_b", "m2", "random", seed, 1.0)
        write("exp_b", "m2", "pv", seed, 1.5)  # +50 % under m2
    text = "\n".join(harness.summary_markdown([a, b]))
    assert text.count("#### Model `") == 2
    m1, m2 = text.split("#### Model `m2`")
    assert "| `pv` | 2 | 2 | 0.500 | -50.00" in m1 and "exp_b" not in m1
    assert "| `pv` | 2 | 0 | 1.500 | +50.00" in m2 and "exp_a" not in m2
    # one model: no model headings, as before
    assert "#### Model" not in "\n".join(harness.summary_markdown([a]))


def test_variants_of_an_experiment_are_summarised_on_their_own(harness, tmp_path):
    def write(exp, method, seed, value):
        return _write_result(tmp_path, exp, "m", method, seed, value)

    dirs = []
    for exp, value in (("eth", 0.5), ("eth_big", 1.5), ("eth_probes", 2.0)):
        for seed in (0, 1):
            write(exp, "random", seed, 1.0)
            d = write(exp, "pv", seed, value)
        dirs.append(d)
    assert harness.variant_of("eth_big", {"eth", "eth_big"}) == "eth"
    assert harness.variant_of("eth", {"eth", "eth_big"}) is None
    text = "\n".join(harness.summary_markdown(dirs))
    base, rest = text.split("#### Model `m`: variant `eth_big` of `eth`")
    big, probes = rest.split("#### Model `m`: variant `eth_probes` of `eth`")
    assert "| `pv` | 2 | 2 | 0.500 | -50.00" in base and "eth_big" not in base
    assert "| `pv` | 2 | 0 | 1.500 | +50.00" in big
    assert "| `pv` | 2 | 0 | 2.000 | +100.00" in probes


def test_labels_needed_by_hand(harness):
    n, curve = harness.monotone_curve([(10, 0.30), (30, 0.22), (20, 0.25), (40, 0.23)])
    assert n.tolist() == [10, 20, 30, 40] and curve.tolist() == [0.30, 0.25, 0.22, 0.22]
    assert harness.labels_needed(n, curve, 0.31) == 10  # the first budget already reaches it
    assert harness.labels_needed(n, curve, 0.25) == 20
    assert harness.labels_needed(n, curve, 0.235) == pytest.approx(25.0)  # halfway 20 -> 30
    assert harness.labels_needed(n, curve, 0.2) == float("inf")  # never: "> 40", no extrapolation


def test_random_extended_grows_random_and_gives_labels_to_target(harness, tmp_path):
    cfg = _config(tmp_path)
    text = cfg.read_text().replace('methods = ["random", "pv_lcmd", "maxdist_embedding"]',
                                   'methods = ["random", "random_extended", "maxdist_embedding"]')
    text = text.replace("n_rounds = 2", "n_rounds = 2\nextended_rounds = 4")
    text = text.replace("seeds = [0, 1]", "seeds = [0]")
    cfg.write_text(text)
    out = tmp_path / "out"
    assert harness.main(["run", str(cfg), "--out", str(out)]) == 0
    rec = {p.name.split("-")[1]: json.loads(p.read_text()) for p in out.glob("*.json")}
    ext, rand = rec["random_extended"], rec["random"]
    assert ext["grown_from"] == "random"
    assert [h["n_labelled"] for h in ext["rounds"]] == [4, 6, 8, 10, 12]
    assert ext["rounds"][:3] == rand["rounds"]  # random's rounds, repeated exactly
    assert all(h["finetune"]["max_epochs"] == 1 for h in ext["rounds"])
    records = list(rec.values())
    ltt = harness.labels_to_target(records, "heldout")
    curve = [h["metrics"]["heldout"]["force_mae"] for h in ext["rounds"]]
    best = np.minimum.accumulate(curve)
    for m in ("random", "maxdist_embedding"):
        final = rec[m]["rounds"][-1]["metrics"]["heldout"]["force_mae"]
        k = next((i for i, c in enumerate(best) if c <= final), None)
        if k is None:
            want = float("inf")
        elif k == 0:
            want = 4.0
        else:
            want = 4 + 2 * (k - 1) + 2 * (best[k - 1] - final) / (best[k - 1] - best[k])
        assert ltt[m]["needed"] == pytest.approx(want) and ltt[m]["n"] == 8
    assert random_extended_excluded(harness, records)
    report = harness.report_markdown(out)
    assert "**Labels to target**" in report and "Fine-tuning against its epoch cap" in report
    assert "force_q95" in report  # the tail metrics are reported where the JSONs have them


def random_extended_excluded(harness, records):
    """random_extended ends at more labels: never paired with random nor in the summary."""
    summ = harness.summarise(records, "force_mae")["heldout"]
    return "random_extended" not in harness.paired(summ)


def test_formula_filters_of_a_files_split(harness, tmp_path):
    from ase.build import molecule
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    frames = []
    for k in range(12):
        a = molecule("CH3CH2OH" if k % 3 else "CH3OH")
        a.rattle(0.01, seed=k)
        a.calc = SinglePointCalculator(a, energy=-float(k), forces=np.zeros((len(a), 3)))
        frames.append(a)
    src = tmp_path / "mixed.extxyz"
    write(src, frames)
    cfg = {"_dir": str(tmp_path), "data": {
        "split": "files", "source": str(src), "n_labelled": 3, "labelled_formula": "C2H6O",
        "formula_groups": True,
        "test": {"methanol": {"file": str(src), "n": 10, "formula": "CH4O"}}}}
    labelled, pool, tests, _ = harness.make_split(cfg, 0)
    assert len(labelled) == 3 and {a.get_chemical_formula() for a in labelled} == {"C2H6O"}
    assert len(pool) == 9  # every other frame, methanol included
    assert {a.info["group"] for a in pool} == {"C2H6O", "CH4O"}
    assert len(tests["methanol"]) == 4
    assert {a.get_chemical_formula() for a in tests["methanol"]} == {"CH4O"}


def test_rounds_of_the_evidence_are_never_pooled(harness, tmp_path):
    for seed in (0, 1):
        a = _write_result(tmp_path, "exp_a", "m1", "random", seed, 1.0)
        _write_result(tmp_path, "exp_a", "m1", "pv", seed, 0.5)  # round 1: -50 %
        b = _write_result(tmp_path, "exp_b", "m1", "random", seed, 1.0)
        p = _write_result(tmp_path, "exp_b", "m1", "pv", seed, 1.5)  # round 2: +50 %
    for f in p.glob("*.json"):
        rec = json.loads(f.read_text())
        rec["config"]["round"] = 2
        f.write_text(json.dumps(rec))
    assert harness.evidence_round(json.loads(next(b.glob("*.json")).read_text())) == 2
    text = "\n".join(harness.summary_markdown([a, b]))
    r1, r2 = text.split("#### Round 2")
    assert "| `pv` | 2 | 2 | 0.500 | -50.00" in r1 and "exp_b" not in r1
    assert "| `pv` | 2 | 0 | 1.500 | +50.00" in r2 and "exp_a" not in r2

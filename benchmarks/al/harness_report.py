"""Reporting the active-learning evidence from the result JSONs of ``harness_run``: per-experiment
tables (mean ± std over seeds per round, median ratio to random and seeds beating random, labels to
target, selection mix, cost per stage), learning-curve plots, the tables across experiments, and
``docs/evidence.md``. The command line is ``harness.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from harness_run import CONFIGS, EXTENDED, make_split

#: Where ``docs`` puts the generated summary tables inside FINDINGS.md.
SUMMARY_MARK = "<!-- summary tables: harness.py docs -->"


def load_results(directory):
    return [json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))]


def _has(metrics, metric):
    """Whether ``metrics`` holds a finite ``metric`` (absent: added after the run; NaN: none for
    that set, such as force metrics of an energy-only test set)."""
    v = metrics.get(metric)
    return v is not None and bool(np.isfinite(v))


def summarise(records, metric="force_mae"):
    """``{test_set: {method: {"rounds": [(n_labelled, mean, std, n)], "final": {seed: value},
    "seconds": mean}}}``."""
    out = {}
    for r in records:
        for h in r["rounds"]:
            for test, m in h["metrics"].items():
                if not _has(m, metric):
                    continue
                cell = out.setdefault(test, {}).setdefault(r["method"], {"by_round": {},
                                                                         "final": {},
                                                                         "seconds": []})
                cell["by_round"].setdefault(h["round"], []).append((h["n_labelled"], m[metric]))
        for test in out:
            if r["method"] in out[test]:
                last = r["rounds"][-1]
                if _has(last["metrics"].get(test, {}), metric):
                    out[test][r["method"]]["final"][(r["split"], r["seed"])] = \
                        last["metrics"][test][metric]
                    out[test][r["method"]]["seconds"].append(r["seconds"])
    for test in out.values():
        for cell in test.values():
            cell["rounds"] = [(int(np.mean([v[0] for v in vals])),
                               float(np.mean([v[1] for v in vals])),
                               float(np.std([v[1] for v in vals])), len(vals))
                              for _, vals in sorted(cell.pop("by_round").items())]
            cell["seconds"] = float(np.mean(cell["seconds"])) if cell["seconds"] else float("nan")
    return out


#: The tail and offset-free metrics of the second round, reported where the JSONs carry them.
TAIL_METRICS = ("force_q95", "force_q99", "force_max_atom_mean", "force_mae_q90",
                "energy_mae_centered")


def report_markdown(directory, metrics=("force_mae", "energy_mae")) -> str:
    records = load_results(directory)
    if not records:
        return f"No results in {directory}.\n"
    first = next(iter(records[0]["rounds"][0]["metrics"].values()), {})
    metrics = tuple(metrics) + tuple(m for m in TAIL_METRICS
                                     if m in first and m not in metrics)
    exp = records[0]["experiment"]
    lines = [f"### {exp}", "",
             f"{len(records)} runs; machine: {records[0]['machine']}; "
             f"config: `{records[0]['config'].get('model')}`, "
             f"rounds {records[0]['config']['loop']}, fine-tuning "
             f"{records[0]['config'].get('finetune', {})}.", ""]
    for metric in metrics:
        unit = "eV/Å" if metric.startswith("force") else "eV/atom"
        summ = summarise(records, metric)
        for test, methods in sorted(summ.items()):
            if all(np.isnan(r[1]) for c in methods.values() for r in c["rounds"]):
                continue  # e.g. force errors on an energy-only test set
            lines += [f"**{metric} ({unit}) on `{test}`** — mean ± std over seeds per round "
                      f"(labelled structures in brackets); last columns: median ratio to random "
                      f"at the last round and seeds where the method beats random (paired).", ""]
            n_rounds = max(len(c["rounds"]) for c in methods.values())
            head = ["method"] + [f"r{k}" for k in range(n_rounds)] + \
                ["÷ random", "beats random", "s/run"]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            pairs = paired(methods)
            for name, cell in sorted(methods.items()):
                row = [name] + [f"{m:.4f} ± {s:.4f} ({n}, n={c})" for n, m, s, c in cell["rounds"]]
                row += [""] * (1 + n_rounds - len(row))
                if name in pairs:
                    n, wins, ratio, *_ = paired_stats(pairs[name])
                    row += [f"{ratio:.3f}", f"{wins}/{n}"]
                else:
                    row += ["—", "—"]
                row.append(f"{cell['seconds']:.0f}")
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    lines += labels_to_target_markdown(records)
    lines += finetune_markdown(records)
    lines += subgroup_markdown(records)
    lines += cost_markdown(records)
    lines += selection_mix_markdown(records)
    return "\n".join(lines)


def selection_mix(records):
    """``{method: Counter of info[key] over all picks}`` with ``key`` the pool's group key
    (``data.groups`` or ``"group"``), recomputing each split from its config (deterministic)."""
    from collections import Counter

    splits, out, pools = {}, {}, {}
    for r in records:
        cfg = dict(r["config"])
        cfg["_dir"] = str(CONFIGS)
        key = cfg["data"].get("groups") or "group"
        if r["seed"] not in splits:
            try:
                splits[r["seed"]] = make_split(cfg, r["seed"])[1]
            except (OSError, ValueError, KeyError):
                return {}, key
        pool = splits[r["seed"]]
        pools.setdefault(r["seed"], Counter(a.info.get(key) for a in pool))
        out.setdefault(r["method"], Counter()).update(pool[i].info.get(key)
                                                      for i in r["selected"])
    out["(pool)"] = sum(pools.values(), Counter())
    return out, key


def selection_mix_markdown(records):
    mix, key = selection_mix(records)
    if not mix or all(k is None for c in mix.values() for k in c):
        return []
    labels = sorted({str(k) for c in mix.values() for k in c})
    lines = [f"**Where the picks came from** (share of all picks by pool `{key}`, all seeds and "
             f"rounds; `(pool)`: the pool itself)", "",
             "| method | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
    for m, c in sorted(mix.items()):
        total = sum(c.values()) or 1
        lines.append(f"| {m} | " + " | ".join(f"{c.get(lab, 0) / total:.0%}"
                                               if lab in map(str, c) else "0%"
                                               for lab in labels) + " |")
    return lines + [""]


def monotone_curve(points):
    """``[(n_labelled, value)]`` sorted by n, each value replaced by the best so far (running
    minimum): the error random reaches with *at most* n labels."""
    pts = sorted(points)
    n = np.array([p[0] for p in pts], dtype=float)
    return n, np.minimum.accumulate(np.array([p[1] for p in pts], dtype=float))


def labels_needed(n, curve, value):
    """Labels a random batch needs to reach ``value`` on the monotone ``curve`` over ``n``
    (linear interpolation between budgets); ``n[0]`` when the first budget already reaches it,
    ``inf`` when no budget does (never extrapolated)."""
    hit = np.nonzero(curve <= value)[0]
    if not hit.size:
        return float("inf")
    k = int(hit[0])
    if k == 0:
        return float(n[0])
    return float(n[k - 1] + (curve[k - 1] - value) / (curve[k - 1] - curve[k])
                 * (n[k] - n[k - 1]))


def labels_to_target(records, test, metric="force_mae"):
    """``{method: {"n": final labels, "needed": labels random needs for the method's seed-mean
    final error, "per_seed": [labels needed for each seed's final error], "n_max": random's
    largest budget}}`` on ``test``; random's curve is the seed-mean learning curve of
    ``random_extended`` made monotone, or None without one."""
    summ = summarise(records, metric).get(test, {})
    if EXTENDED not in summ:
        return None
    n, curve = monotone_curve([(r[0], r[1]) for r in summ[EXTENDED]["rounds"]])
    out = {}
    for m, cell in summ.items():
        if m == EXTENDED or not cell["final"]:
            continue
        finals = list(cell["final"].values())
        out[m] = {"n": cell["rounds"][-1][0], "n_max": int(n[-1]),
                  "needed": labels_needed(n, curve, float(np.mean(finals))),
                  "per_seed": [labels_needed(n, curve, v) for v in finals]}
    return out


def _labels_cell(x, n_max):
    return f"> {n_max}" if np.isinf(x) else f"{x:.0f}"


def labels_to_target_markdown(records, metrics=("force_mae", "force_q95")):
    """Per test set and metric: the labels random needs to reach each method's final error."""
    lines = []
    tests = sorted({t for r in records for t in r["rounds"][-1]["metrics"]})
    for metric in metrics:
        summ = summarise(records, metric)
        for test in tests:
            ltt = labels_to_target(records, test, metric)
            if not ltt or all(np.isnan(summ[test][m]["rounds"][-1][1]) for m in ltt):
                continue
            if not lines:
                lines = ["**Labels to target** — the labels a random batch needs to reach each "
                         "method's final error (interpolated on `random_extended`'s seed-mean "
                         "curve made monotone; \"> N\" where random never reaches it within its "
                         "N labels); fewer labels % = 1 − the method's labels ÷ random's; "
                         "per seed: median [min, max] of the same for each seed's final error.", ""]
            lines += [f"*{metric} on `{test}`*", "",
                      "| method | labels | random needs | fewer labels | per seed |",
                      "|---|---|---|---|---|"]
            for m, c in sorted(ltt.items()):
                per = np.array(c["per_seed"])
                fewer = ("—" if np.isinf(c["needed"])
                         else f"{100 * (1 - c['n'] / c['needed']):+.0f} %")
                spread = (f"{_labels_cell(np.median(per), c['n_max'])} "
                          f"[{_labels_cell(per.min(), c['n_max'])}, "
                          f"{_labels_cell(per.max(), c['n_max'])}]")
                lines.append(f"| {m} | {c['n']} | {_labels_cell(c['needed'], c['n_max'])} | "
                             f"{fewer} | {spread} |")
            lines.append("")
    return lines


def finetune_summary(records):
    """``{method: (rounds, rounds whose best epoch is the cap, rounds that ran to the cap)}``
    from each round's ``finetune`` record (runs before it was recorded are left out)."""
    out = {}
    for r in records:
        for h in r["rounds"]:
            ft = h.get("finetune")
            if ft is None:
                continue
            c = out.setdefault(r["method"], [0, 0, 0])
            c[0] += 1
            c[1] += ft["best_epoch"] == ft["max_epochs"]
            c[2] += ft["epochs_run"] == ft["max_epochs"]
    return {m: tuple(c) for m, c in out.items()}


def finetune_markdown(records):
    ft = finetune_summary(records)
    if not ft:
        return []
    lines = ["**Fine-tuning against its epoch cap** (rounds of all runs: how often the kept "
             "weights were those of the last allowed epoch, i.e. training might have gone on "
             "improving, and how often training ran to the cap without early stopping)", "",
             "| method | rounds | best epoch = cap | ran to cap |", "|---|---|---|---|"]
    for m, (n, best, ran) in sorted(ft.items()):
        lines.append(f"| {m} | {n} | {best} ({best / n:.0%}) | {ran} ({ran / n:.0%}) |")
    return lines + [""]


STAGES = ("featurize", "select", "finetune", "evaluate")


def cost_summary(records):
    """``{method: {stage: mean seconds per run}}`` summed over rounds (the loop's ``timings``;
    a committee's K member fine-tunings are part of its ``select``), plus ``"total"``."""
    out = {}
    for r in records:
        tot = {k: sum(h.get("timings", {}).get(k, 0.0) for h in r["rounds"]) for k in STAGES}
        tot["total"] = r["seconds"]
        out.setdefault(r["method"], []).append(tot)
    return {m: {k: float(np.mean([t[k] for t in runs])) for k in (*STAGES, "total")}
            for m, runs in out.items()}


def cost_markdown(records):
    cost = cost_summary(records)
    lines = ["**Compute per run** (mean seconds over runs, summed over rounds; the committee's "
             "K fine-tunings are in its `select`; wall times on a shared machine)", "",
             "| method | " + " | ".join(STAGES) + " | total |", "|" + "---|" * (len(STAGES) + 2)]
    for m, c in sorted(cost.items()):
        lines.append(f"| {m} | " + " | ".join(f"{c[k]:.0f}" for k in (*STAGES, "total")) + " |")
    return lines + [""]


def subgroup_markdown(records, metric="force_mae"):
    """Last-round ``metric`` per test subgroup (``data.groups``): mean over runs per method, with
    the paired mean Δ % to random over the same (split, seed) runs and the wins, so methods run on
    different splits stay comparable."""
    cells = {}
    for r in records:
        for test, m in r["rounds"][-1]["metrics"].items():
            for g, gm in m.get("groups", {}).items():
                cells.setdefault((test, g), {}).setdefault(r["method"], {"final": {}})[
                    "final"][(r["split"], r["seed"])] = gm[metric]
    if not cells:
        return []
    methods = sorted({meth for c in cells.values() for meth in c})
    unit = "eV/Å" if metric.startswith("force") else "eV/atom"
    lines = [f"**{metric} ({unit}) per subgroup at the last round** (mean over runs; in brackets "
             f"the paired mean Δ to random over the same split and seed, negative is better, and "
             f"the runs that beat random; subgroups from `data.groups`)", "",
             "| test set / subgroup | " + " | ".join(methods) + " |",
             "|" + "---|" * (len(methods) + 1)]
    for (test, g), c in sorted(cells.items()):
        pairs = paired(c)
        vals = []
        for m in methods:
            if m not in c:
                vals.append("—")
                continue
            cell = f"{np.mean(list(c[m]['final'].values())):.4f}"
            if m in pairs:
                n, wins, _, delta, *_ = paired_stats(pairs[m])
                cell += f" ({delta:+.1f} %, {wins}/{n})"
            vals.append(cell)
        lines.append(f"| {test} / {g} | " + " | ".join(vals) + " |")
    return lines + [""]


def plot_curves(directory, metric="force_mae"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summarise(load_results(directory), metric)
    if not summ:
        return None
    fig, axes = plt.subplots(1, len(summ), figsize=(4.5 * len(summ), 3.5), squeeze=False)
    for ax, (test, methods) in zip(axes[0], sorted(summ.items()), strict=True):
        for name, cell in sorted(methods.items()):
            x = [r[0] for r in cell["rounds"]]
            y = np.array([r[1] for r in cell["rounds"]])
            s = np.array([r[2] for r in cell["rounds"]])
            ax.errorbar(x, y, yerr=s, marker="o", capsize=2, label=name)
        ax.set_title(test)
        ax.set_xlabel("labelled structures")
        ax.set_ylabel(metric)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(directory) / f"curves_{metric}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cmd_report(args):
    text = report_markdown(args.directory)
    for metric in ("force_mae", "energy_mae"):
        try:
            plot_curves(args.directory, metric)
        except ImportError:
            pass
    (Path(args.directory) / "report.md").write_text(text)
    print(text)
    return 0


def across_markdown(directories, metric="force_mae"):
    """One table over related experiments (e.g. the acac pool shifts 0 / 50 / 90 %): per method
    and experiment, the last-round ``metric`` on the first test set they share, mean ± std over
    seeds, the median ratio to random and the seeds that beat it."""
    per = {Path(d).name: summarise(load_results(d), metric) for d in directories}
    tests = set.intersection(*(set(s) for s in per.values()))
    if not tests:
        return []
    test = sorted(tests)[0]
    names = list(per)
    methods = sorted({m for s in per.values() for m in s[test]})
    unit = "eV/Å" if metric.startswith("force") else "eV/atom"
    lines = [f"**{metric} ({unit}) on `{test}` at the last round, across {', '.join(names)}** "
             f"(mean ± std over seeds; ratio: median over paired seeds of method ÷ random; "
             f"wins: seeds that beat random)", "",
             "| method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for m in methods:
        row = [m]
        for name in names:
            cell = per[name][test].get(m)
            if cell is None:
                row.append("—")
                continue
            n, mean, std, c = cell["rounds"][-1]
            pairs = paired(per[name][test]).get(m)
            extra = ""
            if pairs:
                k, wins, ratio, *_ = paired_stats(pairs)
                extra = f"; {ratio:.3f}, {wins}/{k}"
            row.append(f"{mean:.4f} ± {std:.4f} (n={c}{extra})")
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def target_tests(config):
    """The test sets an experiment is judged on: the first of ``data.test`` (the target), or for
    a ``sid`` split both the held-out frames of the pool systems and the unseen systems."""
    d = config["data"]
    if d.get("targets"):
        return list(d["targets"])
    if d["split"] == "sid":
        return ["in_distribution", "unseen_systems"]
    return list(d.get("test", {}))[:1]


def paired(methods):
    """``{method: [(value, random's value)]}`` at the last round, paired by (split, seed), from
    one test set of :func:`summarise`; methods without a random run of the same split and seed get
    no pairs."""
    rand = methods.get("random", {}).get("final", {})
    out = {}
    for m, cell in methods.items():
        pairs = [(v, rand[k]) for k, v in sorted(cell["final"].items()) if k in rand]
        if m not in ("random", EXTENDED) and pairs:  # random_extended ends at more labels
            out[m] = pairs
    return out


def paired_stats(pairs):
    """``(n, wins, median ratio, mean Δ %, half-width of its 95 % t-interval, sign-test p)`` of
    ``[(value, random's value)]``: Δ % = 100 (value / random − 1), negative is better; the sign
    test is two-sided (scipy.stats.binomtest) on the wins."""
    from scipy import stats

    ratio = np.array([v / r for v, r in pairs])
    delta = 100 * (ratio - 1)
    n, wins = len(pairs), int(np.sum(ratio < 1))
    half = (float(stats.t.ppf(0.975, n - 1) * delta.std(ddof=1) / np.sqrt(n))
            if n > 1 else float("nan"))
    return n, wins, float(np.median(ratio)), float(delta.mean()), half, \
        float(stats.binomtest(wins, n, 0.5).pvalue)


def evidence_round(record) -> int:
    """The round of the evidence a result belongs to: its config's ``round`` (round 2 is
    pre-registered, PREREGISTRATION.md), else that of the experiment's config file in
    ``configs/`` (results written before the key existed), else 1."""
    if "round" in record["config"]:
        return int(record["config"]["round"])
    path = CONFIGS / f"{record['experiment']}.toml"
    if path.exists():
        from skntk.al.config import read_toml

        return int(read_toml(path).get("round", 1))
    return 1


def summary_markdown(directories, metric="force_mae"):
    """The evidence in two tables per round (:func:`evidence_round`), model (the config's
    ``model``) and variant of an experiment of the same model (see :func:`variant_of`), which are
    never pooled with each other: per method and experiment (its :func:`target_tests`), the
    last-round ``metric`` mean ± std over seeds with the paired Δ % to random and the wins; then
    every paired run of the group pooled (the first target test set of each experiment), with
    the mean Δ %, its 95 % interval and a sign test."""
    runs = [(d, r) for d in directories if (r := load_results(d))]
    models = {Path(d).name: r[0]["config"]["model"] for d, r in runs}
    rounds = {Path(d).name: evidence_round(r[0]) for d, r in runs}
    groups = {}
    for d, records in runs:
        name = Path(d).name
        model, rnd = models[name], rounds[name]
        same = {n for n, m in models.items() if m == model and rounds[n] == rnd}
        base = variant_of(name, same)
        key = (rnd, model, None) if base is None else (rnd, model, (base, name))
        groups.setdefault(key, []).append((d, records))
    if len(groups) == 1:
        return _summary_one(next(iter(groups.values())), metric)
    lines = []
    for (rnd, model, base), runs in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][2] is not None, kv[0][1:])):
        head = f"#### Model `{model}`"
        if rnd > 1:
            head = (f"#### Round {rnd} (pre-registered, PREREGISTRATION.md; interim until the "
                    f"primary comparison has its seeds): model `{model}`")
        if base is not None:
            head += f": variant `{base[1]}` of `{base[0]}`"
        lines += [head, ""] + _summary_one(runs, metric)
    return lines


def variant_of(name, names):
    """The experiment ``name`` varies (``molecules_ethanol`` for ``molecules_ethanol_budget``
    when both are in ``names``: the same data, another recipe), or None. A variant is
    summarised and pooled on its own."""
    head = name
    while "_" in head:
        head = head.rpartition("_")[0]
        if head in names:
            return head
    return None


def _summary_one(runs, metric):
    cols, pooled = [], {}
    for d, records in runs:
        tests = target_tests(records[0]["config"])
        for k, test in enumerate(tests):
            summ = summarise(records, metric).get(test, {})
            pairs = paired(summ)
            cols.append((f"{Path(d).name} `{test}`", summ, pairs))
            if k == 0:
                for m, p in pairs.items():
                    pooled.setdefault(m, []).extend(p)
    if not cols:
        return []
    methods = sorted({m for _, summ, _ in cols for m in summ if m != EXTENDED},
                     key=lambda m: (m != "random", m))
    unit = "eV/Å" if metric.startswith("force") else "eV/atom"
    lines = [f"**{metric} ({unit}) at the last round, every experiment** — mean ± std over seeds "
             f"(or splits); in brackets the mean paired difference to random (method ÷ random − 1, "
             f"over the seeds both ran; negative is better) and the seeds that beat random.", "",
             "| method | " + " | ".join(c[0] for c in cols) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for m in methods:
        row = [f"`{m}`"]
        for _, summ, pairs in cols:
            if m not in summ:
                row.append("—")
                continue
            _, mean, std, c = summ[m]["rounds"][-1]
            cell = f"{mean:.4f} ± {std:.4f}"
            if m in pairs:
                n, wins, _, dm, _, _ = paired_stats(pairs[m])
                cell += f" ({dm:+.1f} %, {wins}/{n})"
            row.append(cell)
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"**All experiments pooled** ({metric}, the first target test set of each "
              f"experiment; every (experiment, split, seed) that ran both the method and random "
              f"is one pair; the pairs are treated as independent)", "",
              "| method | pairs | beats random | median ratio | mean Δ % [95 % CI] | sign test p |",
              "|---|---|---|---|---|---|"]
    for m in sorted(pooled):
        n, wins, med, dm, half, pval = paired_stats(pooled[m])
        ci = f" [{dm - half:+.2f}, {dm + half:+.2f}]" if n > 1 else " (one pair)"
        lines.append(f"| `{m}` | {n} | {wins} | {med:.3f} | {dm:+.2f}{ci} | {pval:.2g} |")
    return lines + [""]


def _families(dirs):
    """Experiments whose names differ only after the last ``_`` (``acac_shift_0``, ``_50``, ...),
    ordered by that suffix (numerically where it is a number)."""
    fam = {}
    for d in dirs:
        head, _, tail = d.name.rpartition("_")
        fam.setdefault(head, []).append((int(tail) if tail.isdigit() else tail, d))
    return {h: [d for _, d in sorted(v, key=lambda t: (isinstance(t[0], str), t[0]))]
            for h, v in fam.items() if len(v) > 1}


def cmd_docs(args):
    """``docs/evidence.md``: the written findings (``benchmarks/al/FINDINGS.md``) followed by the
    generated report of every experiment folder under ``results/al``."""
    root = Path(args.results)
    findings = (Path(__file__).parent / "FINDINGS.md").read_text().rstrip()
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and any(p.glob("*.json")))
    summary = "\n".join(summary_markdown(dirs)).rstrip()
    parts = [findings.replace(SUMMARY_MARK, summary) if SUMMARY_MARK in findings
             else findings + "\n\n" + summary, ""]
    models = {d: load_results(d)[0]["config"]["model"] for d in dirs}
    for head, members in _families(dirs).items():
        if len({models[d] for d in members}) > 1:
            continue  # never one table across backends
        table = across_markdown(members)  # empty when the members share no test set
        if table:
            parts += [f"### {head}: across experiments", ""] + table
    for d in dirs:
        parts += [report_markdown(d), ""]
    Path(args.out).write_text("\n".join(parts))
    print(f"wrote {args.out}")
    return 0

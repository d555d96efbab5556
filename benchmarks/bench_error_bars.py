"""Error bars from one model against the alternatives, on the shared DFT data (issue 24).

One *piece* is one (dataset, model, labelled-set size, seed): the model is fine-tuned once on
``n_train`` labelled frames (``MLIPRegressor``: 3 epochs, patience 2, the evidence harness's
short recipe), every score below is computed for ``n_calibration`` calibration frames and the
test frames, each score gets **the same calibration step** (the monotone log-linear map of
:class:`skntk.ForceUncertainty`, fitted on the calibration frames, and split-conformal bounds
from its ratios), and each is judged on the test sets against the true per-structure force MAE
of the one fine-tuned model:

===================  ==========================================================================
``ntk_energy``        posterior variance (PV) of energy NTK rows of the fine-tuned model
                      (the default featuriser of ``ForceUncertainty``: d = 256, σ² = 1e-2)
``ntk_joint``         PV of joint energy+force rows (4 probes per structure)
``ntk_pretrained``    PV of energy rows of the *pretrained* model
``committee``         force spread of 4 fine-tunings (the judged model + 3 seeds): mean over
                      free atoms of the per-atom standard deviation
``embedding_dist``    distance of the mean embedding (fine-tuned model) to the nearest
                      labelled frame's
``force``             the model's own mean predicted |F̂| (the trivial baseline)
``random``            a random number (the floor)
===================  ==========================================================================

Each novelty score is calibrated alone and with |F̂| as a second input (``<score>+force``);
``ntk_energy+force`` is the product default, checked against ``ForceUncertainty.from_regressor``
(``default_check`` in the JSON). Per test set: Spearman ρ, ROC-AUC for the worst 10 %, AUSE (the
area between the sparsification curve of the score and the oracle's, relative to the mean error;
0 is perfect, arXiv 2405.04278), the miscalibration area of the conformal bounds at nominal
5 %...95 %, observed coverage of the 80/90/95 % bounds and the mean z² of the force components
(σ per component = MAE · √(π/2), Gaussian components). Cost: one-off seconds and per structure,
relative to one batched E+F evaluation of the model.

Datasets (``--datasets``): ``acac`` (labelled and calibration frames from 300 K MD; test 300 K
MD in distribution, 600 K MD out of it), ``ethanol`` and ``3bpa`` (one MD file: test frames from
the same distribution), ``oc20`` (split by system: labelled, calibration and the in-distribution
test frames from half of the relaxations, the out-of-distribution test set from the others;
calibration and test frames only of the labelled frames' elements, which the estimator needs;
a test set left with fewer than 10 such frames is absent from the piece).

Pieces are written as they finish and skipped when present: rerun the same command to resume::

    python benchmarks/bench_error_bars.py run --threads 1 --datasets acac ethanol 3bpa \\
        --models sevennet-0 --sizes 16 48 --seeds 0 1 2
    python benchmarks/bench_error_bars.py run --fast --datasets acac   # ~2 min smoke run
    python benchmarks/bench_error_bars.py report   # summary.md + plot from every piece
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from _data import SHARED_DATA

ROOT = Path(__file__).resolve().parent
DATA = SHARED_DATA
RESULTS = ROOT / "results" / "error_bars"

FULL = {"n_calibration": 30, "n_test": 60, "epochs": 3, "n_members": 4}
FAST = {"n_calibration": 10, "n_test": 12, "epochs": 1, "n_members": 2}
SIGMA2 = 1e-2  # the default of ForceUncertainty
NOVELTY = ("ntk_energy", "ntk_joint", "ntk_pretrained", "committee", "embedding_dist")
COVERAGES = (0.8, 0.9, 0.95)


# -- data ----------------------------------------------------------------------------------------

def _read(path):
    from ase.io import read

    return read(path, ":")


def split(dataset, n_train, n_cal, n_test, seed):
    """``(train, calibration, {test set: (frames, in_distribution)})`` of ``dataset``; the
    random draws depend on ``seed`` only (the same frames for every model)."""
    rng = np.random.default_rng(seed)
    mol = DATA / "molecules"

    def draw(frames, *sizes):
        idx = rng.permutation(len(frames))
        out, start = [], 0
        for n in sizes:
            out.append([frames[i] for i in np.sort(idx[start:start + n])])
            start += n
        return out

    if dataset == "acac":
        train, cal = draw(_read(mol / "acac_train_300K.xyz"), n_train, n_cal)
        (t300,) = draw(_read(mol / "acac_test_MD_300K.xyz"), n_test)
        (t600,) = draw(_read(mol / "acac_test_MD_600K.xyz"), n_test)
        return train, cal, {"md_300K": (t300, True), "md_600K": (t600, False)}
    if dataset == "ethanol":
        train, cal = draw(_read(mol / "ethanol_train.xyz"), n_train, n_cal)
        (test,) = draw(_read(mol / "ethanol_test_MD.xyz"), n_test)
        return train, cal, {"md": (test, True)}
    if dataset == "3bpa":
        train, cal, test = draw(_read(mol / "3bpa_train_300K.xyz"), n_train, n_cal, n_test)
        return train, cal, {"md_300K": (test, True)}
    if dataset == "oc20":
        frames = _read(DATA / "oc20" / "oc20_s2ef_relax_24sys.extxyz")
        sids = sorted({str(a.info["sid"]) for a in frames})
        seen = set(rng.permutation(sids)[:len(sids) // 2].tolist())
        inside = [a for a in frames if str(a.info["sid"]) in seen]
        outside = [a for a in frames if str(a.info["sid"]) not in seen]
        order = rng.permutation(len(inside))
        train = [inside[i] for i in np.sort(order[:n_train])]
        # ForceUncertainty refuses elements its posterior never saw (by name): calibration and
        # test frames are drawn among those made of the labelled frames' elements only
        known = {int(z) for a in train for z in a.numbers}
        inside = [inside[i] for i in order[n_train:] if set(inside[i].numbers) <= known]
        outside = [a for a in outside if set(a.numbers) <= known]
        cal, test_in = draw(inside, n_cal, n_test)
        (test_out,) = draw(outside, n_test)
        tests = {"seen_systems": (test_in, True), "unseen_systems": (test_out, False)}
        return train, cal, {k: v for k, v in tests.items() if len(v[0]) >= 10}  # else absent
    raise ValueError(f"unknown dataset {dataset!r}; expected acac, ethanol, 3bpa or oc20.")


# -- metrics -------------------------------------------------------------------------------------

def ause(pred, true):
    """Area between the sparsification curves of ``pred`` and of the oracle (remove the
    highest-ranked fraction, mean true error of the rest), divided by the mean error."""
    n = len(true)

    def curve(order):
        rest = true[order][::-1].cumsum()[::-1]  # sum of the errors kept after removing k
        return rest / (n - np.arange(n))

    return float(np.mean(curve(np.argsort(-pred, kind="stable"))
                         - curve(np.argsort(-true, kind="stable"))) / true.mean())


def judge(pred, true, ratios, residuals):
    """Metrics of predicted errors ``pred`` (n,) against true ``true`` (n,); ``ratios``: the
    calibration set's error/prediction ratios (conformal scores); ``residuals``: per structure
    the force-component errors of its free atoms."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    from skntk.uncertainty import conformal_quantile

    worst = true >= np.quantile(true, 0.9)
    out = {"spearman": float(spearmanr(pred, true).statistic) if np.ptp(pred) > 0 else None,
           "auc_worst10": float(roc_auc_score(worst, pred))
           if 0 < worst.sum() < len(true) else None,
           "ause": ause(pred, true), "mean_pred": float(pred.mean()),
           "mean_true": float(true.mean())}
    grid = np.arange(0.05, 0.951, 0.05)
    observed = np.array([np.mean(true <= conformal_quantile(ratios, p) * pred) for p in grid])
    out["miscalibration_area"] = float(np.mean(np.abs(observed - grid)))
    for p in COVERAGES:
        out[f"coverage{round(100 * p)}"] = float(np.mean(
            true <= conformal_quantile(ratios, p) * pred))
    sigma = pred * np.sqrt(np.pi / 2)  # E|x| = σ √(2/π) for Gaussian components
    z2 = np.concatenate([(r / s) ** 2 for r, s in zip(residuals, sigma, strict=True)])
    out["mean_z2"] = float(z2.mean())
    return out


# -- one piece -----------------------------------------------------------------------------------

def _force_errors(f_hat, f_ref, free):
    """Per structure: MAE over free atoms (eV/Å) and the free atoms' component errors."""
    mae, res = [], []
    for fh, fr, m in zip(f_hat, f_ref, free, strict=True):
        d = (np.asarray(fh) - np.asarray(fr))[m]
        mae.append(float(np.abs(d).mean()) if d.size else 0.0)
        res.append(d.reshape(-1))
    return np.asarray(mae), res


def _pv(featurizer, train, frames):
    """Mean posterior variance per structure of ``frames`` given ``train`` (one featuriser)."""
    from skntk.blocks import as_blocks
    from skntk.selection._posterior import FeaturePosterior
    from skntk.selection.pv import pv_mean

    post = FeaturePosterior(SIGMA2).fit(as_blocks(featurizer.fit(train).transform(train)))
    blocks = as_blocks(featurizer.transform(frames))
    out = np.empty(len(frames))
    for sl, psi, offsets in post.iter_transform(blocks):
        out[sl] = pv_mean(psi, offsets)
    return out


def run_piece(dataset, model_name, n_train, seed, size):
    import torch  # noqa: F401  (threads set by the caller)
    from sklearn.base import clone

    from skntk.al.committee import committee_disagreement
    from skntk.finetune import MLIPRegressor, predict_energies_forces
    from skntk.io import free_atoms, get_labels
    from skntk.models import load
    from skntk.transformers import EmbeddingTransformer, ForceNTKTransformer
    from skntk.uncertainty import ForceUncertainty, _apply_log_map, _design, _fit_log_map

    train, cal, tests = split(dataset, n_train, size["n_calibration"], size["n_test"], seed)
    cost, one_off = {}, {}
    pretrained = load(model_name, device="cpu")
    reg0 = MLIPRegressor(pretrained, epochs=size["epochs"], patience=2, device="cpu",
                         progress_bar=False)
    members = []
    for k in range(size["n_members"]):
        t0 = time.perf_counter()
        members.append(clone(reg0).set_params(random_state=seed + 1000 * k).fit(train))
        one_off["finetune" if k == 0 else f"finetune_member{k}"] = time.perf_counter() - t0
    reg = members[0]
    model = reg.model_
    post_train = [train[i] for i in reg.train_indices_]  # what the model trained on
    # ForceUncertainty refuses elements its posterior never saw (by name): keep the calibration
    # and test frames made of the elements of the frames the model trained on (the validation
    # frames MLIPRegressor held out are not in the posterior); the JSON records what was dropped
    known = {int(z) for a in post_train for z in a.numbers}
    n_drawn = {"calibration": len(cal), **{t: len(v[0]) for t, v in tests.items()}}
    cal = [a for a in cal if set(a.numbers) <= known]
    tests = {t: ([a for a in v[0] if set(a.numbers) <= known], v[1]) for t, v in tests.items()}
    tests = {t: v for t, v in tests.items() if len(v[0]) >= 10}  # else absent
    names = list(tests)
    frames = cal + [a for t in names for a in tests[t][0]]
    parts, start = {}, len(cal)
    for t in names:
        parts[t] = slice(start, start + len(tests[t][0]))
        start += len(tests[t][0])
    V = model.validate(frames)
    t0 = time.perf_counter()
    e_hat, f_hat = predict_energies_forces(model, V)
    t_ef = (time.perf_counter() - t0) / len(V)
    free = [free_atoms(a) for a in V]
    _, f_ref = get_labels(frames)
    true, residuals = _force_errors(f_hat, f_ref, free)
    mean_f = np.array([np.linalg.norm(f, axis=1)[m].mean() for f, m in zip(f_hat, free,
                                                                            strict=True)])
    scores = {"force": mean_f, "random": np.random.default_rng(seed + 7).random(len(V))}
    ntk = {"ntk_energy": ForceNTKTransformer(model, kind="energy", n_features=256,
                                             random_state=0),
           "ntk_joint": ForceNTKTransformer(model, kind="joint", force_rows="probes",
                                            n_probes=4, n_features=256, random_state=0),
           "ntk_pretrained": ForceNTKTransformer(pretrained, kind="energy", n_features=256,
                                                 random_state=0)}
    for name, feat in ntk.items():
        t0 = time.perf_counter()
        scores[name] = _pv(feat, post_train, V)
        cost[name] = (time.perf_counter() - t0) / len(V) / t_ef  # incl. the small train part
    t0 = time.perf_counter()
    member_f = [f_hat] + [predict_energies_forces(m.model_, V)[1] for m in members[1:]]
    per_structure = [np.stack([mf[s] for mf in member_f]) for s in range(len(V))]
    scores["committee"] = committee_disagreement(None, per_structure, None, free,
                                                 disagreement="force_mean")
    cost["committee"] = 1 + (time.perf_counter() - t0) / len(V) / t_ef
    t0 = time.perf_counter()
    emb = EmbeddingTransformer(model).fit()
    e_train, e_all = emb.transform(post_train), emb.transform(V)
    scores["embedding_dist"] = np.sqrt(((e_all[:, None, :] - e_train[None]) ** 2)
                                       .sum(-1)).min(axis=1)
    cost["embedding_dist"] = (time.perf_counter() - t0) / len(V) / t_ef
    cost["force"], cost["random"] = 0.0, 0.0

    cal_sl = slice(0, len(cal))
    maps = {n: (n, None) for n in NOVELTY}
    maps.update({f"{n}+force": (n, "force") for n in NOVELTY})
    maps.update({"force": (None, "force"), "random": ("random", None)})
    floor = 1e-30
    results = {}
    for label, (novel, force) in maps.items():
        log_s = None if novel is None else np.log(np.maximum(scores[novel], floor))
        log_f = np.log(np.maximum(mean_f, 1e-6))
        inputs = "pv+force" if novel and force else ("pv" if novel else "force")
        D = _design(log_s, log_f, inputs)
        coef, s2 = _fit_log_map(D[cal_sl], true[cal_sl])
        pred = _apply_log_map(D, coef, s2)
        ratios = true[cal_sl] / pred[cal_sl]
        results[label] = {"coef": coef.tolist(), "residual_var": s2,
                          "cost_vs_ef": 1 + cost[novel or "force"],
                          **{t: judge(pred[s], true[s], ratios, residuals[s])
                             for t, s in parts.items()}}
        if label == "ntk_energy+force":
            default_pred = pred
    t0 = time.perf_counter()
    est = ForceUncertainty.from_regressor(reg, cal, atoms=train)
    one_off["calibrate_default"] = time.perf_counter() - t0
    product = est.predict(frames[len(cal):])
    check = float(np.max(np.abs(product / default_pred[len(cal):] - 1)))
    return {"dataset": dataset, "model": model_name, "n_train": n_train, "seed": seed,
            "sizes": size, "n_posterior": len(post_train), "n_calibration": len(cal),
            "n_drawn": n_drawn, "test_sets": {
                t: {"n": len(tests[t][0]), "in_distribution": tests[t][1]} for t in names},
            "best_epoch": int(reg.best_epoch_), "ef_seconds_per_structure": t_ef,
            "one_off_seconds": one_off, "default_check_max_rel_diff": check,
            "scores": results, "machine": platform.node()}


def cmd_run(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    size = FAST if args.fast else FULL
    RESULTS.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for dataset in args.datasets:
            for model in args.models:
                for n in args.sizes:
                    tag = f"{dataset}_{model}_n{n}_s{seed}" + ("_fast" if args.fast else "")
                    out = RESULTS / f"{tag}.json"
                    if out.exists():
                        continue
                    t0 = time.perf_counter()
                    rec = run_piece(dataset, model, n, seed, size)
                    rec["seconds"] = time.perf_counter() - t0
                    rec["threads"] = torch.get_num_threads()
                    tmp = out.with_suffix(".tmp")
                    tmp.write_text(json.dumps(rec, indent=1))
                    tmp.replace(out)  # a piece is there whole or not at all
                    short = {k: round(v[t]["spearman"] or np.nan, 2)
                             for k, v in rec["scores"].items() for t in rec["test_sets"]
                             if k in ("ntk_energy+force", "force", "committee")}
                    print(f"{tag}: {rec['seconds']:.0f} s {short}", flush=True)
    return 0


# -- report --------------------------------------------------------------------------------------

def cmd_report(args):
    pieces = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))
              if not p.stem.endswith("_fast")]
    if not pieces:
        print("no pieces in", RESULTS)
        return 1
    groups = {}
    for rec in pieces:
        for t, meta in rec["test_sets"].items():
            key = (rec["dataset"], rec["model"], rec["n_train"], t, meta["in_distribution"])
            groups.setdefault(key, []).append(rec)
    labels = list(pieces[0]["scores"])
    metrics = ("spearman", "auc_worst10", "ause", "coverage90", "miscalibration_area", "mean_z2")
    lines = ["# Error bars from one model: every piece of `bench_error_bars.py`", "",
             "Seed mean ± standard deviation over the pieces of each row. ρ, AUC: higher is "
             "better; AUSE, miscalibration area: lower is better; coverage of the 90 % bound "
             "and mean z²: near 0.9 and 1 where the test set is exchangeable with the "
             "calibration set (in distribution). Cost: per structure, in units of one E+F.", ""]
    for key, recs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        dataset, model, n, t, inside = key
        lines += [f"## {dataset} · {model} · {n} labelled · test `{t}` "
                  f"({'in' if inside else 'out of'} distribution) · seeds "
                  f"{sorted(r['seed'] for r in recs)}", "",
                  "| score | " + " | ".join(metrics) + " | cost |",
                  "|---" * (len(metrics) + 2) + "|"]
        for label in labels:
            cells = []
            for m in metrics:
                v = np.array([r["scores"][label][t][m] for r in recs], dtype=float)
                cells.append(f"{np.nanmean(v):.2f} ± {np.nanstd(v):.2f}"
                             if np.isfinite(v).any() else "–")
            c = np.mean([r["scores"][label]["cost_vs_ef"] for r in recs])
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {c:.2f} |")
        lines.append("")
    lines += _overview(pieces)
    (RESULTS / "summary.md").write_text("\n".join(lines))
    print("wrote", RESULTS / "summary.md")
    return 0


OVERVIEW = (("default (`ntk_energy+force`)", "ntk_energy+force"),
            ("joint rows + \\|F̂\\|", "ntk_joint+force"), ("committee (4)", "committee"),
            ("committee + \\|F̂\\|", "committee+force"), ("\\|F̂\\| alone", "force"),
            ("embedding distance + \\|F̂\\|", "embedding_dist+force"), ("random", "random"))


def _overview(pieces):
    """The docs' table per (model, labelled-set size): seed means of ρ / AUC / coverage of the
    90 % bound per test set, a map with no slope (it ranks nothing) counted as ρ 0, AUC 0.5;
    and the mean ρ over every (seed, test set) pair."""
    lines = []
    groups = {}
    for rec in pieces:
        groups.setdefault((rec["model"], rec["n_train"]), []).append(rec)
    for (model, n), recs in sorted(groups.items()):
        lines += [f"## Overview · {model} · {n} labelled", "",
                  "Seed means of ρ / AUC / coverage of the 90 % bound (flat maps: ρ 0, AUC 0.5);"
                  " seeds per row in brackets.", "",
                  "| test set | " + " | ".join(name for name, _ in OVERVIEW) + " |",
                  "|---" * (len(OVERVIEW) + 1) + "|"]
        rows = {}
        for rec in recs:
            for t, meta in rec["test_sets"].items():
                rows.setdefault((rec["dataset"], t, meta["in_distribution"]), []).append(rec)
        pairs = {label: [] for _, label in OVERVIEW}
        for (dataset, t, inside), rs in sorted(rows.items()):
            cells = []
            for _, label in OVERVIEW:
                m = [r["scores"][label][t] for r in rs]
                rho = np.nan_to_num(np.array([x["spearman"] for x in m], dtype=float), nan=0.0)
                auc = np.nan_to_num(np.array([x["auc_worst10"] for x in m], dtype=float),
                                    nan=0.5)
                cov = np.array([x["coverage90"] for x in m], dtype=float)
                pairs[label] += rho.tolist()
                cells.append(f"{rho.mean():.2f} / {auc.mean():.2f}"
                             + ("" if label == "random" else f" / {np.nanmean(cov):.2f}"))
            lines.append(f"| {dataset} {t} ({'in' if inside else 'out of'} distribution; "
                         f"{len(rs)}) | " + " | ".join(cells) + " |")
        lines.append(f"| mean ρ over the {len(pairs['random'])} (seed, test set) pairs | "
                     + " | ".join(f"{np.mean(pairs[label]):.2f}" for _, label in OVERVIEW)
                     + " |")
        lines.append("")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="compute the missing pieces")
    r.add_argument("--datasets", nargs="+", default=["acac", "ethanol", "3bpa", "oc20"])
    r.add_argument("--models", nargs="+", default=["sevennet-0"])
    r.add_argument("--sizes", nargs="+", type=int, default=[16, 48])
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    r.add_argument("--fast", action="store_true", help="a small smoke run (pieces *_fast)")
    sub.add_parser("report", help="summary.md from every piece")
    args = p.parse_args(argv)
    return cmd_run(args) if args.cmd == "run" else cmd_report(args)


if __name__ == "__main__":
    raise SystemExit(main())

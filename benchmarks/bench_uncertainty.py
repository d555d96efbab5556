"""Quick measurement behind the defaults of :class:`skntk.ForceUncertainty` (issue 24).

One fine-tuning of SevenNet-0 on ``n_train`` acetylacetone frames (300 K MD, the recipe of
``benchmarks/al/configs/acac_shift_0.toml``: 3 epochs, patience 2), a calibration set of
``n_calibration`` other 300 K frames, and held-out test frames from the 300 K and 600 K MD test
files (half each). For each featuriser (energy NTK rows; joint rows with probes; optionally
exact joint rows) and each input of the calibration map (posterior variance alone, the model's
own mean |F̂| alone, both, and a random score as the floor), on the 300 K, 600 K and all test
frames:

- Spearman ρ between predicted and true per-structure force MAE;
- ROC-AUC of finding the worst 10 % of structures (true MAE at or above the 90th percentile);
- observed coverage of the 90 % split-conformal upper bound (guaranteed only for frames
  exchangeable with the calibration set: the 300 K ones);
- cost: featurisation and map per test structure, relative to one batched E+F evaluation.

One seed, one dataset: a reason to pick a default, not a result. Writes
``benchmarks/results/uncertainty/<name>.json``.

Usage::

    python benchmarks/bench_uncertainty.py --threads 1            # ~5 min on 1 core
    python benchmarks/bench_uncertainty.py --threads 1 --fast     # ~1 min smoke run
    python benchmarks/bench_uncertainty.py --threads 1 --exact    # + exact joint rows, ~20 min
    python benchmarks/bench_uncertainty.py --threads 1 --featurizers energy --plot \\
        --out benchmarks/results/uncertainty/acac_sevennet_seed0_default.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
from _data import SHARED_DATA

ROOT = Path(__file__).resolve().parent
DATA = SHARED_DATA / "molecules"
RESULTS = ROOT / "results" / "uncertainty"

FULL = {"n_train": 24, "n_calibration": 30, "n_test": 150, "epochs": 3}
FAST = {"n_train": 8, "n_calibration": 10, "n_test": 20, "epochs": 1}
#: Noise variances of the posterior compared (relative to the normalised kernel).
SIGMA2S = [1e-4, 1e-3, 1e-2, 1e-1]


def featurizers(model, exact, only=None):
    from skntk.transformers import ForceNTKTransformer

    out = {
        "energy": ForceNTKTransformer(model, kind="energy", n_features=256, random_state=0),
        "joint_probes4": ForceNTKTransformer(model, kind="joint", force_rows="probes",
                                             n_probes=4, n_features=256, random_state=0),
    }
    if exact:
        out["joint_exact"] = ForceNTKTransformer(model, kind="joint", force_rows="exact",
                                                 n_features=256, random_state=0)
    return out if only is None else {k: v for k, v in out.items() if k in only}


def plot(record, path):
    """Predicted vs true force MAE of the default (energy rows, σ² = 1e-2, PV + |F̂|), with the
    90 % bounds, coloured by test temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = record["arrays"]
    pred, upper, true = (np.asarray(a[k]) for k in ("pred", "upper", "true"))
    hot = np.asarray(a["temperature"]) == "600K"
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    for mask, label, c in ((~hot, "300 K (like the calibration set)", "C0"),
                           (hot, "600 K (out of distribution)", "C3")):
        ax.errorbar(pred[mask], true[mask], xerr=[np.zeros(mask.sum()), (upper - pred)[mask]],
                    fmt="o", ms=3, alpha=0.6, elinewidth=0.4, color=c, label=label)
    lo, hi = min(pred.min(), true.min()) * 0.95, max(upper.max(), true.max()) * 1.02
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="predicted force MAE (eV/Å)",
           ylabel="true force MAE (eV/Å)",
           title="SevenNet-0 on acac: default error bars\n(bars: 90 % conformal bound)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def metrics(pred, true, upper):
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    worst = true >= np.quantile(true, 0.9)
    auc = float(roc_auc_score(worst, pred)) if 0 < worst.sum() < len(true) else None
    # a map whose slopes are all 0 predicts one value: no ranking (ρ undefined, AUC 0.5)
    rho = float(spearmanr(pred, true).statistic) if np.ptp(pred) > 0 else None
    return {"spearman": rho, "auc_worst10": auc,
            "coverage90": None if upper is None else float(np.mean(true <= upper)),
            "mean_pred": float(np.mean(pred)), "mean_true": float(np.mean(true))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fast", action="store_true", help="a small smoke run")
    p.add_argument("--exact", action="store_true", help="also exact joint rows (slow)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path")
    p.add_argument("--featurizers", nargs="+", default=None,
                   help="subset of: energy joint_probes4 joint_exact (with --exact)")
    p.add_argument("--plot", action="store_true",
                   help="also a PNG of the default's predictions (needs 'energy')")
    args = p.parse_args(argv)

    import torch
    from ase.io import read

    from skntk.finetune import MLIPRegressor, predict_energies_forces
    from skntk.io import get_labels
    from skntk.models import load
    from skntk.selection._posterior import FeaturePosterior
    from skntk.uncertainty import ForceUncertainty, conformal_quantile

    if args.threads:
        torch.set_num_threads(args.threads)
    size = FAST if args.fast else FULL
    rng = np.random.default_rng(args.seed)
    train_file = read(DATA / "acac_train_300K.xyz", ":")
    idx = rng.permutation(len(train_file))
    train = [train_file[i] for i in idx[:size["n_train"]]]
    cal = [train_file[i] for i in idx[size["n_train"]:size["n_train"] + size["n_calibration"]]]
    tests = {}
    for temp in ("300K", "600K"):
        frames = read(DATA / f"acac_test_MD_{temp}.xyz", ":")
        pick = rng.choice(len(frames), size["n_test"] // 2, replace=False)
        tests[temp] = [frames[i] for i in np.sort(pick)]
    test = tests["300K"] + tests["600K"]
    part = {"300K": slice(0, len(tests["300K"])), "600K": slice(len(tests["300K"]), len(test)),
            "all": slice(0, len(test))}

    model = load("sevennet-0", device="cpu")
    t0 = time.perf_counter()
    reg = MLIPRegressor(model, epochs=size["epochs"], patience=2, device="cpu",
                        random_state=args.seed).fit(train)
    t_finetune = time.perf_counter() - t0

    test_v, cal_v = reg.model_.validate(test), reg.model_.validate(cal)
    t0 = time.perf_counter()
    test_e_hat, test_f_hat = predict_energies_forces(reg.model_, test_v)
    t_ef = (time.perf_counter() - t0) / len(test)
    cal_e_hat, cal_f_hat = predict_energies_forces(reg.model_, cal_v)
    _, f_true = get_labels(test)
    true = np.array([np.abs(fh - ft).mean() for fh, ft in zip(test_f_hat, f_true, strict=True)])
    true_atoms = np.concatenate([np.abs(fh - ft).mean(axis=1)
                                 for fh, ft in zip(test_f_hat, f_true, strict=True)])
    record = {"dataset": "acac: train/calibration 300 K MD, test 300 K + 600 K MD",
              "model": "sevennet-0", "seed": args.seed, "fast": args.fast, "sizes": size,
              "n_train_posterior": len(reg.train_indices_),
              "finetune_seconds": t_finetune, "best_epoch": reg.best_epoch_,
              "ef_seconds_per_structure": t_ef, "machine": platform.node(),
              "threads": torch.get_num_threads(), "sigma2": SIGMA2S, "featurizers": {}}
    rand = np.random.default_rng(args.seed + 1).random(len(test))
    record["random"] = {k: metrics(rand[s], true[s], None) for k, s in part.items()}
    train_post = [train[i] for i in reg.train_indices_]
    for name, feat in featurizers(reg.model_, args.exact, args.featurizers).items():
        t0 = time.perf_counter()
        est = ForceUncertainty.from_regressor(reg, cal, atoms=train, featurizer=feat)
        t_fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        test_blocks = est.featurizer_.transform(test_v)
        t_feat = (time.perf_counter() - t0) / len(test)
        cal_blocks = est.featurizer_.transform(cal_v)
        train_blocks = est.featurizer_.transform(train_post)
        rec = {"fit_seconds": t_fit, "featurize_seconds_per_structure": t_feat,
               "featurize_cost_vs_ef": t_feat / t_ef, "predict_cost_vs_ef": 1 + t_feat / t_ef,
               "per_atom": bool(est.per_atom_), "rows_per_structure":
               float(np.mean(np.diff(test_blocks.offsets))), "by_sigma2": {}}
        for sigma2 in SIGMA2S:
            base = copy.copy(est)
            base.sigma2 = sigma2
            base.posterior_ = FeaturePosterior(sigma2).fit(train_blocks)
            cal_inputs = base._inputs(cal_v, forces=cal_f_hat, energies=cal_e_hat,
                                      blocks=cal_blocks)
            inputs = base._inputs(test_v, forces=test_f_hat, energies=test_e_hat,
                                  blocks=test_blocks)
            maps = {}
            for inp in ("pv", "force", "pv+force"):
                e = copy.copy(base)
                e.inputs = inp
                e._calibrate(cal_inputs, cal_v)
                pred = e._predict_from(inputs)
                q = conformal_quantile(e.calibration_scores_, 0.9)
                upper = q * pred
                maps[inp] = {"coef": e.coef_.tolist(), "residual_var": e.residual_var_,
                             "q90": q, **{k: metrics(pred[s], true[s], upper[s])
                                          for k, s in part.items()}}
                if (name, sigma2, inp) == ("energy", 1e-2, "pv+force"):  # the default
                    record["arrays"] = {"pred": pred.tolist(), "upper": upper.tolist(),
                                        "true": true.tolist(),
                                        "temperature": ["300K"] * len(tests["300K"])
                                        + ["600K"] * len(tests["600K"])}
                if e.per_atom_:  # per atom: all atoms of the test frames pooled
                    pa = np.concatenate(e._predict_atoms_from(inputs))
                    maps[inp]["per_atom_all"] = metrics(pa, true_atoms, None)
            rec["by_sigma2"][str(sigma2)] = maps
            print(name, sigma2, json.dumps({k: [v[p]["spearman"] for p in part]
                                            for k, v in maps.items()}), flush=True)
        record["featurizers"][name] = rec
    out = Path(args.out) if args.out else RESULTS / (
        f"acac_sevennet_seed{args.seed}{'_fast' if args.fast else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print("wrote", out)
    if args.plot and "arrays" in record:
        plot(record, out.with_suffix(".png"))
        print("wrote", out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

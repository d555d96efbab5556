"""Pretrained backends: effective rank of NTK features and featurisation cost (CPU).

Two parts, both on real frames from ``../shared/data`` (OC20 adsorbate+slab relaxations, RPBE;
3BPA molecular dynamics, ωB97X):

``rank``
    Energy-gradient features ``g_E = ∂E/∂θ_S`` of each frame for the parameter subsets
    ``readout``, ``last_block`` and ``all`` of each backend (one backward per frame gives all
    three; ``all`` is CountSketched to 16,384 columns, which preserves the spectrum of a
    ~300-row matrix). Reports singular-value summaries: the effective rank
    ``exp(H(σ/Σσ))`` (Roy & Vetterli 2007), the number of singular values above 1e-3 σ_max,
    and how many components hold 99 % of Σσ².

``cost``
    Featurisation time per structure with :class:`skntk.transformers.ForceNTKTransformer`
    (energy rows, exact force rows, probe force rows, joint = energy + probes), as ratios to one
    energy+forces evaluation of the same backend on the same structure, measured in the same
    run. Also the exact force rows by a plain loop of vector-Jacobian products (no vmap), to
    compare with the library's batched route.

Usage::

    .venv/bin/python benchmarks/bench_backends.py            # full: ~300 frames, a few structures
    .venv/bin/python benchmarks/bench_backends.py --quick    # minutes
    .venv/bin/python benchmarks/bench_backends.py --part rank --backends sevennet-0

Writes ``benchmarks/results/bench_backends.json`` and ``bench_backends.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _data import SHARED_DATA as DATA
from ase.io import read

HERE = Path(__file__).resolve().parent
OC20 = DATA / "oc20" / "oc20_s2ef_relax_24sys.extxyz"
BPA = DATA / "molecules" / "3bpa_train_300K.xyz"
RESULTS = HERE / "results"
SKETCH_DIM = 16384
MAX_VMAP_ROWS = 150

logger = logging.getLogger("bench_backends")


def load_frames(n_oc20: int, n_bpa: int, seed: int = 0):
    """Evenly spaced OC20 frames over all systems and evenly spaced 3BPA frames."""
    oc20 = read(OC20, ":")
    bpa = read(BPA, ":")
    idx_o = np.linspace(0, len(oc20) - 1, n_oc20).round().astype(int)
    idx_b = np.linspace(0, len(bpa) - 1, n_bpa).round().astype(int)
    return [oc20[i] for i in idx_o], [bpa[i] for i in idx_b]


def _summary(s: np.ndarray) -> dict:
    s = s[s > 0]
    p = s / s.sum()
    var = np.cumsum(s**2) / np.sum(s**2)
    return {
        "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
        "rank_1e-3": int(np.sum(s > 1e-3 * s[0])),
        "n_99pct_energy": int(np.searchsorted(var, 0.99) + 1),
        "spectrum": (s / s[0]).tolist(),
    }


def spectrum_summary(G: np.ndarray) -> dict:
    """Singular-value summaries of the raw rows (the kernel skntk uses) and of the rows minus
    their mean (what distinguishes frames: the raw spectrum is dominated by the mean row)."""
    G = G.astype(np.float64)
    raw = _summary(np.linalg.svd(G, compute_uv=False))
    centred = _summary(np.linalg.svd(G - G.mean(0), compute_uv=False))
    return {"n_rows": int(G.shape[0]), "n_cols": int(G.shape[1]), **raw,
            "centred": centred}


def energy_gradient_features(model, frames, subsets: dict, seed: int = 0):
    """Per-frame ∂(E/N)/∂θ (the transformer's default ``normalize="atoms"``) for each subset:
    dict subset -> ndarray (n_frames, P or SKETCH_DIM)."""
    named = model.parameters("all")
    names = [n for n, _ in named]
    params = [p for _, p in named]
    sizes = [p.numel() for p in params]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    cols = {}
    for key, subset in subsets.items():
        chosen = {n for n, _ in model.parameters(subset)}
        cols[key] = np.concatenate([np.arange(offsets[i], offsets[i + 1])
                                    for i, n in enumerate(names) if n in chosen])
    rng = np.random.default_rng(seed)
    bucket = torch.as_tensor(rng.integers(0, SKETCH_DIM, offsets[-1]))
    sign = torch.as_tensor(rng.choice([-1.0, 1.0], offsets[-1]), dtype=torch.float32)
    out = {key: [] for key in subsets}
    out["all"] = []
    for at in frames:
        energy = model.energy(model.collate([at], "cpu"))
        grads = torch.autograd.grad(energy.sum() / len(at), params, allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                          for g, p in zip(grads, params, strict=True)]).float()
        for key in subsets:
            out[key].append(flat[cols[key]].numpy())
        sk = torch.zeros(SKETCH_DIM).index_add_(0, bucket, flat * sign)
        out["all"].append(sk.numpy())
    return {k: np.stack(v) for k, v in out.items()}


def run_rank(backends, frames_o, frames_b):
    results = {}
    for name in backends:
        from skntk.models import load

        model = load(name, device="cpu")
        res = {"n_params": {s: int(sum(p.numel() for _, p in model.parameters(s)))
                            for s in ("readout", "last_block", "all")}}
        for label, frames in (("oc20", frames_o), ("3bpa", frames_b)):
            t0 = time.perf_counter()
            feats = energy_gradient_features(
                model, frames, {"readout": "readout", "last_block": "last_block"})
            res[f"seconds_{label}"] = time.perf_counter() - t0
            res[label] = {k: spectrum_summary(v) for k, v in feats.items()}
            res[label]["_features"] = feats
            ranks = {k: (round(v["effective_rank"], 1), round(v["centred"]["effective_rank"], 1))
                     for k, v in res[label].items() if k != "_features"}
            logger.info("%s %s (raw, centred effective rank): %s", name, label, ranks)
        both = {k: np.concatenate([res["oc20"]["_features"][k], res["3bpa"]["_features"][k]])
                for k in res["oc20"]["_features"]}
        res["both"] = {k: spectrum_summary(v) for k, v in both.items()}
        for label in ("oc20", "3bpa"):
            del res[label]["_features"]
        results[name] = res
    return results


def _timeit(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def loop_force_rows(model, at, subset):
    """Exact force rows by a plain loop of 3N vector-Jacobian products (reference route)."""
    params = [p for _, p in model.parameters(subset)]
    batch = model.collate([at], "cpu")
    _, forces = model.energy_and_forces(batch, create_graph=True)
    flat = forces.reshape(-1)
    rows = []
    for k in range(flat.numel()):
        g = torch.autograd.grad(flat[k], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1)
                               for x, p in zip(g, params, strict=True)]))
    return torch.stack(rows)


METHODS = ("energy", "force_probes", "joint_probes", "force_exact", "force_exact_loop")


def cost_row(model, subset, label, at, reps, n_probes, n_features, methods=METHODS):
    """Times of one structure's features, and their ratios to one E+F evaluation timed just
    before and just after each featurisation (the machine is shared and noisy)."""
    from skntk.transformers import ForceNTKTransformer

    batch = model.collate([at], "cpu")

    def ef():
        return model.energy_and_forces(batch)

    row = {"structure": label, "n_atoms": len(at), "t_EF_s": _timeit(ef, reps)}

    def record(key, fn, n):
        before = _timeit(ef, reps)
        t = _timeit(fn, n)
        after = _timeit(ef, reps)
        row[f"t_{key}_s"] = t
        row[f"ratio_{key}"] = t / (0.5 * (before + after))

    for key, kind, route in (("energy", "energy", "auto"),
                             ("force_probes", "force", "probes"),
                             ("joint_probes", "joint", "probes"),
                             ("force_exact", "force", "exact")):
        if key not in methods:
            continue
        if key == "force_exact" and 3 * len(at) > MAX_VMAP_ROWS:
            # the library's batched (vmap) exact route took ~20 GB for a 68-atom OC20 frame
            row["skipped_force_exact"] = f"3N={3 * len(at)} > {MAX_VMAP_ROWS}: vmap memory"
            continue
        tr = ForceNTKTransformer(model, kind=kind, parameters=subset, n_features=n_features,
                                 force_rows=route, n_probes=n_probes, device="cpu",
                                 random_state=0).fit([at])
        record(key, lambda tr=tr: tr.transform([at]), 1 if key == "force_exact" else reps)
    if "force_exact_loop" in methods:
        record("force_exact_loop", lambda: loop_force_rows(model, at, subset), 1)
    return row


def run_cost(backends, structures, subsets, reps, n_probes=8, n_features=512, methods=METHODS,
             results=None):
    from skntk.models import load

    results = {} if results is None else results
    for name in backends:
        model = load(name, device="cpu")
        res = results.setdefault(name, {})
        for subset in subsets:
            rows = []
            for label, at in structures:
                row = cost_row(model, subset, label, at, reps, n_probes, n_features, methods)
                logger.info("%s %s %s: %s", name, subset, label,
                            {k: round(v, 2) for k, v in row.items() if k.startswith("ratio")})
                rows.append(row)
            res[subset] = rows
        results[name] = res
    return results


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rank = results.get("rank", {})
    cost = results.get("cost", {})
    n_panels = len(rank) + (1 if cost else 0)
    if n_panels == 0:
        return
    fig, axes = plt.subplots(1, n_panels, figsize=(5 * n_panels, 4), squeeze=False)
    axes = axes[0]
    for ax, (name, res) in zip(axes, rank.items(), strict=False):
        for subset, style in (("readout", "-"), ("last_block", "--"), ("all", ":")):
            c = res["both"][subset]["centred"]
            ax.semilogy(np.arange(1, len(c["spectrum"]) + 1), c["spectrum"], style,
                        label=f"{subset} (centred erank {c['effective_rank']:.0f})")
        ax.set_title(f"{name}: ∂(E/N)/∂θ, OC20+3BPA, centred")
        ax.set_xlabel("index")
        ax.set_ylabel("σ_k / σ_1")
        ax.set_ylim(1e-7, 1.5)
        ax.legend(fontsize=8)
    if cost:
        ax = axes[-1]
        keys = ["energy", "force_probes", "joint_probes", "force_exact", "force_exact_loop"]
        labels, width = [], 0.8 / max(1, sum(len(r) for b in cost.values() for r in b.values()))
        k = 0
        for name, by_subset in cost.items():
            for subset, rows in by_subset.items():
                for row in rows:
                    vals = [row.get(f"ratio_{key}", np.nan) for key in keys]
                    ax.bar(np.arange(len(keys)) + k * width, vals, width,
                           label=f"{name} {subset} {row['structure']} (N={row['n_atoms']})")
                    k += 1
                    labels.append(row["structure"])
        ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2)
        ax.set_xticklabels(keys, rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("time / one E+F evaluation")
        ax.set_title("featurisation cost per structure (CPU)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few frames, one repetition")
    parser.add_argument("--part", choices=["rank", "cost", "all"], default="all")
    parser.add_argument("--backends", nargs="+", default=["sevennet-0", "chgnet-0.3.0"])
    parser.add_argument("--subsets", nargs="+", default=None,
                        help="cost part: parameter subsets (default: readout, last_block)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="cost part: featurisations to time")
    parser.add_argument("--out", default=str(RESULTS / "bench_backends.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning)
    n_o, n_b = (24, 24) if args.quick else (150, 150)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["meta"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "machine": platform.machine(), "processor": platform.processor(),
                       "device": "cpu"}
    results.setdefault("runs", []).append({"part": args.part, "quick": args.quick,
                                           "backends": args.backends, "subsets": args.subsets,
                                           "methods": args.methods})
    frames_o, frames_b = load_frames(n_o, n_b)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.part in ("rank", "all"):
        results["rank"] = run_rank(args.backends, frames_o, frames_b)
        results["rank_meta"] = {"n_oc20": n_o, "n_3bpa": n_b, "sketch_dim_all": SKETCH_DIM}
        out.write_text(json.dumps(results, indent=1))
    if args.part in ("cost", "all"):
        by_size = sorted(frames_o, key=len)
        structures = [("3bpa", frames_b[0]), ("oc20-smallest", by_size[0])]
        if not args.quick:
            structures.append(("oc20-median", by_size[len(by_size) // 2]))
        subsets = args.subsets or (["readout"] if args.quick else ["readout", "last_block"])
        results["cost"] = run_cost(args.backends, structures, subsets,
                                   reps=1 if args.quick else 3, methods=args.methods,
                                   results=results.get("cost"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))
    logger.info("wrote %s", out)


if __name__ == "__main__":
    main()

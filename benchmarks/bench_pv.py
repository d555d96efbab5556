"""Benchmark of chunked feature-space posterior-variance (PV) screening.

Measures, in one run (ratios are only quoted within a run; the machine may be shared):

1. dense float64 matmul FLOP/s of this machine (square gemm, best of 3);
2. PV screening time and peak memory (tracemalloc: numpy temporaries, the input pool excluded) vs
   pool size, single rows at d = 256 and 512 and force-like blocks of 60 rows per structure, with
   the scaling exponent fitted by least squares on log(time) vs log(n_pool);
3. PV kernel throughput (2 n_rows d² flop per screen) as a fraction of the measured matmul FLOP/s;
4. a naive kernel-space implementation (materialised K_TT, K_TP, Cholesky of K_TT + σ² I) at
   n_train = 5000 against the feature-space selector (fit + screen) on the same pool: time and
   peak-memory ratios, and the largest relative difference of the scores.

Writes ``benchmarks/results/bench_pv.json`` and ``bench_pv.png``.

Usage::

    python benchmarks/bench_pv.py            # full run (sizes in FULL below)
    python benchmarks/bench_pv.py --quick    # a minute-scale smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy import linalg as sla

from skntk.selection.pv import ChunkedPosteriorVarianceSelector

logger = logging.getLogger("bench_pv")

FULL = {
    "single_sizes": [10_000, 30_000, 100_000, 300_000, 1_000_000],
    "single_dims": [256, 512],
    "block_sizes": [1_000, 3_000, 10_000, 30_000],  # x 60 rows: up to 1.8e6 rows
    "block_rows": 60,
    "block_dim": 256,
    "naive_train": 5_000,
    "naive_pools": [5_000, 10_000, 20_000, 50_000],
    "naive_dim": 256,
    "n_train": 2_000,
}
QUICK = {
    "single_sizes": [2_000, 6_000, 20_000, 60_000],
    "single_dims": [256, 512],
    "block_sizes": [100, 300, 1_000],
    "block_rows": 60,
    "block_dim": 256,
    "naive_train": 1_000,
    "naive_pools": [1_000, 3_000, 10_000],
    "naive_dim": 256,
    "n_train": 500,
}
SIGMA2 = 1e-3
WORKING_MEMORY = 256  # MiB


def measure_matmul_flops(n=2048, repeats=3):
    """Best-of-``repeats`` FLOP/s of a square float64 matrix product of size ``n``."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    a @ b  # warm-up
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def random_pool(rng, n_rows, d, dtype=np.float32, chunk=200_000):
    out = np.empty((n_rows, d), dtype=dtype)
    for lo in range(0, n_rows, chunk):
        out[lo:lo + chunk] = rng.standard_normal((min(chunk, n_rows - lo), d), dtype=np.float32)
    return out


def traced(func, *, min_total=2.0, max_repeats=3):
    """Run ``func()``; return (result, best seconds, peak traced MiB of allocations made inside).

    Memory is traced on the first run; the run is repeated (up to ``max_repeats`` times, while the
    total stays under ``min_total`` seconds) and the best time is kept: the machine is shared.
    """
    tracemalloc.start()
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    try:
        out = func()
        best = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = best
    for _ in range(max_repeats - 1):
        if total > min_total:
            break
        t0 = time.perf_counter()
        func()
        dt = time.perf_counter() - t0
        best, total = min(best, dt), total + dt
    return out, best, peak / 2**20


def fit_exponent(ns, ts):
    slope, _ = np.polyfit(np.log(ns), np.log(ts), 1)
    return float(slope)


def bench_screen(cfg, matmul_flops, rng):
    from skntk.blocks import FeatureBlocks

    results = []
    cases = [("single", d, 1, cfg["single_sizes"]) for d in cfg["single_dims"]]
    cases.append(("blocks", cfg["block_dim"], cfg["block_rows"], cfg["block_sizes"]))
    for name, d, m, sizes in cases:
        train = random_pool(rng, cfg["n_train"] * m, d)
        sel = ChunkedPosteriorVarianceSelector(SIGMA2, working_memory=WORKING_MEMORY)
        train_X = train if m == 1 else FeatureBlocks(train, np.arange(cfg["n_train"] + 1) * m)
        sel.fit(train_X)
        rows = []
        for n in sizes:
            pool = random_pool(rng, n * m, d)
            X = pool if m == 1 else FeatureBlocks(pool, np.arange(n + 1) * m, kind="force")
            ref_before = measure_matmul_flops(1024)
            scores, dt, peak = traced(lambda X=X, sel=sel: sel.score_samples(X))
            ref = max(ref_before, measure_matmul_flops(1024))  # bracket: the machine is shared
            assert scores.shape == (n,) and np.all(scores >= 0)
            flops = 2.0 * n * m * d * d
            rows.append({"n_pool": n, "n_rows": n * m, "seconds": dt, "peak_mib": peak,
                         "input_mib": pool.nbytes / 2**20, "gflops": flops / dt / 1e9,
                         "matmul_gflops_bracket": ref / 1e9,
                         "fraction_of_matmul": flops / dt / ref})
            logger.info("%s d=%d n=%d: %.2fs, peak %.0f MiB, %.1f GFLOP/s (%.0f%% of matmul "
                        "%.1f GFLOP/s)", name, d, n, dt, peak, flops / dt / 1e9,
                        100 * flops / dt / ref, ref / 1e9)
            del pool, X
        exponent = fit_exponent([r["n_pool"] for r in rows], [r["seconds"] for r in rows])
        results.append({"case": name, "d": d, "rows_per_structure": m, "n_train": cfg["n_train"],
                        "runs": rows, "scaling_exponent": exponent})
        logger.info("%s d=%d: scaling exponent %.3f", name, d, exponent)
    return results


def naive_kernel_pv(T, P, sigma2):
    """Kernel-space PV: K_pp - K_pT (K_TT + s2 I)^-1 K_Tp with materialised kernels (normalised)."""
    T = np.asarray(T, dtype=np.float64)
    P = np.asarray(P, dtype=np.float64)
    c2 = 1.0 / np.mean(np.einsum("ij,ij->i", T, T))
    K_TT = c2 * (T @ T.T)
    K_TT[np.diag_indices_from(K_TT)] += sigma2
    K_TP = c2 * (T @ P.T)
    L = sla.cholesky(K_TT, lower=True, overwrite_a=True, check_finite=False)
    V = sla.solve_triangular(L, K_TP, lower=True, overwrite_b=True, check_finite=False)
    return c2 * np.einsum("ij,ij->i", P, P) - np.einsum("ij,ij->j", V, V)


def bench_naive(cfg, rng):
    d, n_train = cfg["naive_dim"], cfg["naive_train"]
    T = random_pool(rng, n_train, d)
    rows = []
    for n in cfg["naive_pools"]:
        P = random_pool(rng, n, d)

        def feature_space(P=P):
            sel = ChunkedPosteriorVarianceSelector(SIGMA2, working_memory=WORKING_MEMORY).fit(T)
            return sel.score_samples(P)

        pv_f, t_f, m_f = traced(feature_space)
        pv_k, t_k, m_k = traced(lambda P=P: naive_kernel_pv(T, P, SIGMA2), max_repeats=1)
        rel = float(np.max(np.abs(pv_f - pv_k) / np.abs(pv_k)))
        rows.append({"n_pool": n, "feature_seconds": t_f, "feature_peak_mib": m_f,
                     "kernel_seconds": t_k, "kernel_peak_mib": m_k, "time_ratio": t_k / t_f,
                     "memory_ratio": m_k / m_f, "max_rel_diff": rel})
        logger.info("naive n_train=%d n_pool=%d: feature %.2fs %.0f MiB, kernel %.2fs %.0f MiB "
                    "(%.1fx time, %.1fx memory, max rel diff %.1e)", n_train, n, t_f, m_f, t_k,
                    m_k, t_k / t_f, m_k / m_f, rel)
    return {"n_train": n_train, "d": d, "runs": rows}


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for case in result["screen"]:
        label = (f"d={case['d']}, single rows" if case["rows_per_structure"] == 1
                 else f"d={case['d']}, {case['rows_per_structure']} rows/structure")
        label += f" (slope {case['scaling_exponent']:.2f})"
        n = [r["n_pool"] for r in case["runs"]]
        axes[0].loglog(n, [r["seconds"] for r in case["runs"]], "o-", label=label)
        axes[1].semilogx(n, [r["peak_mib"] for r in case["runs"]], "o-", label=label)
    axes[0].set(xlabel="pool size (structures)", ylabel="PV screening time (s)",
                title="Screening time (fitted log-log slope)")
    axes[1].set(xlabel="pool size (structures)", ylabel="peak temporaries (MiB)",
                title=f"Peak memory, working_memory={WORKING_MEMORY} MiB", ylim=(0, None))
    naive = result["naive"]
    n = [r["n_pool"] for r in naive["runs"]]
    for key, style, label in [("feature_seconds", "o-", "feature space: time (s)"),
                              ("kernel_seconds", "s--", "kernel space: time (s)"),
                              ("feature_peak_mib", "o-", "feature space: peak MiB"),
                              ("kernel_peak_mib", "s--", "kernel space: peak MiB")]:
        axes[2].loglog(n, [r[key] for r in naive["runs"]], style, label=label)
    axes[2].set(xlabel="pool size (structures)",
                title=f"vs kernel space, n_train={naive['n_train']}, d={naive['d']}")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"skntk PV screening; dense matmul {result['matmul_gflops']:.1f} GFLOP/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = QUICK if args.quick else FULL
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    flops = measure_matmul_flops()
    logger.info("dense float64 matmul: %.1f GFLOP/s", flops / 1e9)
    result = {"config": cfg, "quick": args.quick, "sigma2": SIGMA2,
              "working_memory_mib": WORKING_MEMORY, "matmul_gflops": flops / 1e9,
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "numpy": np.__version__}}
    result["screen"] = bench_screen(cfg, flops, rng)
    result["naive"] = bench_naive(cfg, rng)
    result["matmul_gflops_end"] = measure_matmul_flops() / 1e9
    result["total_seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_pv.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "bench_pv.png")
    logger.info("wrote %s (%.0f s)", out / "bench_pv.json", result["total_seconds"])


if __name__ == "__main__":
    main()

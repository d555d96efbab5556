"""Benchmark of screening at scale: the streamed selection path, shards, workers, bmdal_reg.

Sections (each writes ``benchmarks/results/bench_screen_<section>.json``; ``plot`` draws
``bench_screen.png`` from whichever exist). Timings are wall clock on whatever machine runs it:
quote ratios within one run only.

``selection``
    Identical float32 features (pool n x 256, 2k labelled, batch 100), one process, warm, best
    of two: skntk PV top-100 vs bmdal_reg's MaxDiag on posterior features; skntk LCMD with the
    train centres vs bmdal_reg's LCMD, and the floor of LCMD's first step, one float32 GEMM of
    the pool against the 2k centres, measured in the same process. Agreement: float32 vs
    float64 picks, top-M overlap, skntk vs bmdal picks.
``shards``
    The selection stage alone (PV top-2000 → LCMD 100) from feature shards, n up to 10⁶, each
    size in a fresh process: wall time and peak RSS; the same from an in-memory array.
``end2end``
    Featurise (built-in model, energy NTK, 256 features) and select on a pool of 3BPA-sized
    molecules (MD frames of 3BPA with small random displacements, so no two are equal) streamed
    from a generator into a fresh cache, each size in a fresh process: time per stage and peak
    RSS; plus the per-frame featurisation time of OC20 frames.
``cluster``
    The same featurisation serially and on a ``dask.distributed.LocalCluster`` of 2 worker
    processes: speed-up, feature difference, identical picks.

Usage::

    python benchmarks/bench_screen.py selection [--n 200000]
    python benchmarks/bench_screen.py shards [--sizes 10000,100000,1000000]
    python benchmarks/bench_screen.py end2end [--sizes 10000,30000,100000,200000]
    python benchmarks/bench_screen.py cluster [--n 4000]
    python benchmarks/bench_screen.py plot
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _data import SHARED_DATA as DATA

RESULTS = Path(__file__).resolve().parent / "results"
SIGMA2 = 1e-3
D = 256


def _machine():
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def _write(name, payload):
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench_screen_{name}.json"
    payload = {"machine": _machine(), **payload}
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _best_of(f, repeats=2):
    """``(best seconds, last result)`` of ``repeats`` calls after one warm-up call."""
    out = f()
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t0)
    return best, out


def synthetic_features(n, d, seed, dtype=np.float32):
    """Low-rank-plus-noise features with a spread of norms (a pool is not isotropic)."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((32, d)) / np.sqrt(32)
    out = np.empty((n, d), dtype=dtype)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        z = rng.standard_normal((hi - lo, 32)) @ basis + 0.3 * rng.standard_normal((hi - lo, d))
        out[lo:hi] = z * rng.lognormal(0, 0.3, size=(hi - lo, 1))
    return out


# -- selection: skntk vs bmdal_reg on identical features ----------------------------------------
def _bmdal():
    np.inf = np.inf  # bmdal_reg 3.0.2 uses the alias numpy 2 removed
    from bmdal_reg.bmdal.feature_data import TensorFeatureData
    from bmdal_reg.bmdal.feature_maps import IdentityFeatureMap
    from bmdal_reg.bmdal.features import Features
    from bmdal_reg.bmdal.selection import (
        LargestClusterMaxDistSelectionMethod,
        MaxDiagSelectionMethod,
    )

    def feats(x):
        import torch

        return Features(IdentityFeatureMap(n_features=x.shape[1]),
                        TensorFeatureData(torch.from_numpy(x)))

    return feats, MaxDiagSelectionMethod, LargestClusterMaxDistSelectionMethod


def section_selection(args):
    import torch

    from skntk.selection.lcmd import LCMDSelector
    from skntk.selection.pv import ChunkedPosteriorVarianceSelector

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count()))
    n, n_train, B, M = args.n, 2000, 100, 2000
    P = synthetic_features(n, D, 0)
    T = synthetic_features(n_train, D, 1)
    out = {"n_pool": n, "n_train": n_train, "d": D, "batch": B, "shortlist": M,
           "sigma2": SIGMA2, "dtype": "float32"}

    pv = ChunkedPosteriorVarianceSelector(SIGMA2, working_memory=256).fit(T)
    out["skntk_pv_top100_s"], top32 = _best_of(lambda: pv.select(P, B))
    P64 = P.astype(np.float64)
    out["skntk_pv_top100_float64_input_s"], top64 = _best_of(lambda: pv.select(P64, B), 1)  # noqa: F821
    out["pv_top100_float32_equals_float64"] = top32.tolist() == top64.tolist()
    pvM = ChunkedPosteriorVarianceSelector(SIGMA2, shortlist_size=M, working_memory=256).fit(T)
    s32, s64 = pvM.shortlist(P).copy(), pvM.shortlist(P64).copy()
    out["pv_topM_overlap_float32_vs_float64"] = len(set(s32) & set(s64)) / M
    del P64

    lcmd = LCMDSelector(B, working_memory=1024).fit(T)
    out["skntk_lcmd_s"], lc32 = _best_of(lambda: lcmd.select(P))
    t32 = torch.from_numpy(P)
    c32 = torch.from_numpy(T)
    out["gemm_pool_x_centres_float32_s"], _ = _best_of(lambda: t32 @ c32.T)
    out["lcmd_over_gemm_floor"] = out["skntk_lcmd_s"] / out["gemm_pool_x_centres_float32_s"]
    if args.lcmd_float64:
        lc64 = LCMDSelector(B, working_memory=1024).fit(T.astype(np.float64)).select(
            P.astype(np.float64))
        out["lcmd_float32_equals_float64"] = lc32.tolist() == lc64.tolist()

    try:
        feats, MaxDiag, LCMD = _bmdal()
    except ImportError as err:
        out["bmdal_reg"] = f"not installed ({err})"
    else:
        import bmdal_reg

        out["bmdal_reg_version"] = getattr(bmdal_reg, "__version__", "3.0.2 (pip)")

        def bmdal_pv():
            tr, po = feats(T), feats(P)
            scale = tr.scale_tfm()  # mean train kernel diagonal 1, as skntk's normalize=True
            tr, po = scale(tr), scale(po)
            post = tr.posterior_tfm(sigma=float(np.sqrt(SIGMA2)),
                                    allow_kernel_space_posterior=False)
            return MaxDiag(post(po)).select(B).numpy()

        out["bmdal_maxdiag_posterior_s"], bm_top = _best_of(bmdal_pv)
        out["pv_top100_overlap_skntk_vs_bmdal"] = len(set(bm_top) & set(top32)) / B

        def bmdal_lcmd():
            return LCMD(feats(P), feats(T), sel_with_train=True, verbosity=0).select(B).numpy()

        t0 = time.perf_counter()
        bm_lc = bmdal_lcmd()  # one run: it takes long
        out["bmdal_lcmd_s"] = time.perf_counter() - t0
        out["bmdal_lcmd_runs"] = 1
        out["lcmd_picks_equal_skntk_vs_bmdal"] = bm_lc.tolist() == lc32.tolist()
        out["lcmd_overlap_skntk_vs_bmdal"] = len(set(bm_lc) & set(lc32)) / B
        out["pv_speedup_vs_bmdal"] = out["bmdal_maxdiag_posterior_s"] / out["skntk_pv_top100_s"]
        out["lcmd_speedup_vs_bmdal"] = out["bmdal_lcmd_s"] / out["skntk_lcmd_s"]
    out["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(out, indent=1))
    _write("selection", out)


# -- shards: the selection stage from feature shards --------------------------------------------
def _write_shards(directory, n, d, seed, shard_size=4096):
    """A feature cache holding ``n`` synthetic float32 rows (structure keys: their index)."""
    import hashlib

    from skntk.blocks import FeatureBlocks
    from skntk.cache import _Store

    store = _Store(Path(directory), "0" * 64)
    store.open({"benchmark": "synthetic"})
    keys = []
    for lo in range(0, n, shard_size):
        hi = min(n, lo + shard_size)
        rows = synthetic_features(hi - lo, d, seed + lo)
        k = [hashlib.sha256(str(i).encode()).digest() for i in range(lo, hi)]
        store.write(k, FeatureBlocks.from_array(rows))
        keys += k
    store.save_index()
    return keys


def _shards_child(n, mode, directory):
    """One size in this (fresh) process: time and peak RSS of the selection stage."""
    from skntk.cache import PoolFeatures, _Store
    from skntk.pipeline import make_pv_lcmd_pipeline

    T = synthetic_features(2000, D, 1)
    pipe = make_pv_lcmd_pipeline(n_to_select=100, shortlist_size=2000, sigma2=SIGMA2,
                                 working_memory=64).fit(T)
    if mode == "shards":
        import hashlib

        store = _Store(Path(directory), "0" * 64)
        store.open({"benchmark": "synthetic"})
        keys = [hashlib.sha256(str(i).encode()).digest() for i in range(n)]
        X = PoolFeatures(store, keys, np.arange(n), np.arange(n), kind="plain", n_features=D,
                         dtype=np.float32)
    else:
        X = np.concatenate([synthetic_features(min(4096, n - lo), D, 2 + lo)
                            for lo in range(0, n, 4096)])
    base = _peak_rss_mb()
    t0 = time.perf_counter()
    idx = pipe.select(X)
    wall = time.perf_counter() - t0
    print(json.dumps({"n": n, "mode": mode, "select_s": wall, "peak_rss_mb": _peak_rss_mb(),
                      "rss_before_select_mb": base, "timings": pipe.timings_,
                      "picks": idx[:5].tolist()}))


def section_shards(args):
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for n in sizes:
            directory = Path(tmp) / f"n{n}"
            t0 = time.perf_counter()
            _write_shards(directory, n, D, seed=2)
            write_s = time.perf_counter() - t0
            for mode in ("shards", "array"):
                if mode == "array" and n > args.max_array:
                    continue
                res = subprocess.run([sys.executable, __file__, "_shards_child", str(n), mode,
                                      str(directory)], capture_output=True, text=True, check=True)
                row = json.loads(res.stdout.strip().splitlines()[-1])
                row["write_shards_s"] = write_s
                print(row)
                rows.append(row)
    _write("shards", {"n_train": 2000, "d": D, "shortlist": 2000, "batch": 100,
                      "working_memory_mib": 64, "rows": rows})


# -- end to end: featurise + select --------------------------------------------------------------
def displaced_frames(n, seed=0, amplitude=0.01):
    """``n`` 3BPA MD frames, each with its own small random displacement (Å): all distinct."""
    import ase.io

    base = ase.io.read(DATA / "molecules" / "3bpa_train_300K.xyz", ":")
    rng = np.random.default_rng(seed)
    for k in range(n):
        a = base[k % len(base)].copy()
        a.positions += amplitude * rng.standard_normal(a.positions.shape)
        a.calc = None
        yield a


def _builtin_ntk(train):
    from skntk.models.builtin import BuiltinMLIP
    from skntk.transformers import ForceNTKTransformer

    model = BuiltinMLIP([1, 6, 7, 8], random_state=0)
    return ForceNTKTransformer(model, kind="energy", n_features=D, random_state=0,
                               device="cpu").fit(train)


def _end2end_child(n, n_jobs, directory):
    from skntk.pipeline import make_pv_lcmd_pipeline

    train = list(displaced_frames(200, seed=1))
    ntk = _builtin_ntk(train)
    pipe = make_pv_lcmd_pipeline(ntk, n_to_select=100, shortlist_size=2000, sigma2=SIGMA2,
                                 working_memory=64)
    pipe.set_params(feature_cache=directory, n_jobs=n_jobs)
    t0 = time.perf_counter()
    pipe.fit(train)
    fit_s = time.perf_counter() - t0
    base = _peak_rss_mb()
    t0 = time.perf_counter()
    idx = pipe.select(displaced_frames(n))
    wall = time.perf_counter() - t0
    print(json.dumps({"n": n, "n_jobs": n_jobs, "fit_s": fit_s, "select_s": wall,
                      "per_structure_ms": 1e3 * pipe.timings_["features"] / n,
                      "timings": pipe.timings_, "peak_rss_mb": _peak_rss_mb(),
                      "rss_before_select_mb": base, "picks": idx[:10].tolist()}))


def _oc20_per_frame(n_frames=200):
    import ase.io

    from skntk.models.builtin import BuiltinMLIP
    from skntk.transformers import ForceNTKTransformer

    frames = ase.io.read(DATA / "oc20" / "oc20_s2ef_relax_24sys.extxyz", f":{n_frames}")
    species = sorted({int(z) for a in frames for z in a.numbers})
    ntk = ForceNTKTransformer(BuiltinMLIP(species, random_state=0), kind="energy",
                              n_features=D, random_state=0, device="cpu").fit(frames[:20])
    ntk.transform(frames[:8])
    t0 = time.perf_counter()
    ntk.transform(frames)
    return 1e3 * (time.perf_counter() - t0) / len(frames), float(np.mean([len(a) for a in frames]))


def section_end2end(args):
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    previous = RESULTS / "bench_screen_end2end.json"
    if args.append and previous.exists():  # keep the sizes measured by an earlier run
        rows = [r for r in json.loads(previous.read_text())["rows"] if r["n"] not in sizes]
    for n in sizes:
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            res = subprocess.run([sys.executable, __file__, "_end2end_child", str(n),
                                  str(args.n_jobs), tmp], capture_output=True, text=True,
                                 check=True)
            row = json.loads(res.stdout.strip().splitlines()[-1])
            print(row)
            rows.append(row)
            _write("end2end", {"rows": rows, "model": "BuiltinMLIP(species=[1, 6, 7, 8]) "
                               "default size", "kind": "energy", "n_features": D})
    oc20_ms, oc20_atoms = _oc20_per_frame()
    _write("end2end", {"rows": rows, "model": "BuiltinMLIP(species=[1, 6, 7, 8]) default size",
                       "kind": "energy", "n_features": D, "oc20_ms_per_frame": oc20_ms,
                       "oc20_mean_atoms": oc20_atoms})


# -- serial vs a LocalCluster --------------------------------------------------------------------
def section_cluster(args):
    import warnings

    from dask.distributed import LocalCluster

    from skntk.parallel import featurize
    from skntk.pipeline import make_pv_lcmd_pipeline

    train = list(displaced_frames(200, seed=1))
    ntk = _builtin_ntk(train)
    pool = list(displaced_frames(args.n))
    out = {"n": args.n, "shard_size": 256}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        t0 = time.perf_counter()
        serial = featurize(ntk, pool, Path(tmp) / "serial")
        out["serial_s"] = time.perf_counter() - t0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                              dashboard_address=None) as cluster:
                t0 = time.perf_counter()
                dask = featurize(ntk, pool, Path(tmp) / "dask",
                                 scheduler_address=cluster.scheduler_address)
                out["local_cluster_2_workers_s"] = time.perf_counter() - t0
        out["speedup"] = out["serial_s"] / out["local_cluster_2_workers_s"]
        a, b = serial.take(np.arange(len(serial))), dask.take(np.arange(len(dask)))
        out["max_abs_feature_difference"] = float(np.abs(a.rows - b.rows).max())
        pipe = make_pv_lcmd_pipeline(n_to_select=100, shortlist_size=1000,
                                     sigma2=SIGMA2).fit(ntk.transform(train))
        out["identical_picks"] = pipe.select(serial).tolist() == pipe.select(dask).tolist()
    print(out)
    _write("cluster", out)


# -- plot ----------------------------------------------------------------------------------------
def section_plot(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    p = RESULTS / "bench_screen_shards.json"
    if p.exists():
        rows = json.loads(p.read_text())["rows"]
        for mode, style in (("shards", "o-"), ("array", "s--")):
            r = sorted((x for x in rows if x["mode"] == mode), key=lambda x: x["n"])
            if r:
                n = [x["n"] for x in r]
                axes[0].loglog(n, [x["select_s"] for x in r], style, label=f"{mode}: time (s)")
                axes[1].loglog(n, [x["peak_rss_mb"] for x in r], style,
                               label=f"{mode}: peak RSS (MB)")
        n = np.array(sorted({x["n"] for x in rows}))
        axes[1].loglog(n, n * D * 4 / 2**20, ":", color="0.5", label="pool rows (float32)")
        axes[0].set_title("selection stage (PV top-2000 → LCMD 100)")
        axes[1].set_title("peak memory of the selection stage")
    p = RESULTS / "bench_screen_end2end.json"
    if p.exists():
        rows = sorted(json.loads(p.read_text())["rows"], key=lambda x: x["n"])
        n = [x["n"] for x in rows]
        axes[2].loglog(n, [x["select_s"] for x in rows], "o-", label="featurise + select (s)")
        axes[2].loglog(n, [x["peak_rss_mb"] for x in rows], "s--", label="peak RSS (MB)")
        axes[2].set_title("end to end, built-in model, energy NTK (3BPA)")
    for a in axes:
        a.set_xlabel("pool structures")
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    out = RESULTS / "bench_screen.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_shards_child":
        return _shards_child(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    if len(sys.argv) > 1 and sys.argv[1] == "_end2end_child":
        return _end2end_child(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="section", required=True)
    s = sub.add_parser("selection")
    s.add_argument("--n", type=int, default=200_000)
    s.add_argument("--lcmd-float64", action="store_true",
                   help="also run LCMD on float64 copies and compare the picks")
    s = sub.add_parser("shards")
    s.add_argument("--sizes", default="10000,30000,100000,300000,1000000")
    s.add_argument("--max-array", type=int, default=400_000)
    s.add_argument("--tmp", default=None)
    s = sub.add_parser("end2end")
    s.add_argument("--sizes", default="10000,30000,100000,200000")
    s.add_argument("--n-jobs", type=int, default=1)
    s.add_argument("--tmp", default=None)
    s.add_argument("--append", action="store_true",
                   help="keep the rows of other sizes from the existing JSON")
    s = sub.add_parser("cluster")
    s.add_argument("--n", type=int, default=4000)
    s.add_argument("--tmp", default=None)
    sub.add_parser("plot")
    args = parser.parse_args()
    {"selection": section_selection, "shards": section_shards, "end2end": section_end2end,
     "cluster": section_cluster, "plot": section_plot}[args.section](args)


if __name__ == "__main__":
    main()

"""One short GPU check: CUDA paths of every installed backend and GPU timings of featurisation and
selection, against the CPU, in one process (meant for a lent GPU machine; runs anywhere).

For each backend that imports (built-in, SevenNet-0, CHGNet 0.3.0) on the bundled OC20 frames
(``skntk/data/oc20_demo.extxyz``, 17-57 atoms; no other data needed):

- **agreement**: energy rows of the default subset and joint rows with 4 probes of 4 frames on the
  device against the CPU (max relative difference of the rows; float32 models);
- **throughput** on the device: energy rows and joint rows (4 probes) of ``--frames`` frames, and
  one batched energy+forces of the same frames; structures/s, the ratio to E+F and the projected
  time for 200,000 frames of this size.

Selection on a float32 pool of ``--pool`` x 256 Gaussian features with 2,000 labelled: PV top-2000
shortlist -> LCMD 100 (``make_pv_lcmd_pipeline``) with ``device=None`` (NumPy) and on the device;
the picks must agree. LCMD alone with the 2,000 train centres over the whole pool, both ways.

    python benchmarks/gpu_check.py [--device cuda] [--frames 64] [--pool 200000] [--out DIR]

Writes ``gpu_check.json`` to ``--out`` (default ``$OUT`` when set, else benchmarks/results). On
the lent machine, ase and sevenn travel as wheels (``make gpu-wheels``; see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

BACKENDS = ("builtin", "sevennet-0", "chgnet-0.3.0")


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=2):
    """Best of ``repeats`` wall times of ``fn()`` (after one warm-up call), synchronised."""
    fn()
    best = np.inf
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def load_backend(name, species):
    if name == "builtin":
        from skntk.models.builtin import BuiltinMLIP

        return BuiltinMLIP(sorted(species), cutoff=5.0, random_state=0)
    from skntk.models import load

    return load(name, device="cpu")


def check_backend(name, X, device, n_frames):
    from skntk.models.base import module_state
    from skntk.transformers import ForceNTKTransformer

    model = load_backend(name, {int(z) for a in X for z in a.numbers})
    out = {"backend": name}
    configs = {"energy/default": dict(kind="energy"),
               "joint/probes4/default": dict(kind="joint", force_rows="probes", n_probes=4)}
    for cname, cfg in configs.items():
        rows = {}
        for dev in ("cpu", device):
            t = ForceNTKTransformer(model, n_features=256, random_state=0, device=dev,
                                    **cfg).fit(X[:4])
            rows[dev] = t.transform(X[:4]).rows
        ref = rows["cpu"]
        out[f"{cname}/max_rel_diff"] = float(np.max(np.abs(rows[device] - ref))
                                             / max(np.max(np.abs(ref)), 1e-300))
    frames = (X * (n_frames // len(X) + 1))[:n_frames]

    def ef():
        with module_state(model.module, device=device, train=False):
            for s in range(0, len(frames), 32):
                model.energy_and_forces(model.collate(frames[s:s + 32], device))

    t_ef = timed(ef, device)
    out["ef_seconds"] = t_ef
    out["n_frames"] = len(frames)
    out["mean_atoms"] = float(np.mean([len(a) for a in frames]))
    for cname, cfg in configs.items():
        t = ForceNTKTransformer(model, n_features=256, random_state=0, device=device,
                                **cfg).fit(frames[:4])
        sec = timed(lambda t=t: t.transform(frames), device)
        out[cname] = {"seconds": sec, "ratio_to_ef": sec / t_ef,
                      "structures_per_s": len(frames) / sec,
                      "projected_200k_h": 200_000 * sec / len(frames) / 3600,
                      "batching": t.batching_, "force_rows": getattr(t, "force_rows_", None)}
    if torch.device(device).type == "cuda":
        out["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def check_selection(device, n_pool, n_train=2000, d=256):
    from skntk.pipeline import make_pv_lcmd_pipeline
    from skntk.selection import LCMDSelector

    rng = np.random.default_rng(0)
    train = rng.normal(size=(n_train, d)).astype(np.float32)
    pool = (rng.normal(size=(n_pool, d)) * rng.uniform(0.5, 1.5, size=(n_pool, 1))
            ).astype(np.float32)
    out = {"n_pool": n_pool, "n_train": n_train, "n_features": d}
    picks = {}
    for dev in (None, device):
        key = "numpy" if dev is None else str(dev)
        pipe = make_pv_lcmd_pipeline(n_to_select=100, shortlist_size=min(2000, n_pool),
                                     device=dev).fit(train)
        out[f"pv_lcmd/{key}/seconds"] = timed(lambda pipe=pipe: pipe.select(pool), device, 1)
        picks[f"pv_lcmd/{key}"] = pipe.select(pool)
        lcmd = LCMDSelector(n_to_select=100, device=dev).fit(train)
        out[f"lcmd/{key}/seconds"] = timed(lambda lcmd=lcmd: lcmd.select(pool), device, 1)
        picks[f"lcmd/{key}"] = lcmd.select(pool)
    for step in ("pv_lcmd", "lcmd"):
        a, b = picks[f"{step}/numpy"], picks[f"{step}/{device}"]
        out[f"{step}/same_picks"] = bool(np.array_equal(a, b))
        out[f"{step}/overlap"] = len(set(a.tolist()) & set(b.tolist())) / len(a)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--pool", type=int, default=200_000)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent /
                                                                 "results"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import ase.io

    from skntk.io import example_path

    X = ase.io.read(example_path(), ":")[::9]
    report = {"meta": {"device": args.device, "torch": torch.__version__,
                       "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                       else None,
                       "machine": f"{platform.machine()}, {os.cpu_count()} cores"},
              "backends": [], "errors": {}}
    path = Path(args.out) / "gpu_check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in args.backends.split(","):
        try:
            report["backends"].append(check_backend(name, X, args.device, args.frames))
            print(json.dumps(report["backends"][-1]), flush=True)
        except Exception as err:  # a missing extra, a CUDA failure: recorded, the rest goes on
            report["errors"][name] = f"{type(err).__name__}: {err}"
            print(f"{name}: {traceback.format_exc()}", flush=True)
        path.write_text(json.dumps(report, indent=1))
    try:
        report["selection"] = check_selection(args.device, args.pool)
        print(json.dumps(report["selection"]), flush=True)
    except Exception as err:
        report["errors"]["selection"] = f"{type(err).__name__}: {err}"
        print(traceback.format_exc(), flush=True)
    path.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

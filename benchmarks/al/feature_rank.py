"""Effective rank of the joint NTK features the evidence runs selected on.

For each experiment config and seed, rebuilds the split and the joint-NTK featuriser exactly as
the loop does at round 1 (fitted on the initial labelled set) and reads the rows of labelled ∪
pool from the run's feature cache (computing them on a miss). Reports the effective rank
(exp of the entropy of the normalised singular values, as in ``bench_backends.py``) of all joint
rows, of the energy rows alone, and of both centred, plus the directions holding 99 % of the
squared spectrum. Writes ``benchmarks/results/al/feature_rank.json``.

    python benchmarks/al/feature_rank.py benchmarks/al/configs/acac_shift_50.toml \
        --cache /work/evidence-out/acac_shift_50/.features --seeds 0 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE.parents[0] / "results" / "al" / "feature_rank.json"


def _load(name, path):
    """The script at ``path`` as a module, with its folder on ``sys.path`` as when it runs."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


harness = _load("harness", HERE / "harness.py")


def spectrum_summary(rows: np.ndarray) -> dict:
    """``bench_backends``' spectrum summary of ``rows`` (n_rows, n_features) — effective rank and
    the 99 %-energy count — plus the top direction's share of the squared spectrum."""
    s = np.linalg.svd(np.asarray(rows, dtype=np.float64), compute_uv=False)
    out = _load("bench_backends", HERE.parent / "bench_backends.py")._summary(s)
    spec = np.asarray(out.pop("spectrum"))
    out["top_share"] = float(1.0 / np.sum(spec**2))
    return out


def rank_of(cfg, seed, cache, model):
    from skntk.al.config import build_selector
    from skntk.cache import transform_cached

    labelled, pool, _, split = harness.make_split(cfg, seed)
    pipe = build_selector("pv_lcmd", model, random_state=seed, **cfg.get("selector", {}))
    feat = pipe.steps[0][1]
    feat.fit(labelled)
    blocks = transform_cached(feat, labelled + pool, cache)
    rows, off = np.asarray(blocks.rows), np.asarray(blocks.offsets)
    energy = rows[off[:-1]]
    out = {"split": split, "seed": seed, "n_structures": len(off) - 1,
           "n_rows": int(rows.shape[0]), "n_features": int(rows.shape[1])}
    for name, r in (("joint", rows), ("energy", energy)):
        out[name] = spectrum_summary(r)
        out[name + "_centred"] = spectrum_summary(r - r.mean(axis=0))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--cache", required=True, help="the run's feature cache (.features)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    cfg = harness.load_config(args.config)
    from skntk.models import load

    model = load(cfg["model"], device=cfg.get("device", "cpu"))
    path = Path(args.out)
    res = json.loads(path.read_text()) if path.exists() else {}
    res[cfg["experiment"]] = [rank_of(cfg, s, args.cache, model) for s in args.seeds]
    path.write_text(json.dumps(res, indent=1) + "\n")
    for r in res[cfg["experiment"]]:
        print(cfg["experiment"], r["split"],
              {k: round(r[k]["effective_rank"], 1) for k in
               ("joint", "joint_centred", "energy", "energy_centred")})
    return 0


if __name__ == "__main__":
    sys.exit(main())

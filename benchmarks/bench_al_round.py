"""Time per active-learning round and per stage, per backend and dataset (CPU-sized).

One round of the paper's method (joint NTK, PV shortlist -> LCMD) inside ActiveLearningLoop with
the PoolOracle (labels revealed from the data), fine-tuning the backend's default subset from the
pretrained model. Writes benchmarks/results/bench_al_round.json.

    python benchmarks/bench_al_round.py [--backends sevennet-0 chgnet-0.3.0] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from _data import SHARED_DATA as DATA

from skntk.al import ActiveLearningLoop, PoolOracle
from skntk.al.config import build_selector
from skntk.finetune import MLIPRegressor
from skntk.io import read_structures
from skntk.models import load

OUT = Path(__file__).resolve().parent / "results" / "bench_al_round.json"


def datasets(n_lab, n_pool, n_test):
    rng = np.random.default_rng(0)
    bpa = read_structures(DATA / "molecules" / "3bpa_train_300K.xyz")
    p = rng.permutation(len(bpa))
    yield "3bpa", [bpa[i] for i in p[:n_lab]], [bpa[i] for i in p[n_lab:n_lab + n_pool]], \
        [bpa[i] for i in p[-n_test:]]
    oc = read_structures(DATA / "oc20" / "oc20_s2ef_relax_24sys.extxyz")
    sids = sorted({a.info["sid"] for a in oc})
    one = [a for a in oc if a.info["sid"] == sids[0]]  # one relaxation: all elements labelled
    q = rng.permutation(len(one))
    yield "oc20", [one[i] for i in q[:n_lab]], [one[i] for i in q[n_lab:n_lab + n_pool]], \
        [one[i] for i in q[-n_test:]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["sevennet-0", "chgnet-0.3.0"])
    ap.add_argument("--quick", action="store_true", help="smaller sets, 1 epoch")
    args = ap.parse_args()
    n_lab, n_pool, n_test, epochs = (8, 24, 8, 1) if args.quick else (20, 60, 20, 3)
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    for backend in args.backends:
        model = load(backend, device="cpu")
        for name, lab, pool, test in datasets(n_lab, n_pool, n_test):
            reg = MLIPRegressor(model, epochs=epochs, random_state=0)
            sel = build_selector("pv_lcmd", model, random_state=0, n_features=256,
                                 force_rows="probes", n_probes=4, shortlist_size=20)
            t0 = time.perf_counter()
            res = ActiveLearningLoop(sel, reg, PoolOracle(), n_rounds=1, batch_size=5,
                                     test_sets={"test": test}, random_state=0,
                                     progress_bar=False).run(lab, pool)
            total = time.perf_counter() - t0
            key = f"{backend}/{name}"
            results[key] = {
                "n_labelled": n_lab, "n_pool": n_pool, "n_test": n_test, "epochs": epochs,
                "atoms_per_structure": float(np.mean([len(a) for a in pool])),
                "total_s": total,
                "rounds": [{"round": h["round"], "n_labelled": h["n_labelled"],
                            "timings": h["timings"],
                            "force_mae": h["metrics"]["test"]["force_mae"],
                            "energy_mae": h["metrics"]["test"]["energy_mae"]}
                           for h in res.history]}
            print(key, json.dumps(results[key]["rounds"]), flush=True)
            OUT.parent.mkdir(exist_ok=True)
            OUT.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

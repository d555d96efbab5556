"""
# Selection on OC20 frames

The paper's pipeline on real OC20 frames, as a scikit-learn Pipeline:
`ForceNTKTransformer` (joint energy+force NTK of SevenNet-0) → `ChunkedPosteriorVarianceSelector`
(PV shortlist) → `LCMDSelector` (diverse batch). Train and pool are split by relaxation (`sid`):
frames of one relaxation are strongly correlated, so a random split would leak.

Run: `.venv/bin/python examples/oc20_pipeline.py [--model sevennet-0] [--pool-size 60] [-n 8]`
(`--fast`, or `SKNTK_EXAMPLES_FAST=1`: 12 pool frames, 3 picks, about 30 s on 2 cores).
By default it uses the bundled frames; `--data ../shared/data/oc20/oc20_s2ef_relax_24sys.extxyz`
screens the full shared slice.
"""

import argparse
import os
import time

import numpy as np

from skntk import ForceNTKTransformer, load, make_pv_lcmd_pipeline
from skntk.io import example_path, get_labels, read_structures, split_by

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="sevennet-0")
parser.add_argument("--data", default=str(example_path()))
parser.add_argument("--pool-size", type=int, default=None)
parser.add_argument("-n", type=int, default=None)
parser.add_argument("--fast", action="store_true", help="a small run (as SKNTK_EXAMPLES_FAST=1)")
args = parser.parse_args()
fast = args.fast or os.environ.get("SKNTK_EXAMPLES_FAST") == "1"
pool_size = args.pool_size or (12 if fast else 60)
n_pick = args.n or (3 if fast else 8)

# %%
# ## Data: labelled relaxations and a pool
#
# The first two relaxations are the labelled set; a random sample of frames of the other seven
# is the pool.

frames = read_structures(args.data)
sids = sorted({a.info["sid"] for a in frames})
train_idx, pool_idx = split_by(frames, "sid", sids[:2])
train = [frames[i] for i in train_idx]
rng = np.random.default_rng(0)
pool = [frames[i] for i in sorted(rng.choice(pool_idx, min(pool_size, len(pool_idx)),
                                             replace=False))]
print(f"{len(train)} labelled frames, {len(pool)} pool frames")

# %%
# ## Features, PV shortlist, LCMD
#
# Joint rows (one energy row and two Rademacher force probes per structure) of SevenNet-0's
# default parameter subset, sketched to 256 columns; PV keeps the top `4 n` structures and LCMD
# picks `n` of them, with the labelled structures as centres.

model = load(args.model)
pipe = make_pv_lcmd_pipeline(
    ForceNTKTransformer(model, kind="joint", n_features=256, force_rows="probes", n_probes=2,
                        random_state=0),
    n_to_select=n_pick, shortlist_size=min(4 * n_pick, len(pool)))
t = time.perf_counter()
pipe.fit(train)
picked = pipe.select(pool)
print(f"{len(pool)} candidates, {len(picked)} picked in {time.perf_counter() - t:.1f} s")

# %%
# ## The batch
#
# Relaxations start far from equilibrium: high-force frames are the most informative ones, and
# the batch's forces sit above the pool's median.

_, forces = get_labels(pool, require_forces=True)
fmax = np.array([np.abs(f).max() for f in forces])
for rank, i in enumerate(picked):
    a = pool[i]
    print(f"{rank + 1:3d}  {a.get_chemical_formula():>18s}  sid={a.info['sid']}  "
          f"frame={a.info['frame']:3d}  max|F|={fmax[i]:.2f} eV/Å")
print(f"median max|F| in the pool {np.median(fmax):.2f} eV/Å, in the batch "
      f"{np.median(fmax[picked]):.2f} eV/Å")

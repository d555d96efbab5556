"""The paper's pipeline on real OC20 frames, as a scikit-learn Pipeline.

ForceNTKTransformer (joint energy+force NTK of one model) -> ChunkedPosteriorVarianceSelector
(PV shortlist) -> LCMDSelector (diverse batch). Train and pool are split by relaxation (``sid``).

Run: ``.venv/bin/python examples/oc20_pipeline.py [--model sevennet-0] [--pool-size 60]``.
By default it uses the bundled frames; ``--data ../shared/data/oc20/oc20_s2ef_relax_24sys.extxyz``
screens the full shared slice.
"""

import argparse
import time

import numpy as np

from skntk import ForceNTKTransformer, load, make_pv_lcmd_pipeline
from skntk.io import example_path, get_labels, read_structures, split_by

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="sevennet-0")
parser.add_argument("--data", default=str(example_path()))
parser.add_argument("--pool-size", type=int, default=60)
parser.add_argument("-n", type=int, default=8)
args = parser.parse_args()

frames = read_structures(args.data)
sids = sorted({a.info["sid"] for a in frames})
train_idx, pool_idx = split_by(frames, "sid", sids[:2])
train = [frames[i] for i in train_idx]
rng = np.random.default_rng(0)
pool = [frames[i] for i in sorted(rng.choice(pool_idx, min(args.pool_size, len(pool_idx)),
                                             replace=False))]

model = load(args.model)
pipe = make_pv_lcmd_pipeline(
    ForceNTKTransformer(model, kind="joint", n_features=256, force_rows="probes", n_probes=2,
                        random_state=0),
    n_to_select=args.n, shortlist_size=4 * args.n)
t = time.perf_counter()
pipe.fit(train)
picked = pipe.select(pool)
print(f"{len(pool)} candidates, {len(picked)} picked in {time.perf_counter() - t:.1f} s")
_, forces = get_labels(pool, require_forces=True)
fmax = np.array([np.abs(f).max() for f in forces])
for rank, i in enumerate(picked):
    a = pool[i]
    print(f"{rank + 1:3d}  {a.get_chemical_formula():>18s}  sid={a.info['sid']}  "
          f"frame={a.info['frame']:3d}  max|F|={fmax[i]:.2f} eV/Å")
print(f"median max|F| in the pool {np.median(fmax):.2f} eV/Å, in the batch "
      f"{np.median(fmax[picked]):.2f} eV/Å")

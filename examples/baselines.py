"""
# Baselines side by side: random, MaxDist, embeddings, NTK

The same pool, the same batch size, five ways to pick:

| method | features | selector |
|---|---|---|
| random | — | `RandomSelector` |
| MaxDist, embeddings | SevenNet-0 mean embeddings (`EmbeddingTransformer`) | `MaxDistSelector` |
| PV → LCMD, embeddings | same | `make_pv_lcmd_pipeline` |
| MaxDist, NTK | joint NTK rows of SevenNet-0 (`ForceNTKTransformer`) | `MaxDistSelector` |
| PV → LCMD, NTK | same | `make_pv_lcmd_pipeline` (skntk's method) |

Each batch is judged by one yardstick, independent of the selector: a ridge model on the energy
NTK rows (the linearised fine-tuning of SevenNet-0's energy), fitted on the labelled frames plus
the batch, predicting E_DFT − E_SevenNet-0 per atom on the rest of the pool (RMSE, eV/atom;
lower is better). On a pool this small the differences between methods are noisy: the
[active-learning evidence](../../benchmarks.md#active-learning-evidence) runs the real loop over
many seeds.

Run: `.venv/bin/python examples/baselines.py [--fast]` (`--fast` or `SKNTK_EXAMPLES_FAST=1`: 4
frames per relaxation, about a minute on 2 cores).
"""

import os
import sys

import matplotlib.pyplot as plt
import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from skntk import (
    EmbeddingTransformer,
    ForceNTKTransformer,
    MaxDistSelector,
    RandomSelector,
    load,
    make_pv_lcmd_pipeline,
)
from skntk.finetune import predict_energies_forces
from skntk.io import example_path, get_labels, read_structures, split_by

fast = "--fast" in sys.argv[1:] or os.environ.get("SKNTK_EXAMPLES_FAST") == "1"

# %%
# ## Data and features
#
# Two relaxations labelled, seven in the pool (frames of one relaxation never on both sides).

frames = read_structures(example_path())
per_sid = 4 if fast else 12
sids = np.array([a.info["sid"] for a in frames])
frames = [a for k, a in enumerate(frames) if np.sum(sids[:k] == sids[k]) < per_sid]
labelled_sids = sorted({a.info["sid"] for a in frames})[:2]
train_idx, pool_idx = split_by(frames, "sid", labelled_sids)
train, pool = [frames[i] for i in train_idx], [frames[i] for i in pool_idx]
n_pick = 4 if fast else 8

model = load("sevennet-0")
emb = EmbeddingTransformer(model).fit(train)
scaler = StandardScaler().fit(emb.transform(train))
E_train, E_pool = scaler.transform(emb.transform(train)), scaler.transform(emb.transform(pool))
ntk = ForceNTKTransformer(model, kind="joint", n_features=128, force_rows="probes", n_probes=2,
                          random_state=0).fit(train)
G_train, G_pool = ntk.transform(train), ntk.transform(pool)
print(f"{len(train)} labelled, {len(pool)} pool; embeddings {E_pool.shape}, NTK {G_pool!r}")

# %%
# ## Five batches

batches = {
    "random": RandomSelector(n_to_select=n_pick, random_state=0).fit(E_train).select(E_pool),
    "MaxDist, embeddings": MaxDistSelector(n_to_select=n_pick).fit(E_train).select(E_pool),
    "PV → LCMD, embeddings": make_pv_lcmd_pipeline(
        n_to_select=n_pick, shortlist_size=3 * n_pick, random_state=0).fit(E_train).select(E_pool),
    "MaxDist, NTK": MaxDistSelector(n_to_select=n_pick, random_state=0).fit(G_train).select(G_pool),
    "PV → LCMD, NTK": make_pv_lcmd_pipeline(
        n_to_select=n_pick, shortlist_size=3 * n_pick, random_state=0).fit(G_train).select(G_pool),
}

# %%
# ## One yardstick
#
# The energy row of each joint block is ∂E/∂θ (sketched): a ridge on it is the first-order model
# of fine-tuning SevenNet-0's energy on the labelled frames plus the batch.


def energy_rows(blocks):
    return blocks.rows[blocks.offsets[:-1]]


def residual_per_atom(atoms):
    energies, _ = get_labels(atoms)
    predicted, _ = predict_energies_forces(model, atoms)
    return (energies - predicted) / np.array([len(a) for a in atoms])


R_train, R_pool = energy_rows(G_train), energy_rows(G_pool)
rscale = StandardScaler().fit(np.vstack([R_train, R_pool]))
R_train, R_pool = rscale.transform(R_train), rscale.transform(R_pool)
y_train, y_pool = residual_per_atom(train), residual_per_atom(pool)
_, forces = get_labels(pool, require_forces=True)
fmax = np.array([np.abs(f).max() for f in forces])

rmse = {}
print(f"{'method':24s} {'RMSE eV/atom':>12s} {'median max|F|':>14s} {'relaxations':>11s}")
for name, idx in batches.items():
    rest = np.setdiff1d(np.arange(len(pool)), idx)
    ridge = Ridge(alpha=1.0).fit(np.vstack([R_train, R_pool[idx]]),
                                 np.concatenate([y_train, y_pool[idx]]))
    rmse[name] = float(np.sqrt(np.mean((ridge.predict(R_pool[rest]) - y_pool[rest]) ** 2)))
    n_sid = len({pool[i].info["sid"] for i in idx})
    print(f"{name:24s} {rmse[name]:12.4f} {np.median(fmax[idx]):11.2f} eV/Å {n_sid:11d}")

# %%
# ## Where the picks fall
#
# Left: the pool in the first two principal components of the embeddings, each method's picks
# marked. Right: the yardstick.

xy = PCA(n_components=2, random_state=0).fit(E_pool).transform(np.vstack([E_pool, E_train]))
fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
ax.scatter(*xy[:len(pool)].T, s=12, c="0.8", label="pool")
ax.scatter(*xy[len(pool):].T, s=14, c="k", marker="x", label="labelled")
markers = ["o", "s", "^", "D", "*"]
for (name, idx), m in zip(batches.items(), markers, strict=True):
    ax.scatter(*xy[idx].T, s=60 if m == "*" else 30, marker=m, facecolors="none",
               edgecolors=f"C{markers.index(m)}", label=name)
ax.set_xlabel("PC 1 (embeddings)")
ax.set_ylabel("PC 2")
ax.legend(fontsize=7)
bx.barh(list(rmse), list(rmse.values()), color=[f"C{i}" for i in range(len(rmse))])
bx.invert_yaxis()
bx.set_xlabel("RMSE on the unpicked pool (eV/atom), lower is better")
fig.tight_layout()
plt.show()

"""
# GridSearchCV over selector hyperparameters

σ², the PV reduction, the acquisition criterion and the shortlist size are ordinary
scikit-learn hyperparameters of the PV → LCMD pipeline, so `GridSearchCV` tunes them. Every
selector's `score(X, y)` selects `n_to_select` structures from the held-out fold, fits a ridge
(the linearised-GP mean) on the labelled + selected structures and returns minus the RMSE on the
rest: "how well does a model trained on the picked batch predict what was not picked".

None of these hyperparameters changes the features, so the NTK rows of SevenNet-0 are computed
once and the search runs on `FeatureBlocks` (put the `ForceNTKTransformer` inside the pipeline to
search over featuriser settings too: then every grid point featurises again). Folds are whole
relaxations (`GroupKFold` on `sid`).

Run: `.venv/bin/python examples/grid_search.py [--fast]` (`--fast` or `SKNTK_EXAMPLES_FAST=1`: 4
frames of each relaxation, 12 grid points, about a minute on 2 cores).
"""

import os
import sys

import matplotlib.pyplot as plt
import numpy as np
from sklearn.model_selection import GridSearchCV, GroupKFold

from skntk import ForceNTKTransformer, load, make_pv_lcmd_pipeline
from skntk.finetune import predict_energies_forces
from skntk.io import example_path, get_labels, read_structures

fast = "--fast" in sys.argv[1:] or os.environ.get("SKNTK_EXAMPLES_FAST") == "1"

# %%
# ## Features and targets
#
# Energy NTK rows (∂E/∂θ of SevenNet-0's default parameter subset, sketched to 128 columns: one
# row per structure). The target is what fine-tuning has to learn: the DFT energy minus
# SevenNet-0's, per atom (eV/atom). For joint blocks, `score` would use their energy rows;
# force-probe blocks have no per-row targets, so they cannot be scored against energies.

frames = read_structures(example_path())
per_sid = 4 if fast else 12
sids = np.array([a.info["sid"] for a in frames])
frames = [a for k, a in enumerate(frames) if np.sum(sids[:k] == sids[k]) < per_sid]
groups = np.array([a.info["sid"] for a in frames])

model = load("sevennet-0")
ntk = ForceNTKTransformer(model, kind="energy", normalize="atoms", n_features=128,
                          random_state=0).fit(frames)
X = ntk.transform(frames)
energies, _ = get_labels(frames)
predicted, _ = predict_energies_forces(model, frames)
n_atoms = np.array([len(a) for a in frames])
y = (energies - predicted) / n_atoms
print(f"{len(frames)} frames of {len(set(groups))} relaxations -> {X!r}")
print(f"target: E_DFT - E_SevenNet-0 per atom, {y.mean():.3f} ± {y.std():.3f} eV/atom")

# %%
# ## The search
#
# `make_pv_lcmd_pipeline()` without a featuriser works on features; its steps are `pv` and
# `lcmd`, so the grid names `pv__sigma2`, `pv__reduction`, ...

pipe = make_pv_lcmd_pipeline(n_to_select=2 if fast else 4, random_state=0)
grid = {"pv__sigma2": [1e-4, 1e-2, 1.0],
        "pv__criterion": ["variance", "pool_variance_reduction"],
        "pv__shortlist_size": [4, 8] if fast else [8, 16]}
# (pv__reduction matters for multi-row blocks only: here every block is one energy row.)
search = GridSearchCV(pipe, grid, cv=GroupKFold(n_splits=3), error_score="raise")
search.fit(X, y, groups=groups)

results = search.cv_results_
order = np.argsort(-results["mean_test_score"])
print("rank  RMSE (eV/atom)   parameters")
for i in order:
    params = ", ".join(f"{k.split('__')[1]}={v}" for k, v in results["params"][i].items())
    print(f"{results['rank_test_score'][i]:4d}  {-results['mean_test_score'][i]:.4f} ± "
          f"{results['std_test_score'][i]:.4f}   {params}")
print("best:", search.best_params_)

# %%
# ## Score against σ²
#
# Higher is better (minus the RMSE of the linearised fine-tuned model on the unpicked frames).

fig, ax = plt.subplots(figsize=(6, 3.5))
for criterion in grid["pv__criterion"]:
    for size in grid["pv__shortlist_size"]:
        rows = sorted((i for i, p in enumerate(results["params"])
                       if p["pv__criterion"] == criterion and p["pv__shortlist_size"] == size),
                      key=lambda i: results["params"][i]["pv__sigma2"])
        ax.errorbar([results["params"][i]["pv__sigma2"] for i in rows],
                    results["mean_test_score"][rows], yerr=results["std_test_score"][rows],
                    marker="o", capsize=3, label=f"{criterion}, shortlist {size}")
ax.set_xscale("log")
ax.set_xlabel("σ² (relative to the mean train kernel diagonal)")
ax.set_ylabel("score = −RMSE (eV/atom)")
ax.legend(fontsize=7)
fig.tight_layout()
plt.show()

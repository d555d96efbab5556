"""
# On-the-fly learning in MD: SevenNet-0 learns EMT on a Cu slab

No pool: the model runs Langevin MD, and every `every` steps its calibrated error bar
(`ForceUncertainty`, eV/Å) says whether to call the reference calculator at the current frame.
Labelled frames fine-tune the model as it goes (`OnTheFlyLearner`). Here the "reference" is ASE's
EMT, a cheap stand-in for DFT (swap in `tblite`'s GFN2-xTB or your DFT calculator), and the model
is SevenNet-0, trained on PBE: the two disagree, so there is something to learn.

The first checks label their frames unconditionally (the cold start: `n_initial` labels before the
first fine-tuning, then `min_calibration` labelled frames whose errors calibrate the error bar);
after that only frames above the threshold are labelled.

Run: `.venv/bin/python examples/onthefly_emt.py [--fast]` (`--fast` or `SKNTK_EXAMPLES_FAST=1`:
a shorter run with a smaller budget, about a minute on 2 cores).
"""

import os
import sys

import matplotlib.pyplot as plt
import numpy as np
from ase import units
from ase.build import fcc111
from ase.calculators.emt import EMT
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary

from skntk import CalculatorOracle, MLIPRegressor, OnTheFlyLearner, evaluate, load

fast = "--fast" in sys.argv[1:] or os.environ.get("SKNTK_EXAMPLES_FAST") == "1"

# %%
# ## Reference frames (never used for training)
#
# A separate EMT trajectory at the same temperature, labelled by EMT: the true error of each
# fine-tuned model is measured on it.
start = fcc111("Cu", (2, 2, 2), vacuum=5.0)
ref = start.copy()
ref.calc = EMT()
rng = np.random.RandomState(1)
ref.set_momenta(rng.normal(0, np.sqrt(63.5 * units.kB * 800), (len(ref), 3)))
Stationary(ref)
dyn = Langevin(ref, 2 * units.fs, temperature_K=800, friction=0.01 / units.fs, fixcm=False,
               rng=rng)
test = []
for _ in range(6 if fast else 30):
    dyn.run(20)
    frame = ref.copy()
    frame.calc = EMT()
    frame.get_forces()
    test.append(frame)

# %%
# ## The run
model = load("sevennet-0")
learner = OnTheFlyLearner(
    model, CalculatorOracle(EMT()),
    threshold=0.11,                  # eV/Å: label a frame whose predicted force MAE is larger
    every=10, budget=8 if fast else 20, refit_every=2,
    n_initial=1 if fast else 2,      # cold start: labels before the first fine-tuning
    temperature_K=800, timestep_fs=2.0,
    regressor=MLIPRegressor(model, epochs=3 if fast else 20, progress_bar=False),
    test_sets={"reference MD": test}, random_state=0, progress_bar=False)
result = learner.run(start, 200 if fast else 2000)
print(f"stopped: {result.stop_reason}; {len(result.labelled)} labels in "
      f"{result.checks[-1]['step']} MD steps")
print(f"pretrained SevenNet-0 on the reference frames: "
      f"{evaluate(model, test)['force_mae']:.3f} eV/Å")
for h in result.history:
    print(f"refit {h['generation']}: {h['n_labels']} labels, true force MAE "
          f"{h['true']['reference MD']:.3f} eV/Å, predicted {h['predicted']['reference MD']:.3f}")
print("seconds:", {k: round(v, 1) for k, v in result.history[-1]["seconds"].items()})

# %%
# ## Predicted error along the trajectory
#
# Triangles: labelled frames (the first ones are the cold start, before the error bar is
# calibrated; the dashed line is the threshold).
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
result.plot(ax=axes[0])
n = [h["n_labels"] for h in result.history]
axes[1].plot(n, [h["true"]["reference MD"] for h in result.history], "o-", label="true")
axes[1].plot(n, [h["predicted"]["reference MD"] for h in result.history], "s--",
             label="predicted (mean)")
axes[1].set_xlabel("labels")
axes[1].set_ylabel("force MAE on reference MD (eV/Å)")
axes[1].legend()
fig.tight_layout()
plt.show()

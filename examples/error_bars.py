"""
# Error bars from one model: predicted force errors, bounds and an MD watch

A small model is fine-tuned on a few labelled frames; `ForceUncertainty.from_regressor` turns the
posterior of its NTK features plus its own predicted force magnitude into an expected force MAE
per structure (eV/Å), calibrated on the regressor's validation split, with split-conformal 90 %
upper bounds. Then an MD run with the model watches its own error bar and stops at a threshold.

Everything here is tiny so that it runs in seconds: the built-in model (`BuiltinMLIP`) on Cu
slabs labelled by ASE's EMT potential, which stands in for DFT. With a real fine-tuning
(SevenNet-0, CHGNet) the calls are the same; docs/uncertainty.md reports what the error bars
measured on real molecular MD.

Run: `.venv/bin/python examples/error_bars.py [--fast]` (`--fast` or `SKNTK_EXAMPLES_FAST=1`:
fewer frames and epochs, well under a minute on 2 cores).
"""

import os
import sys

import matplotlib.pyplot as plt
import numpy as np
import torch
from ase import units
from ase.build import fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.langevin import Langevin

from skntk import BuiltinMLIP, ForceUncertainty, MLIPRegressor
from skntk.finetune import predict_energies_forces
from skntk.uncertainty import UncertaintyObserver, UncertaintyThresholdExceeded

fast = "--fast" in sys.argv[1:] or os.environ.get("SKNTK_EXAMPLES_FAST") == "1"
torch.set_num_threads(1)


def emt_frames(n, seed, amp):
    """``n`` Cu(111) slabs rattled by up to ``amp`` Å, labelled by EMT."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a = fcc111("Cu", (2, 2, 3), vacuum=5.0)
        a.rattle(float(rng.uniform(0.02, amp)), seed=seed * 1000 + k)
        b = a.copy()
        b.calc = EMT()
        a.calc = SinglePointCalculator(a, energy=b.get_potential_energy(), forces=b.get_forces())
        out.append(a)
    return out


# %%
# ## Fine-tune, then calibrate on the validation split
#
# Half of the labelled frames are held out (`validation_fraction=0.5`): the regressor uses them
# for early stopping, `from_regressor` calibrates the error bars on them (at least
# `min_calibration=10`).

n = 24 if fast else 48
labelled = emt_frames(n, 0, amp=0.15)
model = BuiltinMLIP([29], cutoff=4.0, n_hidden=16, n_blocks=2, random_state=0)
reg = MLIPRegressor(model, parameters="all", epochs=8 if fast else 30, learning_rate=1e-2,
                    validation_fraction=0.5, random_state=0).fit(labelled)
unc = ForceUncertainty.from_regressor(reg, atoms=labelled)
print(f"trained on {len(reg.train_indices_)}, calibrated on {unc.n_calibration_}; "
      f"map coefficients [a, b, c] = {np.round(unc.coef_, 3).tolist()}")

# %%
# ## Predicted against true errors on new frames
#
# New frames of two kinds: rattled like the labelled ones (exchangeable with the calibration
# frames: the 90 % bound is guaranteed to cover about 90 % of them), and rattled up to three
# times as far (novel, larger forces: larger predicted errors, and no guarantee).

n_test = 15 if fast else 40
near, far = emt_frames(n_test, 1, amp=0.15), emt_frames(n_test, 2, amp=0.45)
test = near + far
pred = unc.predict(test)
upper = unc.predict_interval(test, coverage=0.9)
_, f_hat = predict_energies_forces(reg.model_, test)
true = np.array([np.abs(f - a.get_forces()).mean() for f, a in zip(f_hat, test, strict=True)])
rho = np.corrcoef(np.argsort(np.argsort(pred)), np.argsort(np.argsort(true)))[0, 1]
covered = true <= upper
print(f"Spearman rho {rho:.2f}; the 90 % bound covers {covered[:n_test].mean():.0%} of the "
      f"frames like the calibration ones, {covered[n_test:].mean():.0%} of the far ones")

fig, ax = plt.subplots(figsize=(4.5, 4))
for part, label in ((slice(0, n_test), "like the labelled frames"),
                    (slice(n_test, None), "rattled 3x as far")):
    ax.errorbar(pred[part], true[part], xerr=[np.zeros(n_test), (upper - pred)[part]], fmt="o",
                ms=4, alpha=0.7, elinewidth=0.6, label=f"{label} (bar: 90 % bound)")
lim = [0, max(upper.max(), true.max()) * 1.05]
ax.plot(lim, lim, "k--", lw=0.8, label="y = x")
ax.set(xlabel="predicted force MAE (eV/Å)", ylabel="true force MAE (eV/Å)", xlim=lim, ylim=lim)
ax.legend(fontsize=8)
fig.tight_layout()

# %%
# ## An MD run that watches its own error bar
#
# `unc.calculator()` gives the model's energy and forces plus `results["force_uncertainty"]`; the
# observer logs it and, with `stop=True`, raises `UncertaintyThresholdExceeded` when it passes
# the threshold (ASE dynamics have no stop hook). The frame it stops at is the one to label.

atoms = fcc111("Cu", (2, 2, 3), vacuum=5.0)  # the ideal slab: small forces, low error
atoms.calc = unc.calculator(every=1)
threshold = 1.2 * float(np.median(pred[:n_test]))  # 20 % above a typical labelled-like frame
watch = UncertaintyObserver(atoms.calc, atoms, threshold=threshold, stop=True)
dyn = Langevin(atoms, 2 * units.fs, temperature_K=2500, friction=0.2, fixcm=False,
               rng=np.random.default_rng(0))
dyn.attach(watch, interval=1)
try:
    dyn.run(60 if fast else 300)
    print(f"no step passed {threshold:.3f} eV/Å (max {max(watch.uncertainties):.3f})")
except UncertaintyThresholdExceeded as err:
    print(f"stopped at step {err.step}: predicted force error {err.uncertainty:.3f} eV/Å > "
          f"{err.threshold:.3f}")

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(watch.steps, watch.uncertainties, "-o", ms=2, label="predicted force MAE")
ax.axhline(threshold, color="r", ls="--", lw=1, label=f"threshold {threshold:.3f} eV/Å")
ax.set(xlabel="MD step (2 fs)", ylabel="eV/Å")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

r"""On-the-fly learning in MD, prospective: uncertainty-triggered vs periodic and random labels.

    python benchmarks/bench_onthefly.py run --system cu_emt --strategy triggered --seed 0 \
        --preset medium
    python benchmarks/bench_onthefly.py report
    python benchmarks/bench_onthefly.py backfill --checkpoints DIR   # runs before checks had "true"

A real oracle labels frames of the model's own MD: SevenNet-0 (trained on PBE) learns GFN2-xTB
(tblite) for acac at 300 K and 900 K (``acac_300``, ``acac_900``) and EMT for a Cu(111) slab with
an O adatom (``cu_emt``). Reference frames: a separate MD trajectory *of the oracle itself* at the
same temperature, labelled by it (never used for training). Strategies at equal oracle calls:

- ``triggered``: :class:`skntk.OnTheFlyLearner`, a check every 10 steps, threshold from
  ``target_fraction=0.25`` (no threshold tuned on the reference frames);
- ``periodic``: the same driver labelling every check, with a check every 40 steps (the same
  oracle calls over the same MD length: what users do without a trigger);
- ``committee``: the driver of ``triggered`` (same checks and threshold rule) with the error bar
  of a 4-member committee: the judged model and 3 more fine-tunings at each refit, their force
  spread calibrated by the same map (:func:`committee_uncertainty`);
- ``random``: ``budget`` frames drawn at random from the triggered run's checked frames, labelled,
  one fine-tuning per budget level.

Each refit records the force MAE and the 95th percentile of |ΔF_i| on the reference frames, so the
curves compare at 10, 20, 40 labels; the wall time splits into MD, uncertainty, oracle and refits;
the final model runs a longer MD whose bond graph and largest force are compared with the
oracle's own trajectory. The report's calibration table sets the predicted force MAE against
the true one by model generation, on the frames each model flagged (new to it) and on the
reference frames. One JSON per (system, strategy, seed) in
``benchmarks/results/onthefly/``; runs resume from their checkpoints. Triggered and committee
runs of the first ``target_fraction`` rule (before the cold-start and tie fixes) end in
``-rule1.json`` and are reported as ``triggered (rule 1)``; the random runs of seeds with a
rule-1 triggered run drew their frames from its trajectory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from _data import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "onthefly"
DATA = SHARED_DATA / "molecules"
SYSTEMS = ("acac_300", "acac_900", "cu_emt")
STRATEGIES = ("triggered", "periodic", "committee", "random")
#: run sizes: oracle calls, fine-tuning epochs, MD steps, labels between refits, MD steps between
#: periodic labels, reference frames, steps of the stability MD. ``fast`` checks the script;
#: ``medium`` is the comparison a 2-core CPU runs in ~10 min per (system, strategy, seed).
PRESETS = {
    "fast": dict(budget=6, epochs=3, n_steps=400, refit_every=2, periodic_every=40,
                 n_reference=8, stability_steps=500),
    "medium": dict(budget=20, epochs=10, n_steps=1000, refit_every=5, periodic_every=50,
                   n_reference=30, stability_steps=2000),
    "full": dict(budget=40, epochs=20, n_steps=2000, refit_every=5, periodic_every=50,
                 n_reference=30, stability_steps=4000),
}


def committee_uncertainty(regressor, n_members=4):
    """An error bar from a committee, for the ``committee`` strategy: :class:`ForceUncertainty`
    whose novelty input is the force spread of the judged model and ``n_members - 1`` more
    fine-tunings of the pretrained model on the same labels (other seeds), calibrated the same
    way (log-linear map on the prequential pairs, ``inputs="pv"``: the spread alone)."""
    from sklearn.base import clone

    from skntk.al.committee import committee_disagreement
    from skntk.finetune import predict_energies_forces
    from skntk.models import resolve_model
    from skntk.uncertainty import ForceUncertainty

    class CommitteeUncertainty(ForceUncertainty):
        def __init__(self, regressor=None, *, n_members=4, model=None, inputs="pv",
                     min_calibration=10):
            super().__init__(model=model, inputs=inputs, min_calibration=min_calibration)
            self.regressor = regressor
            self.n_members = n_members

        def fit_posterior(self, atoms):
            for attr in ("coef_", "calibration_scores_"):
                self.__dict__.pop(attr, None)
            self.model_ = resolve_model(self.model, "CommitteeUncertainty")
            X = self.model_.validate(atoms)
            self.elements_ = frozenset(int(z) for a in X for z in a.numbers)
            self.n_train_, self.featurizer_, self.posterior_, self.per_atom_ = (len(X), None,
                                                                                None, False)
            self.members_ = [clone(self.regressor).set_params(random_state=1000 + k).fit(X)
                             .model_ for k in range(1, self.n_members)]
            return self

        def _inputs(self, X, forces=None, energies=None, blocks=None):
            out = super()._inputs(X, forces=forces, energies=energies)
            member_f = [out["forces"]] + [predict_energies_forces(m, X)[1]
                                          for m in self.members_]
            spread = committee_disagreement(
                None, [np.stack([f[s] for f in member_f]) for s in range(len(X))], None,
                out["free"], disagreement="force_mean")
            out["log_pv"] = np.log(np.maximum(spread, 1e-12))
            return out

    return CommitteeUncertainty(regressor, n_members=n_members)


def system(name):
    """``(start Atoms, oracle calculator factory, temperature K, timestep fs)``."""
    from ase.build import add_adsorbate, fcc111

    if name.startswith("acac"):
        import ase.io
        from tblite.ase import TBLite

        start = ase.io.read(DATA / "acac_train_300K.xyz", 0)
        start.calc = None
        start.info = {}
        return start, lambda: TBLite(method="GFN2-xTB", verbosity=0), float(name[5:]), 0.5
    from ase.calculators.emt import EMT

    slab = fcc111("Cu", (2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, "O", 1.2, "fcc")
    return slab, EMT, 800.0, 2.0


def reference(name, n_frames, stride, seed=12345):
    """Frames of the oracle's own Langevin MD (cached as extxyz), labelled by the oracle."""
    import ase.io
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary

    path = RESULTS / f"reference-{name}-{n_frames}x{stride}.extxyz"
    if path.exists():
        return ase.io.read(path, ":")
    start, calc, temp, dt = system(name)
    a = start.copy()
    a.calc = calc()
    rng = np.random.RandomState(seed)
    masses = a.get_masses()[:, None]
    a.set_momenta(rng.normal(0, 1, (len(a), 3)) * np.sqrt(masses * units.kB * temp))
    Stationary(a)
    dyn = Langevin(a, dt * units.fs, temperature_K=temp, friction=0.01 / units.fs, fixcm=False,
                   rng=rng)
    dyn.run(5 * stride)  # equilibrate
    frames = []
    for _ in range(n_frames):
        dyn.run(stride)
        f = a.copy()
        f.calc = calc()
        f.get_forces()
        frames.append(f)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # runs side by side: whole or absent
    ase.io.write(tmp, frames, format="extxyz")
    os.replace(tmp, path)
    return ase.io.read(path, ":")


def bond_graph(atoms):
    from ase.neighborlist import natural_cutoffs, neighbor_list

    i, j = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=1.2))
    return {(int(a), int(b)) for a, b in zip(i, j, strict=True) if a < b}


def stability(model, name, n_steps, seed):
    """Longer MD with ``model``: share of frames (every 50 steps) whose bond graph differs from
    the start's, and the largest force (eV/Å); the same for the oracle's own MD."""
    from ase import units
    from ase.md.langevin import Langevin

    start, calc, temp, dt = system(name)
    g0 = bond_graph(start)
    out = {}
    for who, c in (("model", model.calculator()), ("oracle", calc())):
        a = start.copy()
        a.calc = c
        rng = np.random.RandomState(seed)
        masses = a.get_masses()[:, None]
        a.set_momenta(rng.normal(0, 1, (len(a), 3)) * np.sqrt(masses * units.kB * temp))
        dyn = Langevin(a, dt * units.fs, temperature_K=temp, friction=0.01 / units.fs,
                       fixcm=False, rng=rng)
        changed, fmax, steps = 0, 0.0, 0
        try:
            for _ in range(n_steps // 50):
                dyn.run(50)
                steps += 50
                changed += bond_graph(a) != g0
                fmax = max(fmax, float(np.abs(a.get_forces()).max()))
        except Exception as err:  # a model that blows up: record where
            out[who] = {"error": f"{type(err).__name__}: {err}", "steps": steps}
            continue
        out[who] = {"steps": steps, "bond_graph_changed": changed / max(1, n_steps // 50),
                    "max_force": fmax}
    return out


def run(args):
    import torch

    from skntk import CalculatorOracle, MLIPRegressor, OnTheFlyLearner, evaluate, load

    torch.set_num_threads(args.threads)
    preset = "fast" if args.fast else args.preset
    size = PRESETS[preset]
    budget, epochs, n_steps = size["budget"], size["epochs"], size["n_steps"]
    test = reference(args.system, size["n_reference"],
                     50 if args.system.startswith("acac") else 20)
    tag = "" if preset == "full" else f"-{preset}"
    out = RESULTS / f"{args.system}-{args.strategy}-{args.seed}{tag}.json"
    if out.exists():
        print(f"skip {out.name}")
        return 0
    start, calc, temp, dt = system(args.system)
    model = load("sevennet-0", device="cpu")
    reg = MLIPRegressor(model, epochs=epochs, progress_bar=False)
    t0 = time.perf_counter()
    ck = RESULTS / ".ckpt" / out.stem
    common = dict(budget=budget, refit_every=size["refit_every"], temperature_K=temp,
                  timestep_fs=dt,
                  regressor=reg, test_sets={"reference": test}, random_state=args.seed,
                  progress_bar=False)
    record = {"system": args.system, "strategy": args.strategy, "seed": args.seed,
              "fast": preset == "fast", "preset": preset, **size,
              "machine": f"{platform.machine()} {os.cpu_count()} cores", "threads": args.threads,
              "pretrained": evaluate(model, test)}
    if args.strategy in ("triggered", "periodic", "committee"):
        if args.strategy in ("triggered", "committee"):
            unc = committee_uncertainty(reg) if args.strategy == "committee" else None
            learner = OnTheFlyLearner(model, CalculatorOracle(calc()), threshold=None,
                                      target_fraction=0.25, every=10, checkpoint_dir=ck,
                                      uncertainty=unc, **common)
        else:
            learner = OnTheFlyLearner(model, CalculatorOracle(calc()), threshold=1e-9,
                                      every=size["periodic_every"], checkpoint_dir=ck, **common)
        res = learner.run(start, n_steps)
        record.update(history=res.history, checks=res.checks, stop_reason=res.stop_reason,
                      n_labels=len(res.labelled), failed=res.failed)
        final = res.model
    else:
        import ase.io

        traj = RESULTS / ".ckpt" / out.stem.replace("random", "triggered") / "trajectory.extxyz"
        if not traj.exists():
            raise SystemExit(f"run the triggered strategy of this system and seed first ({traj})")
        frames = ase.io.read(traj, ":")
        rng = np.random.default_rng(args.seed)
        order = rng.permutation(len(frames))
        t1 = time.perf_counter()
        labelled = CalculatorOracle(calc()).label([frames[i] for i in order[:budget]])
        labelled = [r.atoms for r in labelled if r.error is None]
        seconds = {"md": 0.0, "uncertainty": 0.0, "oracle": time.perf_counter() - t1,
                   "refit": 0.0}  # the MD is the triggered run's (not counted again)
        history = []
        for n in range(size["refit_every"], len(labelled) + 1, size["refit_every"]):
            t1 = time.perf_counter()
            r = MLIPRegressor(model, epochs=epochs, progress_bar=False,
                              random_state=args.seed).fit(labelled[:n])
            seconds["refit"] += time.perf_counter() - t1
            m = evaluate(r.model_, test)
            history.append({"n_labels": n, "metrics": {"reference": m},
                            "true": {"reference": m["force_mae"]}, "seconds": dict(seconds)})
        record.update(history=history, n_labels=len(labelled))
        final = r.model_
    record["stability"] = stability(final, args.system, size["stability_steps"], args.seed)
    record["seconds"] = time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=float))
    os.replace(tmp, out)
    print(f"wrote {out.name} ({record['seconds']:.0f} s)")
    return 0


def _strategy(r):
    """The run's strategy, tagged ``(rule 1)`` for ``triggered``/``committee`` runs made under the
    first ``target_fraction`` rule (0.x, before the fixes of the cold start and of ties): then
    every check labelled until the quantile existed, so no calibrated check ever recorded a
    NaN threshold without being cold. Their JSONs end in ``-rule1.json``."""
    s = r["strategy"]
    if s in ("triggered", "committee") and not any(
            not c["cold"] and not np.isfinite(c["threshold"]) for c in r.get("checks", [])):
        return f"{s} (rule 1)"
    return s


def _final_mae(r):
    return r["history"][-1]["true"]["reference"] if r.get("history") else float("nan")


def _mean_curve(runs, key="force_mae"):
    """``[(labels, mean of the reference frames' metric key, n seeds)]`` at the label counts
    every run reached."""
    by = {}
    for r in runs:
        for h in r["history"]:
            by.setdefault(h["n_labels"], []).append(h["metrics"]["reference"][key])
    return [(n, float(np.mean(v)), len(v)) for n, v in sorted(by.items()) if len(v) == len(runs)]


def _labels_to_reach(curve, value):
    """Labels at which the monotone (running-minimum) ``curve`` first reaches ``value``,
    interpolated linearly; None when it never does."""
    best, prev = np.inf, None
    for n, v, _ in curve:
        v = min(v, best)
        if v <= value:
            if prev is None or prev[1] == v:
                return float(n)
            return float(prev[0] + (prev[1] - value) / (prev[1] - v) * (n - prev[0]))
        best, prev = v, (n, v)
    return None


def _paired(a_runs, b_runs):
    """Mean paired Δ % (a vs b, same seed) of the final force MAE, its 95 % t half-width, n,
    and how many seeds a is ahead."""
    from scipy import stats

    b = {r["seed"]: _final_mae(r) for r in b_runs}
    d = np.array([100 * (_final_mae(r) / b[r["seed"]] - 1) for r in a_runs if r["seed"] in b])
    if d.size == 0:
        return None
    half = float(stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)) \
        if d.size > 1 else float("nan")
    return float(d.mean()), half, int(d.size), int(np.sum(d < 0))


def _calibration_table(by):
    """Predicted against true force MAE (seed means, eV/Å) by the generation of the model that
    ran the MD: on the frames it flagged and labelled (prospective: new to it) and on the
    reference frames (after that generation's fine-tuning); the calibrated map's slopes, and how
    far its predictions over the generation's checks spread (how much it tells frames apart)."""
    lines = []
    for strat in [k for s_ in ("triggered", "committee") for k in (s_, f"{s_} (rule 1)")
                  if k in by]:
        runs = [r for r in by[strat] if any("true" in c for c in r.get("checks", []))]
        if not runs:
            continue
        lines += ["", f"Calibration of the {strat} runs (seeds {sorted(r['seed'] for r in runs)}; "
                  "means over seeds of per-run means, eV/Å; ratio = predicted / true):", "",
                  "| model generation | labelled frames: predicted / true (ratio) | "
                  "reference frames: predicted / true (ratio) | map slopes b (log PV), "
                  "c (log \\|F̂\\|) | predicted q90 / q10 over its checks |",
                  "|---|---|---|---|---|"]
        gens = sorted({c["generation"] for r in runs for c in r["checks"] if "true" in c}
                      | {h["generation"] for r in runs for h in r["history"]})
        for g in gens:
            lab = [[(c["predicted"], c["true"]) for c in r["checks"]
                    if c.get("generation") == g and "true" in c] for r in runs]
            lab = np.array([np.mean(x, axis=0) for x in lab if x])
            ref = np.array([(h["predicted"]["reference"], h["true"]["reference"])
                            for r in runs for h in r["history"] if h["generation"] == g])
            cells = []
            for a in (lab, ref):
                p, t = (a.mean(axis=0) if a.size else (np.nan, np.nan))
                cells.append(f"{p:.3f} / {t:.3f} ({p / t:.2f})" if np.isfinite(p) else
                             f"— / {t:.3f} (uncalibrated)" if np.isfinite(t) else "—")
            coefs = [h["map"]["coef"] for r in runs for h in r["history"]
                     if h["generation"] == g and h.get("map")]
            cells.append(", ".join(f"{v:.2f}" for v in np.mean(coefs, axis=0)[1:])
                         if coefs else "—")
            spread = [np.quantile(p, 0.9) / np.quantile(p, 0.1) for r in runs
                      if len(p := [c["predicted"] for c in r["checks"] if c["generation"] == g
                                   and np.isfinite(c["predicted"])]) >= 2]
            cells.append(f"{np.mean(spread):.2f}" if spread else "—")
            lines.append("| " + " | ".join([str(g)] + cells) + " |")
    return lines


def backfill(args):
    """Add ``true`` to the labelled checks of runs written before the driver recorded it, from
    their checkpoints' calibration pairs (the same numbers, in the same order)."""
    import pickle

    from skntk.uncertainty import _apply_log_map, _design, _fit_log_map

    for path in sorted(RESULTS.glob("*.json")):
        r = json.loads(path.read_text())
        if r["strategy"] not in ("triggered", "committee") or r.get("true_from_checkpoint") \
                or any("true" in c for c in r.get("checks", [])):
            continue
        state = Path(args.checkpoints) / path.stem / "state.pkl"
        if not state.exists():
            print(f"no checkpoint for {path.name}")
            continue
        with open(state, "rb") as fh:
            pairs = pickle.load(fh)["pairs"]
        errors = pairs["error"]
        labelled = [c for c in r["checks"] if c["labelled"] and c["generation"] >= 1]
        inputs = "pv" if r["strategy"] == "committee" else "pv+force"  # as the run's maps
        if len(labelled) != len(errors):
            raise SystemExit(f"{path.name}: {len(labelled)} labelled checks after the first "
                             f"fine-tuning but {len(errors)} pairs in {state}")
        for c, e in zip(labelled, errors, strict=True):
            c["true"] = float(e)
        for h in r["history"]:  # each refit's map: the first n_calibration pairs, refitted
            n = h["n_calibration"]
            h["map"] = None
            if n >= 4 and np.isfinite(h["predicted"]["reference"]):
                D = _design(np.array(pairs["log_pv"][:n]), np.array(pairs["log_f"][:n]),
                            inputs)
                coef, s2 = _fit_log_map(D, np.array(errors[:n]))
                h["map"] = {"coef": coef.tolist(), "residual_var": float(s2)}
        maps = {h["generation"]: h["map"] for h in r["history"]}
        for k, c in enumerate(labelled):  # the refitted maps give the run's own predictions
            m = maps.get(c["generation"])
            if m is not None:
                D = _design(np.array(pairs["log_pv"][k:k + 1]),
                            np.array(pairs["log_f"][k:k + 1]), inputs)
                p = _apply_log_map(D, np.array(m["coef"]), m["residual_var"])[0]
                if not np.isclose(p, c["predicted"], rtol=1e-6):
                    raise SystemExit(f"{path.name}: the refitted map of generation "
                                     f"{c['generation']} predicts {p} at step {c['step']}, "
                                     f"the run {c['predicted']}")
        r["true_from_checkpoint"] = True
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(r, indent=1, default=float))
        os.replace(tmp, path)
        print(f"backfilled {path.name} ({len(errors)} labelled checks)")
    return 0


def plot(system_, preset, by, path):
    """Force MAE and q95 of |ΔF_i| on the reference frames against labels (seed mean, with each
    seed's curve faint), and the predicted error along the first triggered run's trajectory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from skntk.al.onthefly import OnTheFlyResult

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, strat in enumerate(k for k in by if by[k] and by[k][0]["history"]):
        colour = f"C{i}"
        for ax, key in zip(axes[:2], ("force_mae", "force_q95"), strict=True):
            curves = [[(h["n_labels"], h["metrics"]["reference"][key]) for h in r["history"]]
                      for r in by[strat]]
            for c in curves:
                ax.plot(*zip(*c, strict=True), color=colour, alpha=0.25, lw=0.8)
            n_all, mean, _ = zip(*_mean_curve(by[strat], key), strict=True)
            ax.plot(n_all, mean, "o-", color=colour, label=f"{strat} ({len(curves)} seeds)")
    for ax, title in zip(axes[:2], ("force MAE", "95th percentile of |ΔF_i|"), strict=True):
        ax.set_xlabel("oracle labels")
        ax.set_ylabel(f"{title} (eV/Å)")
        ax.set_title(f"{system_} ({preset}): {title} on the reference frames", fontsize=9)
        ax.legend(fontsize=7)
    trig = sorted((r for k in ("triggered", "triggered (rule 1)") for r in by.get(k, [])),
                  key=lambda r: (_strategy(r) != "triggered", r["seed"]))  # rule 2 first
    if trig:
        r = trig[0]
        OnTheFlyResult(r["history"], r["checks"], [], [], None, None).plot(axes[2])
        axes[2].set_title(f"{_strategy(r)}, seed {r['seed']}: checks along the MD", fontsize=9)
    else:
        axes[2].set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args):
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    lines = ["Per run:", "",
             "| system | preset | strategy | seed | labels | force MAE (eV/Å) by labels | "
             "final q95 | MD / unc. / oracle / refit s | MD steps | stable (model vs oracle) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        curve = ", ".join(f"{h['n_labels']}: {h['true']['reference']:.3f}" for h in r["history"])
        last = r["history"][-1] if r["history"] else {}
        q95 = last.get("metrics", {}).get("reference", {}).get("force_q95", float("nan"))
        sec = last.get("seconds", {})
        split = " / ".join(f"{sec.get(k, float('nan')):.0f}" for k in ("md", "uncertainty",
                                                                        "oracle", "refit"))
        st = r.get("stability", {})
        stable = ", ".join(f"{k}: {v.get('bond_graph_changed', v.get('error'))}"
                           for k, v in st.items())
        preset = r.get("preset", "fast" if r.get("fast") else "full")
        lines.append(f"| {r['system']} | {preset} | {_strategy(r)} | {r['seed']} | "
                     f"{r['n_labels']} | {curve} | {q95:.3f} | {split} | "
                     f"{last.get('md_steps', '')} | {stable} |")
    groups = {}
    for r in rows:
        preset = r.get("preset", "fast" if r.get("fast") else "full")
        if preset != "fast":
            groups.setdefault((r["system"], preset), {}).setdefault(_strategy(r), []).append(r)
    for (system_, preset), by in sorted(groups.items()):
        lines += ["", f"**{system_}, preset {preset}** (seed means; Δ: paired by seed, final "
                  "force MAE on the reference frames, 95 % t-interval):", "",
                  "| strategy | seeds | force MAE by labels | final Δ vs periodic | "
                  "final Δ vs random | refit s | check s / MD s |", "|---|---|---|---|---|---|---|"]
        for strat in [k for s_ in STRATEGIES for k in (s_, f"{s_} (rule 1)") if k in by]:
            runs = by[strat]
            curve = ", ".join(f"{n}: {v:.4f}" for n, v, _ in _mean_curve(runs))
            cells = []
            for other in ("periodic", "random"):
                p = _paired(runs, by.get(other, [])) if strat != other else None
                cells.append("—" if p is None else
                             f"{p[0]:+.1f} % [{p[0] - p[1]:+.1f}, {p[0] + p[1]:+.1f}], "
                             f"{p[3]}/{p[2]} ahead")
            secs = [r["history"][-1].get("seconds", {}) for r in runs if r["history"]]
            refit = np.mean([s_.get("refit", np.nan) for s_ in secs]) if secs else np.nan
            ratios = [s_["uncertainty"] / s_["md"] for s_ in secs if s_.get("md")]
            check = np.mean(ratios) if ratios else np.nan  # random runs no MD of their own
            lines.append(f"| {strat} | {len(runs)} | {curve} | {cells[0]} | {cells[1]} | "
                         f"{refit:.0f} | {check:.3f} |")
        for name in ("triggered", "triggered (rule 1)"):
            trig, per = by.get(name, []), by.get("periodic", [])
            both = {r["seed"] for r in trig} & {r["seed"] for r in per}  # the same seeds in both
            trig = [r for r in trig if r["seed"] in both]
            per = [r for r in per if r["seed"] in both]
            if trig and per:
                target = float(np.mean([_final_mae(r) for r in per]))
                n_per = int(np.mean([r["n_labels"] for r in per]))
                need = _labels_to_reach(_mean_curve(trig), target)
                lines += ["", f"Labels the {name} runs need to reach periodic's final mean "
                          f"error (seeds {sorted(both)}; {target:.4f} eV/Å at {n_per} labels): "
                          + ("not reached" if need is None else
                             f"{need:.1f} ({need / n_per:.2f} of periodic's; target ≤ 0.67)")
                          + "."]
        for rule in ("", " (rule 1)"):
            trig, com = by.get("triggered" + rule, []), by.get("committee" + rule, [])
            p = _paired(trig, com)
            if p is not None:
                seeds = sorted({r["seed"] for r in trig} & {r["seed"] for r in com})
                cost = [r["history"][-1]["seconds"]["refit"] for r in trig if r["seed"] in seeds]
                cost_c = [r["history"][-1]["seconds"]["refit"] for r in com if r["seed"] in seeds]
                lines += ["", f"Triggered{rule} against the committee{rule} (seeds {seeds}): "
                          f"final force MAE {p[0]:+.1f} % [{p[0] - p[1]:+.1f}, {p[0] + p[1]:+.1f}] "
                          f"({p[3]}/{p[2]} seeds lower; target: within 5 %), at "
                          f"{np.mean(cost) / np.mean(cost_c):.2f} of its refit time "
                          "(target ≤ 0.25)."]
        lines += _calibration_table(by)
        png = f"curves_{system_}_{preset}.png"
        plot(system_, preset, by, RESULTS / png)
        lines += ["", f"![{system_} {preset}]({png})"]
    text = "\n".join(lines)
    (RESULTS / "report.md").write_text(text + "\n")
    print(text)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--system", choices=SYSTEMS, required=True)
    r.add_argument("--strategy", choices=STRATEGIES, required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--preset", choices=sorted(PRESETS), default="full",
                   help="run size (PRESETS): fast (6 labels, a smoke test), medium (20), full (40)")
    r.add_argument("--fast", action="store_true", help="the same as --preset fast")
    r.add_argument("--threads", type=int, default=1)
    sub.add_parser("report")
    b = sub.add_parser("backfill", help="add the labelled checks' true errors to runs written "
                       "before the driver recorded them, from their checkpoints")
    b.add_argument("--checkpoints", default=str(RESULTS / ".ckpt"))
    args = ap.parse_args(argv)
    return {"run": run, "report": report, "backfill": backfill}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

"""``skntk uncertainty``: predicted force errors of a fine-tuned model, written into the frames.

Kept apart from :mod:`skntk.cli` (which registers it and prints its errors) so that the selection
commands do not import the error-bar machinery.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def add_parser(sub) -> None:
    p = sub.add_parser(
        "uncertainty",
        help="predicted force error (eV/Å) of a fine-tuned model on each structure, with "
             "calibrated upper bounds, written into the frames")
    p.add_argument("--model", default=None,
                   help="the fine-tuned model: a SevenNet/MACE/built-in file or a name")
    p.add_argument("--train", default=None, help="the structures the model was trained on")
    p.add_argument("--calibration", default=None,
                   help="labelled structures the model did NOT train on (at least 10)")
    p.add_argument("--estimator", default=None,
                   help="a fitted error bar saved by --save (instead of --model/--train/"
                        "--calibration)")
    p.add_argument("--structures", required=True, help="structures to score (any ASE format)")
    p.add_argument("-o", "--output", default="scored.extxyz",
                   help="scored frames: info force_uncertainty / force_uncertainty_upper (eV/Å) "
                        "and, where labels exist, force_error")
    p.add_argument("--coverage", type=float, default=0.9,
                   help="coverage of the upper bounds (split conformal)")
    p.add_argument("--inputs", default="pv+force", choices=["pv+force", "pv", "force"],
                   help="inputs of the calibration map")
    p.add_argument("--save", default=None, help="save the fitted error bar (joblib) here")
    p.add_argument("--plot", default=None,
                   help="predicted vs true error plot (PNG) where labels exist (default: next to "
                        "--output)")
    p.add_argument("--device", default="auto")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log progress and show tracebacks of errors")


def _true_errors(frames, pred_forces, free):
    """Per-structure force MAE over free atoms of the model's ``pred_forces`` where ``frames``
    carry finite force labels, NaN elsewhere."""
    from skntk.io import get_labels

    out = np.full(len(frames), np.nan)
    for i, a in enumerate(frames):
        try:
            _, (f,) = get_labels([a])
        except ValueError:
            continue
        if f is not None and np.all(np.isfinite(f)):
            out[i] = float(np.abs(pred_forces[i] - f)[free[i]].mean())
    return out


def run(args, read, check_output, load_model) -> int:
    """Fit (or load) the error bar, score ``--structures``, write them (and the plot).

    ``read``, ``check_output`` and ``load_model`` are :mod:`skntk.cli`'s (its error wording)."""
    import ase.io
    import joblib

    from skntk.models import load
    from skntk.uncertainty import ForceUncertainty

    out = Path(args.output)
    check_output(out, "-o/--output")
    if not 0 < args.coverage < 1:
        raise ValueError(f"--coverage must be in (0, 1); got {args.coverage}.")
    if args.estimator is not None:
        if any(v is not None for v in (args.model, args.train, args.calibration)):
            raise ValueError("give --estimator, or --model with --train and --calibration; "
                             "not both.")
        try:
            est = joblib.load(args.estimator)
        except FileNotFoundError:
            raise FileNotFoundError(f"--estimator: no such file {args.estimator!r}.") from None
        except Exception as err:
            raise ValueError(f"--estimator {args.estimator!r} is not a saved error bar "
                             f"({type(err).__name__}).") from err
        if not isinstance(est, ForceUncertainty):
            raise ValueError(f"--estimator {args.estimator!r} holds a {type(est).__name__}, not "
                             f"a fitted ForceUncertainty.")
    else:
        missing = [o for o, v in (("--model", args.model), ("--train", args.train),
                                  ("--calibration", args.calibration)) if v is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} needed (or --estimator): the error bar is "
                             f"built from the model, its training structures and labelled "
                             f"structures it did not train on.")
        model = load_model(load, args.model, args.device)
        est = ForceUncertainty(model=model, inputs=args.inputs).fit(
            read(args.train, "--train"), read(args.calibration, "--calibration"))
        if args.save:
            joblib.dump(est, args.save)
    from skntk.io import free_atoms
    from skntk.models.predict import predict_energies_forces
    from skntk.uncertainty import conformal_quantile

    frames = est.model_.validate(read(args.structures, "--structures"))
    energies, forces = predict_energies_forces(est.model_, frames, batch_size=est.batch_size)
    pred = est.predict(frames, forces=forces, energies=energies)  # the model runs once
    q = conformal_quantile(est.calibration_scores_, args.coverage)
    if not np.isfinite(q):
        print(f"warning: --coverage {args.coverage} needs more than the {est.n_calibration_} "
              f"calibration structures: the upper bounds are infinite", file=sys.stderr)
    upper = q * pred
    true = _true_errors(frames, forces, [free_atoms(a) for a in frames])
    for a, p, u, t in zip(frames, pred, upper, true, strict=True):
        a.info["force_uncertainty"] = float(p)
        a.info[f"force_uncertainty_upper_{round(100 * args.coverage)}"] = float(u)
        if np.isfinite(t):
            a.info["force_error"] = float(t)
    ase.io.write(out, frames, format="extxyz")
    has = np.isfinite(true)
    print(f"{len(frames)} structures scored: predicted force error {np.median(pred):.4f} eV/Å "
          f"(median; {np.min(pred):.4f}–{np.max(pred):.4f}); {round(100 * args.coverage)} % "
          f"bounds in info; written to {out}")
    if has.sum() >= 2:
        from scipy.stats import spearmanr

        cover = float(np.mean(true[has] <= upper[has]))
        rho = spearmanr(pred[has], true[has])[0]
        print(f"{int(has.sum())} labelled: true force MAE {np.mean(true[has]):.4f} eV/Å, "
              f"predicted {np.mean(pred[has]):.4f}; Spearman {rho:.2f}; "
              f"{cover:.0%} under their {round(100 * args.coverage)} % bound")
        _plot(Path(args.plot) if args.plot else out.with_suffix(".png"), pred[has], true[has],
              upper[has])
    return 0


def _plot(path, pred, true, upper):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install skntk[plot])", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(4.5, 4))
    order = np.argsort(pred)
    ax.plot(pred, true, ".", label="structures")
    ax.plot(pred[order], upper[order], "-", lw=0.8, label="upper bound")
    lim = [min(pred.min(), true.min()), max(pred.max(), true.max(), upper.max())]
    ax.plot(lim, lim, "k--", lw=0.6, label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted force error (eV/Å)")
    ax.set_ylabel("true force MAE (eV/Å)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")

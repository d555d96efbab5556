"""Command line: ``skntk select`` (a selection run) and ``skntk demo`` (one on bundled data).

Only this module writes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

logger = logging.getLogger("skntk")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number; got {text!r}") from None
    if not (value > 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {text}")
    return value


#: Errors that mean bad input: one line on stderr and exit code 2 (``-v`` shows the traceback).
_INPUT_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, ImportError, OSError,
                 MemoryError)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skntk", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def selection_args(p, demo):
        p.add_argument("--model", default="sevennet-0",
                       help="sevennet-0, chgnet-0.3.0, a MACE .model file or a built-in model file")
        p.add_argument("-n", "--n-to-select", type=_positive_int, default=10, help="batch size B")
        p.add_argument("--kind", default="joint", choices=["energy", "force", "joint"])
        p.add_argument("--parameters", default=None,
                       help="parameter subset (readout, last_block, all); default: the backend's "
                            "default_subset (SevenNet-0: last_block)")
        p.add_argument("--n-features", type=_positive_int, default=256, help="sketch dimension d")
        p.add_argument("--force-rows", default="probes", choices=["exact", "probes", "auto"])
        p.add_argument("--n-probes", type=_positive_int, default=4)
        p.add_argument("--shortlist", type=_positive_int, default=None,
                       help="PV shortlist size M before LCMD (default: max(5 B, 50))")
        p.add_argument("--sigma2", type=_positive_float, default=1e-3,
                       help="noise variance (normalised units)")
        p.add_argument("--device", default="auto")
        p.add_argument("--seed", type=int, default=0,
                       help="seed of every random component (same inputs + seed: same batch)")
        p.add_argument("--cache", default=None,
                       help="directory for resumable pool features (rerun resumes there)")
        p.add_argument("--no-plot", action="store_true")
        p.add_argument("-v", "--verbose", action="store_true",
                       help="log progress and show tracebacks of errors")
        if demo:
            p.add_argument("--out", default="demo_out", help="output directory")
            p.add_argument("--max-pool", type=_positive_int, default=None,
                           help="use at most this many pool frames (faster trial runs)")
        else:
            p.add_argument("--train", required=True, help="labelled structures (any ASE format)")
            p.add_argument("--pool", required=True, help="candidate structures (any ASE format)")
            p.add_argument("-o", "--output", default="selected.extxyz")

    learn = sub.add_parser("learn", help="run (or resume) active-learning rounds from a TOML "
                           "config: select, label, fine-tune, evaluate")
    learn.add_argument("--config", required=True, help="run config (docs/active_learning.md)")
    learn.add_argument("-v", "--verbose", action="store_true", help="log and show tracebacks")
    selection_args(sub.add_parser("select", help="select a batch from a pool"), demo=False)
    selection_args(sub.add_parser("demo", help="run a selection on the bundled OC20 frames"),
                   demo=True)
    return parser


def run_selection(model, train, pool, *, n_to_select, kind="joint", parameters=None,
                  n_features=256, force_rows="probes", n_probes=4, shortlist=None, sigma2=1e-3,
                  device="auto", seed=0, cache=None, progress_bar=True):
    """Featurise ``train`` and ``pool`` with one model, PV-screen the pool, LCMD the shortlist.

    Parameters
    ----------
    model : str or skntk.models.MLIP
    train, pool : list of ase.Atoms
    n_to_select : int
        Batch size B.
    seed : int, default=0
        Seed of every random component (NTK sketch and probes, LCMD's gram sketch): the same
        inputs and seed give the same selection in every run.

    Returns
    -------
    result : dict
        ``selected`` (indices into pool, in order), ``pv`` (n_pool,) scores, ``shortlist``
        indices, ``features`` (pool FeatureBlocks), ``timings`` (seconds per stage).

    Raises
    ------
    ValueError
        Before any featurisation: a model file that cannot be loaded, a bad structure (named as
        ``train[i]`` / ``pool[i]``), ``n_to_select`` above the distinct pool structures,
        ``shortlist < n_to_select``, a structure whose force rows would not fit in memory
        (:class:`~skntk.transformers.InsufficientMemoryError`).

    Notes
    -----
    Repeated pool structures (:func:`skntk.io.unique_structures`) are featurised and considered
    once (a ``UserWarning`` counts them); indices and scores refer to the pool as given.
    """
    from skntk.atoms import validate_structures
    from skntk.cache import transform_cached
    from skntk.io import unique_structures
    from skntk.models import load
    from skntk.selection.lcmd import LCMDSelector
    from skntk.selection.pv import ChunkedPosteriorVarianceSelector
    from skntk.transformers import ForceNTKTransformer

    timings = {}
    t = time.perf_counter()
    handle = _load_model(load, model, device)
    timings["load model"] = time.perf_counter() - t
    # everything that can be refused is refused before the first structure is featurised
    train = validate_structures(train, species=handle.species, name="train")
    pool = validate_structures(pool, species=handle.species, name="pool")
    first, inverse = unique_structures(pool)
    n_dup = len(pool) - len(first)
    if n_dup:
        warnings.warn(f"pool has {n_dup} duplicate structures (same numbers, positions, cell, "
                      f"pbc); each is a candidate once.", UserWarning, stacklevel=2)
    if n_to_select > len(first):
        raise ValueError(f"n_to_select={n_to_select} exceeds the {len(first)} distinct pool "
                         f"structures ({n_dup} of the {len(pool)} are duplicates).")
    if shortlist is not None and shortlist < n_to_select:
        raise ValueError(f"shortlist={shortlist} is smaller than n_to_select={n_to_select}: "
                         f"LCMD picks the batch from the shortlist.")
    pool = [pool[i] for i in first]

    if parameters is None:  # the subset each backend chose by measurement (docs/backends.md)
        parameters = "default"
    ntk = ForceNTKTransformer(handle, kind=kind, parameters=parameters, n_features=n_features,
                              force_rows=force_rows, n_probes=n_probes, device=device,
                              random_state=seed, progress_bar=progress_bar)
    ntk.fit(train)
    ntk.check_memory(train, validate=False)
    ntk.check_memory(pool, validate=False)
    t = time.perf_counter()
    G_train = ntk.transform(train)
    timings["features: train"] = time.perf_counter() - t
    t = time.perf_counter()
    G_pool = (transform_cached(ntk, pool, cache) if cache else ntk.transform(pool))
    timings["features: pool"] = time.perf_counter() - t

    M = shortlist if shortlist is not None else max(5 * n_to_select, 50)
    M = min(M, len(pool))
    t = time.perf_counter()
    pv = ChunkedPosteriorVarianceSelector(sigma2=sigma2, shortlist_size=M)
    Psi_train = pv.fit_transform(G_train)
    scores = pv.score_samples(G_pool)
    Psi_pool = pv.transform(G_pool)  # posterior features, carrying the top-M shortlist
    timings["PV screen"] = time.perf_counter() - t
    t = time.perf_counter()
    # the seed reaches every random component: the NTK sketch and probes above, LCMD's gram sketch
    # here (used only when the exact gram route does not fit in memory); PV has none
    lcmd = LCMDSelector(n_to_select=n_to_select, random_state=seed).fit(Psi_train)
    selected = lcmd.select(Psi_pool)
    timings["LCMD"] = time.perf_counter() - t
    # indices into the pool as given (duplicates share their first copy's scores and rows)
    selected, short = first[np.asarray(selected)], first[np.asarray(Psi_pool.shortlist)]
    scores = np.asarray(scores)[inverse]
    if n_dup:
        G_pool = G_pool[inverse]
    return {"selected": selected, "pv": scores, "shortlist": short, "features": G_pool,
            "timings": timings}


def _load_model(load, model, device):
    """The handle of ``model``; an unreadable model file is a ValueError naming it."""
    if hasattr(model, "energy_and_forces"):
        return model
    try:
        return load(model, device=device)
    except (ValueError, ImportError, FileNotFoundError):
        raise
    except Exception as err:  # e.g. a pickle error from a file that is not a model
        first_line = (str(err).strip().splitlines() or [""])[0]
        if len(first_line) > 120 and ". " in first_line:  # its first sentence
            first_line = first_line[:first_line.index(". ") + 1]
        raise ValueError(f"model {str(model)!r} could not be loaded as a model file "
                         f"({type(err).__name__}: {first_line}).") from err


def _describe(atoms) -> str:
    sid = atoms.info.get("sid")
    frame = atoms.info.get("frame")
    name = atoms.get_chemical_formula()
    return f"{name} sid={sid} frame={frame}" if sid is not None else name


def _plot(path, result):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pv, sel, shortlist = result["pv"], result["selected"], result["shortlist"]
    G = result["features"]
    # one vector per structure: the energy row for energy/joint blocks, else the block's RMS row
    if G.kind in ("energy", "joint", "plain"):
        Z = G.rows[G.offsets[:-1]]
    else:
        Z = np.sqrt(np.add.reduceat(G.rows**2, G.offsets[:-1], axis=0))
    Z = Z - Z.mean(0)
    U, S, _ = np.linalg.svd(Z, full_matrices=False)
    xy = U[:, :2] * S[:2]
    if xy.shape[1] < 2:  # fewer than two structures or feature directions: pad with zeros
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    lo = max(float(pv.min()), 1e-12)
    hi = max(float(pv.max()), lo)
    if hi <= lo * (1 + 1e-9):  # one structure, or all alike: a decade around the value
        lo, hi = lo / 10, hi * 10
    bins = np.logspace(np.log10(lo), np.log10(hi), 30)
    a.hist(pv, bins=bins, color="0.75", label=f"pool (n={len(pv)})")
    a.hist(pv[shortlist], bins=bins, histtype="step", lw=2, color="C1",
           label=f"shortlist (M={len(shortlist)})")
    a.hist(pv[sel], bins=bins, color="C3", alpha=0.8, label=f"selected (B={len(sel)})")
    a.set_xscale("log")
    a.set_xlabel("posterior variance (trace)")
    a.set_ylabel("structures")
    a.legend()
    b.scatter(xy[:, 0], xy[:, 1], s=8, c="0.7", label="pool")
    b.scatter(xy[shortlist, 0], xy[shortlist, 1], s=10, c="C1", label="shortlist")
    b.scatter(xy[sel, 0], xy[sel, 1], s=60, marker="*", c="C3", label="selected")
    for rank, i in enumerate(sel):
        b.annotate(str(rank + 1), xy[i], fontsize=7)
    b.set_title("energy NTK rows, first two principal components", fontsize=9)
    b.set_xlabel("feature PC 1")
    b.set_ylabel("feature PC 2")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _report(result, pool, out_path, plot_path):
    lines = [f"pool: {len(pool)} structures; shortlist {len(result['shortlist'])}; "
             f"selected {len(result['selected'])}", "time per stage:"]
    lines += [f"  {k:<18s} {v:8.2f} s" for k, v in result["timings"].items()]
    lines.append(" rank  pool idx        PV  structure")
    for rank, i in enumerate(result["selected"]):
        lines.append(f" {rank + 1:4d}  {i:8d}  {result['pv'][i]:.3e}  {_describe(pool[i])}")
    lines.append(f"pool PV: median {np.median(result['pv']):.3e}, max {result['pv'].max():.3e}")
    lines.append(f"wrote {out_path}" + (f" and {plot_path}" if plot_path else ""))
    return "\n".join(lines)


def _write_selected(path, pool, result):
    import ase.io

    frames = []
    for rank, i in enumerate(result["selected"]):
        atoms = pool[i].copy()
        atoms.calc = pool[i].calc
        atoms.info.update(pool_index=int(i), selection_rank=rank, pv=float(result["pv"][i]))
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")


def main(argv=None) -> int:
    """Entry point; returns the exit code (2 for bad input: one ``error: ...`` line on stderr,
    a traceback only with ``-v``)."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "learn":
        return _learn(args)
    try:
        return _select(args)
    except _INPUT_ERRORS as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


def _read(path, option):
    """Structures of the file given to ``option``; errors name the option, file and frame."""
    from skntk.io import read_structures

    try:
        frames = read_structures(path)
    except (ValueError, OSError) as err:
        kind = FileNotFoundError if isinstance(err, FileNotFoundError) else (
            OSError if isinstance(err, OSError) else ValueError)
        raise kind(f"{option}: {err}") from err
    if not frames:
        raise ValueError(f"{option}: {path} holds no structures.")
    return frames


def _check_output_file(path: Path, option: str) -> None:
    """Refuse an output file that cannot be written, before any work is done."""
    parent = path.parent
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a directory; give a file name.")
    if not parent.is_dir():
        raise FileNotFoundError(f"{option} {path}: directory {parent} does not exist.")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{option} {path}: directory {parent} is not writable.")


@contextlib.contextmanager
def _one_line_warnings():
    """skntk's own UserWarnings (e.g. duplicate pool structures) as ``warning: ...`` lines on
    stderr; every other warning passes through unchanged."""
    package = str(Path(__file__).resolve().parent)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            yield
    finally:  # re-emitted outside the recording context (inside, each would be recorded again)
        for w in list(caught):
            if issubclass(w.category, UserWarning) and str(w.filename).startswith(package):
                print(f"warning: {w.message}", file=sys.stderr)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _select(args) -> int:
    """``skntk select`` and ``skntk demo``: check outputs, read inputs, select, write."""
    from skntk.io import example_path, read_structures, split_by

    if args.cache is not None and Path(args.cache).exists() and not Path(args.cache).is_dir():
        raise NotADirectoryError(f"--cache {args.cache} exists and is not a directory.")
    if args.command == "demo":
        out_dir = Path(args.out)
        if out_dir.exists() and not out_dir.is_dir():
            raise NotADirectoryError(f"--out {out_dir} exists and is not a directory.")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"--out {out_dir}: cannot create the directory ({err}).") from err
        out_path, plot_path = out_dir / "selected.extxyz", out_dir / "selection.png"
        _check_output_file(out_path, "--out")
        frames = read_structures(example_path())
        sids = sorted({a.info["sid"] for a in frames})
        train_idx, pool_idx = split_by(frames, "sid", sids[:2])
        train = [frames[i] for i in train_idx]
        pool = [frames[i] for i in pool_idx][: args.max_pool]
        print(f"skntk demo: {args.model} {args.kind} NTK, train = {len(train)} frames of "
              f"{sids[:2]}, pool = {len(pool)} frames of {len(sids) - 2} other OC20 relaxations")
    else:
        out_path = Path(args.output)
        _check_output_file(out_path, "-o/--output")
        plot_path = out_path.with_suffix(".png")
        train, pool = _read(args.train, "--train"), _read(args.pool, "--pool")
    if args.no_plot:
        plot_path = None
    if args.n_to_select > len(pool):
        raise ValueError(f"-n {args.n_to_select} exceeds the {len(pool)} pool structures")
    if args.shortlist is not None and args.shortlist < args.n_to_select:
        raise ValueError(f"--shortlist {args.shortlist} is smaller than -n {args.n_to_select}: "
                         f"the batch is picked from the shortlist.")
    with _one_line_warnings():
        result = run_selection(
            args.model, train, pool, n_to_select=args.n_to_select, kind=args.kind,
            parameters=args.parameters, n_features=args.n_features, force_rows=args.force_rows,
            n_probes=args.n_probes, shortlist=args.shortlist, sigma2=args.sigma2,
            device=args.device, seed=args.seed, cache=args.cache,
            progress_bar=sys.stderr.isatty())
    _write_selected(out_path, pool, result)
    summary = {k: v for k, v in result.items() if k in ("timings",)}
    summary["selected"] = result["selected"].tolist()
    (out_path.parent / (out_path.stem + "_report.json")).write_text(json.dumps(summary, indent=1))
    if plot_path:
        try:
            _plot(plot_path, result)
        except ImportError:
            logger.warning("matplotlib is not installed (pip install skntk[plot]): no plot.")
            plot_path = None
        except Exception as err:  # the plot is a by-product: never lose the selection over it
            if args.verbose:
                raise
            print(f"warning: no plot ({type(err).__name__}: {err})", file=sys.stderr)
            plot_path = None
    print(_report(result, pool, out_path, plot_path))
    return 0


def _learn(args) -> int:
    """``skntk learn``: one line on stderr and exit code 2 for bad input (``-v``: traceback)."""
    from skntk.al.config import load_config, run_config

    try:
        cfg = load_config(args.config)
        result = run_config(cfg, progress_bar=sys.stderr.isatty())
    except (ValueError, TypeError, KeyError, FileNotFoundError, ImportError, OSError) as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(cfg["output"])
    for h in result.history:
        errs = ", ".join(f"{name}: E {m['energy_mae']:.4f} eV/atom, F {m['force_mae']:.4f} eV/Å"
                         for name, m in h["metrics"].items())
        print(f"round {h['round']}: {h['n_labelled']} labelled" + (f"; {errs}" if errs else ""))
    print(f"{len(result.selected)} structures labelled ({len(result.failed)} failed); outputs in "
          f"{out}/ (history.json, labelled.extxyz, model, learning_curve.png)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

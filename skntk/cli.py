"""Command line: ``skntk select`` (a selection run), ``skntk demo`` (one on bundled data),
``featurize``, ``learn`` and ``uncertainty`` (error bars of a fine-tuned model).

Only this module (with its part :mod:`skntk._cli_uncertainty`) writes to stdout.
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


def _checked(convert, expected, valid, refusal):
    """An argparse type: ``convert(text)``, refused unless ``valid(value)``.

    ``expected`` names what an unparsable text should have been; ``refusal`` is the message for
    a parsed value that is not valid, formatted with ``value`` and ``text``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(refusal.format(value=value, text=text))
        return value

    return parse


#: argparse types: an integer >= 1; a finite float > 0; a seed in 0..2**32 - 1; a number of
#: workers, >= 1 or negative (-1: all cores).
_positive_int = _checked(int, "a positive integer", lambda v: v >= 1, "must be >= 1; got {value}")
_positive_float = _checked(float, "a positive number", lambda v: v > 0 and np.isfinite(v),
                           "must be a finite number > 0; got {text}")
_seed = _checked(int, "an integer seed", lambda v: 0 <= v < 2**32,
                 f"must be an integer in 0..{2**32 - 1}; got {{value}}")
_n_jobs = _checked(int, "an integer", lambda v: v != 0,
                   "must be a number of workers >= 1, or -1 for all cores; got 0")


#: Errors that mean bad input: one line on stderr and exit code 2 (``-v`` shows the traceback).
_INPUT_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, ImportError, OSError,
                 MemoryError)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skntk", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def selection_args(p, demo, featurize=False):
        p.add_argument("--model", default="sevennet-0",
                       help="sevennet-0, chgnet-0.3.0, a MACE .model file or a built-in model file")
        if not featurize:
            p.add_argument("-n", "--n-to-select", type=_positive_int, default=10,
                           help="batch size B")
        p.add_argument("--kind", default="joint", choices=["energy", "force", "joint"])
        p.add_argument("--parameters", default=None,
                       help="parameter subset (readout, last_block, all); default: the backend's "
                            "default_subset (SevenNet-0: last_block)")
        p.add_argument("--n-features", type=_positive_int, default=256, help="sketch dimension d")
        p.add_argument("--force-rows", default="probes", choices=["exact", "probes", "auto"])
        p.add_argument("--n-probes", type=_positive_int, default=4)
        if not featurize:
            p.add_argument("--shortlist", type=_positive_int, default=None,
                           help="PV shortlist size M before LCMD (default: max(5 B, 50))")
            p.add_argument("--sigma2", type=_positive_float, default=1e-3,
                           help="noise variance (normalised units)")
        p.add_argument("--device", default="auto")
        p.add_argument("--seed", type=_seed, default=0,
                       help="seed of every random component (same inputs + seed: same batch)")
        p.add_argument("--cache", default=None, required=featurize,
                       help="feature cache directory: pool features in shards (a rerun resumes "
                            "there and recomputes nothing it holds)")
        p.add_argument("--n-jobs", type=_n_jobs, default=None,
                       help="featurisation worker processes (joblib; -1: all cores)")
        p.add_argument("--scheduler-address", default=None,
                       help="featurise on a Dask cluster: address of its scheduler "
                            "(tcp://host:8786)")
        if not featurize:
            p.add_argument("--no-plot", action="store_true")
        p.add_argument("-v", "--verbose", action="store_true",
                       help="log progress and show tracebacks of errors")
        if demo:
            p.add_argument("--out", default="demo_out", help="output directory")
            p.add_argument("--max-pool", type=_positive_int, default=None,
                           help="use at most this many pool frames (faster trial runs)")
        else:
            p.add_argument("--train", required=True, help="labelled structures (any ASE format)")
            p.add_argument("--pool", required=True,
                           help="candidate structures: a file (any ASE format, streamed), an "
                                "ASE .db or a quoted glob pattern")
            if not featurize:
                p.add_argument("-o", "--output", default="selected.extxyz")
                p.add_argument("--scores", default=None,
                               help="also write the PV of every pool structure to this CSV")

    learn = sub.add_parser("learn", help="run (or resume) active-learning rounds from a TOML "
                           "config: select, label, fine-tune, evaluate")
    learn.add_argument("--config", required=True, help="run config (docs/active_learning.md)")
    learn.add_argument("-v", "--verbose", action="store_true", help="log and show tracebacks")
    selection_args(sub.add_parser("featurize", help="featurise a pool into the feature cache "
                                  "(shards; resumable; --n-jobs or a Dask cluster)"),
                   demo=False, featurize=True)
    selection_args(sub.add_parser("select", help="select a batch from a pool"), demo=False)
    selection_args(sub.add_parser("demo", help="run a selection on the bundled OC20 frames"),
                   demo=True)
    from skntk import _cli_uncertainty

    _cli_uncertainty.add_parser(sub)
    return parser


def _featurizer(model, train, *, kind="joint", parameters=None, n_features=256,
                force_rows="probes", n_probes=4, device="auto", seed=0, progress_bar=True):
    """``(fitted ForceNTKTransformer, validated train structures, seconds to load the model)``.

    An unreadable model file or a bad train structure (named ``train[i]``) is a ValueError."""
    from skntk.atoms import validate_structures
    from skntk.linalg import InsufficientMemoryError
    from skntk.models import load
    from skntk.transformers import ForceNTKTransformer

    t = time.perf_counter()
    handle = _load_model(load, model, device)
    loaded = time.perf_counter() - t
    train = validate_structures(train, species=handle.species, name="train")
    if parameters is None:  # the subset each backend chose by measurement (docs/backends.md)
        parameters = "default"
    ntk = ForceNTKTransformer(handle, kind=kind, parameters=parameters, n_features=n_features,
                              force_rows=force_rows, n_probes=n_probes, device=device,
                              random_state=seed, progress_bar=progress_bar)
    try:
        ntk.fit(train)
    except InsufficientMemoryError as err:  # name the option: "--n-features 1000000000 needs"
        raise InsufficientMemoryError(str(err).replace(f"n_features={n_features}",
                                                       f"--n-features {n_features}", 1)) from err
    ntk.check_memory(train, validate=False)
    return ntk, train, loaded


def _featurize_pool(ntk, pool, directory, *, n_jobs=None, scheduler_address=None,
                    progress_bar=True, option=None):
    """:func:`skntk.parallel.featurize` of ``pool``; errors prefixed with ``option``."""
    from skntk.parallel import featurize

    return featurize(ntk, pool, directory, n_jobs=n_jobs, scheduler_address=scheduler_address,
                     progress_bar=progress_bar, error_prefix=option)


@contextlib.contextmanager
def _cache_dir(cache):
    """``cache`` itself, or a temporary directory removed afterwards."""
    if cache is not None:
        yield cache
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="skntk-features-") as d:
        yield d


#: Pools up to this size get the feature scatter panel in the plot (it loads every row).
_PLOT_MAX_POOL = 20_000


def run_selection(model, train, pool, *, n_to_select, kind="joint", parameters=None,
                  n_features=256, force_rows="probes", n_probes=4, shortlist=None, sigma2=1e-3,
                  device="auto", seed=0, cache=None, n_jobs=None, scheduler_address=None,
                  progress_bar=True, pool_option=None):
    """Featurise ``train`` and ``pool`` with one model and select with the PV → LCMD pipeline.

    :func:`~skntk.pipeline.make_pv_lcmd_pipeline` is the library's one selection path: it
    featurises the pool into the feature cache (``cache``, or a temporary one) in shards
    (:func:`skntk.parallel.featurize`: streamed, resumable, ``n_jobs`` workers or a Dask
    cluster), sets repeated structures and copies of ``train`` aside, and screens the shards:
    PV keeps its streamed top-M, LCMD loads only those rows. This function adds what the
    command line reports.

    Parameters
    ----------
    model : str or skntk.models.MLIP
    train : list of ase.Atoms
    pool : list of ase.Atoms, path, glob or iterator
        Candidate structures (a file is streamed, never held whole).
    n_to_select : int
        Batch size B.
    shortlist : int or None, default=None
        PV shortlist size M (``None``: :func:`~skntk.pipeline.default_shortlist_size`,
        ``max(5 B, 50)``); at most the distinct candidates.
    seed : int, default=0
        Seed of every random component (NTK sketch and probes, LCMD's gram sketch): the same
        inputs and seed give the same selection in every run.
    cache : str or None
        Feature cache directory (a rerun resumes there and recomputes nothing it holds).
    n_jobs, scheduler_address
        Featurisation workers (joblib), or the address of a Dask scheduler.
    pool_option : str or None
        Prefix of errors about the pool (the CLI's ``--pool``).

    Returns
    -------
    result : dict
        ``selected`` (pool indices, in order), ``pv`` (n_pool,) scores, ``shortlist`` (pool
        indices), ``frames`` (pool index → ase.Atoms of the selected structures), ``features``
        (pool FeatureBlocks, or None above :data:`_PLOT_MAX_POOL` structures), ``n_pool``,
        ``timings`` (seconds per stage).

    Raises
    ------
    ValueError
        A model file that cannot be loaded, a bad structure (``train[i]``, or the pool's file
        and frame), ``n_to_select`` above the distinct pool structures, ``shortlist <
        n_to_select``, a structure whose force rows would not fit in memory.

    Notes
    -----
    Repeated pool structures are featurised and considered once (a ``UserWarning`` counts
    them); indices and scores refer to the pool as given.
    """
    from skntk.pipeline import default_shortlist_size, make_pv_lcmd_pipeline

    if shortlist is not None and shortlist < n_to_select:
        raise ValueError(f"shortlist={shortlist} is smaller than n_to_select={n_to_select}: "
                         f"LCMD picks the batch from the shortlist.")
    from skntk.selection._posterior import check_posterior_memory

    timings = {}
    ntk, train, timings["load model"] = _featurizer(
        model, train, kind=kind, parameters=parameters, n_features=n_features,
        force_rows=force_rows, n_probes=n_probes, device=device, seed=seed,
        progress_bar=progress_bar)
    check_posterior_memory(ntk.n_features_out_, name="--n-features")  # before the pool
    with _cache_dir(cache) as directory:
        # the seed reaches every random component: the NTK sketch and probes (ntk), LCMD's gram
        # sketch (used only when the exact gram route does not fit in memory); PV has none
        pipe = make_pv_lcmd_pipeline(
            ntk, n_to_select=n_to_select,
            shortlist_size=shortlist if shortlist is not None else default_shortlist_size(
                n_to_select), sigma2=sigma2, random_state=seed, progress_bar=progress_bar,
            device=_selection_device(device), feature_cache=directory, n_jobs=n_jobs,
            scheduler_address=scheduler_address, error_prefix=pool_option)
        t = time.perf_counter()
        pipe.fit(train)
        timings["features: train"] = time.perf_counter() - t  # and the posterior's fit
        with warnings.catch_warnings():  # M above the distinct candidates: PV keeps them all
            warnings.filterwarnings("ignore", r"shortlist_size=\d+ is greater than", UserWarning)
            selected = pipe.select(pool)
        timings["features: pool"] = pipe.timings_["features"]
        timings["PV screen"] = pipe.timings_["pv"]
        timings["LCMD"] = pipe.timings_["lcmd"]
        feats = pipe.pool_features_  # the pool's distinct structures, copies of train included
        G_pool = feats.take(feats.inverse) if feats.n_pool <= _PLOT_MAX_POOL else None
        cand_index = (np.arange(feats.n_pool) if pipe.pool_index_ is None
                      else pipe.pool_index_)  # pool index of each candidate
        # scores per pool position (duplicates share their first copy's; copies of labelled
        # structures, never candidates, have none: NaN)
        pv = np.full(len(feats), np.nan)
        pv[feats.inverse[cand_index]] = pipe["pv"].scores_
        scores = pv[feats.inverse]
        short = cand_index[pipe["pv"].shortlist_idx_]
    return {"selected": selected, "pv": scores, "shortlist": short, "features": G_pool,
            "frames": _frames_at(pool, selected), "n_pool": feats.n_pool, "timings": timings}


def _frames_at(source, indices):
    """``{i: ase.Atoms}`` of the pool positions ``indices`` (the source streamed once more)."""
    from skntk.io import iter_structures

    want, out = {int(i) for i in indices}, {}
    if not want:
        return out
    last = max(want)
    for k, atoms in enumerate(iter_structures(source)):
        if k in want:
            out[k] = atoms
        if k >= last:
            break
    return out


def run_featurize(model, train, pool, *, cache, kind="joint", parameters=None, n_features=256,
                  force_rows="probes", n_probes=4, device="auto", seed=0, n_jobs=None,
                  scheduler_address=None, progress_bar=True, pool_option=None):
    """Featurise ``pool`` into the feature cache ``cache``, resumably (train features are small
    and computed by ``select``).

    The transformer is fitted on ``train`` exactly as :func:`run_selection` fits it, so a later
    ``skntk select`` with the same settings and ``--cache`` finds every pool row cached.

    Returns
    -------
    result : dict
        ``n_pool``, ``n_distinct``, ``computed`` and ``cached`` structure counts, ``timings``.
    """
    timings = {}
    ntk, train, timings["load model"] = _featurizer(
        model, train, kind=kind, parameters=parameters, n_features=n_features,
        force_rows=force_rows, n_probes=n_probes, device=device, seed=seed,
        progress_bar=progress_bar)
    t = time.perf_counter()
    feats = _featurize_pool(ntk, pool, cache, n_jobs=n_jobs, scheduler_address=scheduler_address,
                            progress_bar=progress_bar, option=pool_option)
    timings["features: pool"] = time.perf_counter() - t
    return {"n_pool": feats.n_pool, "n_distinct": len(feats), "computed": feats.stats["computed"],
            "cached": feats.stats["cached"], "timings": timings}


def _selection_device(device):
    """The selection's products run where the features were computed when that is a GPU."""
    if str(device) == "auto" or str(device).startswith("cuda"):
        return str(device)
    return None


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
    if G is None:  # a large pool: the histogram only (the scatter would load every row)
        fig, a = plt.subplots(figsize=(6, 4.2))
        _pv_histogram(a, pv, sel, shortlist)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
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
    _pv_histogram(a, pv, sel, shortlist)
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


def _pv_histogram(a, pv, sel, shortlist):
    pv = np.where(np.isfinite(pv), pv, np.nan)  # copies of labelled structures have no PV
    lo = max(float(np.nanmin(pv)), 1e-12)
    hi = max(float(np.nanmax(pv)), lo)
    if hi <= lo * (1 + 1e-9):  # one structure, or all alike: a decade around the value
        lo, hi = lo / 10, hi * 10
    bins = np.logspace(np.log10(lo), np.log10(hi), 30)
    a.hist(pv[np.isfinite(pv)], bins=bins, color="0.75", label=f"pool (n={len(pv)})")
    a.hist(pv[shortlist], bins=bins, histtype="step", lw=2, color="C1",
           label=f"shortlist (M={len(shortlist)})")
    a.hist(pv[sel], bins=bins, color="C3", alpha=0.8, label=f"selected (B={len(sel)})")
    a.set_xscale("log")
    a.set_xlabel("posterior variance (trace)")
    a.set_ylabel("structures")
    a.legend()


def _report(result, out_path, plot_path):
    frames = result["frames"]
    lines = [f"pool: {result['n_pool']} structures; shortlist {len(result['shortlist'])}; "
             f"selected {len(result['selected'])}", "time per stage:"]
    lines += [f"  {k:<18s} {v:8.2f} s" for k, v in result["timings"].items()]
    lines.append(" rank  pool idx        PV  structure")
    for rank, i in enumerate(result["selected"]):
        lines.append(f" {rank + 1:4d}  {i:8d}  {result['pv'][i]:.3e}  {_describe(frames[i])}")
    lines.append(f"pool PV: median {np.nanmedian(result['pv']):.3e}, "
                 f"max {np.nanmax(result['pv']):.3e}")
    lines.append(f"wrote {out_path}" + (f" and {plot_path}" if plot_path else ""))
    return "\n".join(lines)


def _write_selected(path, result):
    import ase.io

    frames = []
    for rank, i in enumerate(result["selected"]):
        src = result["frames"][int(i)]
        atoms = src.copy()
        atoms.calc = src.calc
        atoms.info.update(pool_index=int(i), selection_rank=rank, pv=float(result["pv"][i]))
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")


def _write_scores(path, result):
    """CSV of every pool structure: pool index, PV, shortlisted, selection rank (-1: none)."""
    n = len(result["pv"])
    rank = np.full(n, -1, dtype=np.int64)
    rank[result["selected"]] = np.arange(len(result["selected"]))
    short = np.zeros(n, dtype=np.int64)
    short[result["shortlist"]] = 1
    table = np.column_stack([np.arange(n), result["pv"], short, rank])
    np.savetxt(path, table, delimiter=",", fmt=["%d", "%.10e", "%d", "%d"],
               header="pool_index,pv,shortlisted,selection_rank", comments="")


def main(argv=None) -> int:
    """Entry point; returns the exit code (2 for bad input: one ``error: ...`` line on stderr,
    a traceback only with ``-v``; 130 after Ctrl-C: one ``interrupted: ...`` line saying what was
    kept and how to resume)."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "learn":
            return _learn(args)
        try:
            if args.command == "uncertainty":
                from skntk import _cli_uncertainty

                return _cli_uncertainty.run(args, _read, _check_output_file, _load_model)
            return _featurize(args) if args.command == "featurize" else _select(args)
        except _INPUT_ERRORS as err:
            if args.verbose:
                raise
            print(f"error: {err}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        if args.verbose:
            raise
        print(f"interrupted: {_interrupt_note(args)}", file=sys.stderr)
        return 130


def _interrupt_note(args) -> str:
    """What an interrupted command kept on disk and how to resume it (one sentence)."""
    if args.command == "learn":
        try:
            from skntk.al.config import load_config

            ckpt = Path(load_config(args.config)["output"]) / "checkpoint"
        except Exception:  # noqa: BLE001 - interrupted before the config was read: nothing kept
            return "nothing was saved; run the command again."
        return (f"the finished rounds and every label are kept in {ckpt}; run `skntk learn "
                f"--config {args.config}` again to resume from the last finished round.")
    if args.command == "uncertainty":
        return "nothing was written (the scored frames are written at the end); run it again."
    if args.cache is not None:
        return (f"the pool features computed so far are kept in --cache {args.cache}; run the "
                f"same command again to resume (nothing cached is recomputed).")
    return ("nothing was saved (no --cache); run the command again, with --cache DIR to keep the "
            "pool features of an interrupted run.")


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
    """skntk's own warnings (UserWarnings such as duplicate pool structures, and skntk's warning
    classes such as a damaged cache file's CorruptCacheWarning) as ``warning: ...`` lines on
    stderr; every other warning passes through unchanged."""
    package = str(Path(__file__).resolve().parent)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            yield
    finally:  # re-emitted outside the recording context (inside, each would be recorded again)
        for w in list(caught):
            ours = w.category.__module__.startswith("skntk") or (
                issubclass(w.category, UserWarning) and str(w.filename).startswith(package))
            if ours:
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
        if args.scores is not None:
            _check_output_file(Path(args.scores), "--scores")
        pool = _check_source(args.pool, "--pool")  # streamed by the featurisation, never held
        train = _read(args.train, "--train")
    if args.no_plot:
        plot_path = None
    if isinstance(pool, list) and args.n_to_select > len(pool):
        raise ValueError(f"-n {args.n_to_select} exceeds the {len(pool)} pool structures")
    if args.shortlist is not None and args.shortlist < args.n_to_select:
        raise ValueError(f"--shortlist {args.shortlist} is smaller than -n {args.n_to_select}: "
                         f"the batch is picked from the shortlist.")
    with _one_line_warnings():
        result = run_selection(
            args.model, train, pool, n_to_select=args.n_to_select, kind=args.kind,
            parameters=args.parameters, n_features=args.n_features, force_rows=args.force_rows,
            n_probes=args.n_probes, shortlist=args.shortlist, sigma2=args.sigma2,
            device=args.device, seed=args.seed, cache=args.cache, n_jobs=args.n_jobs,
            scheduler_address=args.scheduler_address, progress_bar=sys.stderr.isatty(),
            pool_option="--pool")
    _write_selected(out_path, result)
    if getattr(args, "scores", None):
        _write_scores(args.scores, result)
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
    print(_report(result, out_path, plot_path))
    return 0


def _check_source(source, option):
    """Refuse a pool path that is missing or a directory before any work (a glob must match)."""
    path = Path(source)
    if any(c in str(source) for c in "*?[") and not path.exists():
        import glob

        if not glob.glob(str(source)):
            raise FileNotFoundError(f"{option}: no structure file matches {str(source)!r}.")
        return str(source)
    if not path.exists():
        raise FileNotFoundError(f"{option}: no structure file at {str(path)!r}.")
    if path.is_dir():
        raise IsADirectoryError(f"{option}: {str(path)!r} is a directory, not a structure file.")
    return str(source)


def _featurize(args) -> int:
    """``skntk featurize``: pool features into the cache (shards), resumable."""
    if Path(args.cache).exists() and not Path(args.cache).is_dir():
        raise NotADirectoryError(f"--cache {args.cache} exists and is not a directory.")
    pool = _check_source(args.pool, "--pool")
    train = _read(args.train, "--train")
    with _one_line_warnings():
        result = run_featurize(
            args.model, train, pool, cache=args.cache, kind=args.kind,
            parameters=args.parameters, n_features=args.n_features, force_rows=args.force_rows,
            n_probes=args.n_probes, device=args.device, seed=args.seed, n_jobs=args.n_jobs,
            scheduler_address=args.scheduler_address, progress_bar=sys.stderr.isatty(),
            pool_option="--pool")
    t = result["timings"]["features: pool"]
    print(f"featurised {result['n_pool']} pool structures ({result['n_distinct']} distinct): "
          f"{result['computed']} computed, {result['cached']} already in {args.cache}; "
          f"{t:.1f} s")
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
    if "onthefly" in cfg:
        for h in result.history:
            errs = ", ".join(f"{k}: F {v:.4f} eV/Å (predicted {h['predicted'][k]:.4f})"
                             for k, v in h.get("true", {}).items())
            print(f"refit {h['generation']}: {h['n_labels']} labels after {h['md_steps']} MD "
                  f"steps" + (f"; {errs}" if errs else ""))
        print(f"{len(result.labelled)} frames labelled ({len(result.failed)} failed); stopped: "
              f"{result.stop_reason}; outputs in {out}/ (history.json, checks.json, "
              f"labelled.extxyz, model, onthefly.png)")
        return 0
    for h in result.history:
        errs = ", ".join(f"{name}: E {m['energy_mae']:.4f} eV/atom, F {m['force_mae']:.4f} eV/Å"
                         for name, m in h["metrics"].items())
        print(f"round {h['round']}: {h['n_labelled']} labelled" + (f"; {errs}" if errs else ""))
    print(f"{len(result.selected)} structures labelled ({len(result.failed)} failed); outputs in "
          f"{out}/ (history.json, labelled.extxyz, model, learning_curve.png)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""Running the active-learning evidence: experiment configs, the split of each seed, and one
:class:`skntk.al.ActiveLearningLoop` per (split, method, seed). The command line is ``harness.py``.

``cmd_run`` writes one JSON per (split, method, seed) to ``benchmarks/results/al/<experiment>/`` as
soon as it finishes (keys ``experiment``, ``split``, ``method``, ``seed``, ``config``, ``rounds``:
the loop's history, plus ``selected``, ``failed``, ``seconds``, ``machine``); finished files are
skipped, an unfinished (method, seed) resumes from its loop checkpoint (``.ckpt/``), and the NTK
methods of one seed share their pool features (content-addressed cache ``.features/``).

A config (TOML, read through :func:`skntk.al.config.read_toml`) names the data and the split rule,
the model, the selector options, the fine-tuning recipe, the rounds, the seeds and the methods (see
``configs/``). Paths are relative to the config file. Split rules:

- ``files``: ``n_labelled`` + ``n_pool`` frames drawn from ``source`` (one seed, one draw), test
  sets drawn from their own files (``test.<name> = {file, n}``) or from what ``source`` has left;
- ``shift``: the labelled set from ``labelled_file``; the pool mixes ``pool_files`` with
  ``pool_fractions``; test sets as for ``files``;
- ``sid``: OC20-style relaxations split by ``sid``: ``unseen`` systems (rotated by seed among the
  eligible ones, whose elements all occur in other systems) form the out-of-distribution test set,
  ``test_fraction`` of each other system's frames the in-distribution test set, the rest the pool,
  from which ``n_labelled`` frames start labelled; frames are thinned by ``frame_stride``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parents[1] / "results" / "al"
CONFIGS = Path(__file__).resolve().parent / "configs"
#: Random selection run to ``loop.extended_rounds`` rounds: the curve labels-to-target reads.
EXTENDED = "random_extended"


# -- config and data ------------------------------------------------------------------------------
def load_config(path) -> dict:
    """The experiment config at ``path`` (TOML, read by :func:`skntk.al.config.read_toml`), with
    ``_dir``: the folder its data paths are relative to."""
    from skntk.al.config import read_toml

    path = Path(path).resolve()
    cfg = read_toml(path)
    for key in ("experiment", "model", "methods", "seeds", "data", "loop"):
        if key not in cfg:
            raise ValueError(f"config {str(path)!r} needs '{key}'.")
    cfg["_dir"] = str(path.parent)
    return cfg


def _read(cfg, name):
    from skntk.al.config import config_path
    from skntk.io import read_structures

    return read_structures(config_path(name, cfg["_dir"]))


def _draw(rng, frames, n, tag=None):
    idx = rng.permutation(len(frames))
    chosen = [frames[i] for i in idx[:n]]
    rest = [frames[i] for i in idx[n:]]
    if tag:
        for a in chosen:
            a.info.setdefault("group", tag)
    return chosen, rest


def make_split(cfg, seed):
    """``(labelled, pool, tests, split_name)`` for one seed (the split depends on the seed)."""
    d = cfg["data"]
    rng = np.random.default_rng(seed)
    rule = d["split"]
    tests = {}
    if rule == "files":
        src = _read(cfg, d["source"])
        if d.get("formula_groups"):
            for a in src:
                a.info["group"] = a.get_chemical_formula()
        if d.get("labelled_formula"):  # labelled only from frames of one molecule
            own = [a for a in src if a.get_chemical_formula() == d["labelled_formula"]]
            labelled, _ = _draw(rng, own, d["n_labelled"])
            chosen = {id(a) for a in labelled}
            rest = [a for a in src if id(a) not in chosen]
        else:
            labelled, rest = _draw(rng, src, d["n_labelled"])
        pool, rest = _draw(rng, rest, d.get("n_pool", len(rest)))
        for name, t in d.get("test", {}).items():
            frames = _formula(_read(cfg, t["file"]) if "file" in t else rest, t)
            tests[name], rest2 = _draw(rng, frames, t["n"], tag=name)
            if "file" not in t:
                rest = rest2
        return labelled, pool, tests, f"s{seed}"
    if rule == "shift":
        lab_src = _read(cfg, d["labelled_file"])
        labelled, lab_rest = _draw(rng, lab_src, d["n_labelled"])
        pool = []
        fractions = d.get("pool_fractions", [None] * len(d["pool_files"]))
        for f, frac in zip(d["pool_files"], fractions, strict=True):
            frames = lab_rest if f == d["labelled_file"] else _read(cfg, f)
            for a in frames:
                a.info["group"] = Path(f).stem
            # without pool_fractions every frame of each file (less the labelled ones) is in
            n = len(frames) if frac is None else int(round(frac * d["n_pool"]))
            pool += _draw(rng, frames, n)[0]
        pool = [pool[i] for i in rng.permutation(len(pool))]
        for name, t in d.get("test", {}).items():
            frames = _formula(_read(cfg, t["file"]), t)
            tests[name] = _draw(rng, frames, min(t["n"], len(frames)), tag=name)[0]
        return labelled, pool, tests, f"s{seed}"
    if rule == "sid":
        return _sid_split(cfg, d, seed, rng)
    raise ValueError(f"unknown split rule {rule!r}: expected files, shift or sid.")


def _formula(frames, spec):
    """The frames of ``spec["formula"]`` (a chemical formula such as ``"CH4O"``), or all."""
    if "formula" not in spec:
        return frames
    return [a for a in frames if a.get_chemical_formula() == spec["formula"]]


def eligible_unseen(by_sid):
    """Systems whose every element occurs in some other system (testable when unseen)."""
    els = {s: set(fr[0].numbers.tolist()) for s, fr in by_sid.items()}
    return sorted(s for s in els
                  if els[s] <= set().union(*[e for t, e in els.items() if t != s]))


def _sid_split(cfg, d, seed, rng):
    from collections import defaultdict

    frames = _read(cfg, d["source"])
    by_sid = defaultdict(list)
    for a in frames:
        by_sid[a.info["sid"]].append(a)
    for fr in by_sid.values():
        n = len(fr)
        for k, a in enumerate(fr):
            a.info["stage"] = ("early", "mid", "late")[min(2, 3 * k // n)]
    if d.get("max_atoms"):
        by_sid = {s: fr for s, fr in by_sid.items() if len(fr[0]) <= d["max_atoms"]}
    eligible = eligible_unseen(by_sid)
    n_unseen = d.get("n_unseen", 1)
    start = (seed * n_unseen) % len(eligible)
    unseen = [eligible[(start + k) % len(eligible)] for k in range(n_unseen)]
    # every element of the unseen systems must remain in the other systems
    rest_els = set().union(*[set(fr[0].numbers.tolist()) for s, fr in by_sid.items()
                             if s not in unseen])
    for s in unseen:
        missing = set(by_sid[s][0].numbers.tolist()) - rest_els
        if missing:
            raise ValueError(f"split {seed}: unseen system {s} has elements {sorted(missing)} "
                             f"found in no other system.")
    stride = d.get("frame_stride", 1)
    pool_all, test_in, test_out = [], [], []
    for s, fr in sorted(by_sid.items()):
        fr = fr[::stride]
        if s in unseen:
            test_out += fr
            continue
        idx = rng.permutation(len(fr))
        n_test = int(round(d.get("test_fraction", 0.2) * len(fr)))
        test_in += [fr[i] for i in idx[:n_test]]
        pool_all += [fr[i] for i in idx[n_test:]]
    labelled, pool = _draw(rng, pool_all, d["n_labelled"])
    if d.get("n_pool"):
        pool = _draw(rng, pool, d["n_pool"])[0]
    tests = {"in_distribution": test_in, "unseen_systems": test_out}
    if d.get("n_test"):
        tests = {k: _draw(rng, v, d["n_test"])[0] for k, v in tests.items()}
    return labelled, pool, tests, "unseen-" + "+".join(unseen)


# -- running ---------------------------------------------------------------------------------------
def _machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}"


def _code_version() -> str:
    """skntk's version and, inside a git checkout, the commit the run used."""
    import subprocess

    import skntk

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(skntk.__file__).parent, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{skntk.__version__} {commit.strip()}".strip()


def run_one(cfg, method, seed, out_dir, model):
    from skntk.al import ActiveLearningLoop, PoolOracle
    from skntk.al.config import build_selector
    from skntk.finetune import MLIPRegressor

    labelled, pool, tests, split = make_split(cfg, seed)
    path = out_dir / f"{split}-{method}-{seed}.json"
    if path.exists():
        return path, False
    reg = MLIPRegressor(model, **cfg.get("finetune", {}))
    loop_kw = {k: v for k, v in cfg["loop"].items() if k != "extended_rounds"}
    ckpt = out_dir / ".ckpt" / path.stem
    grown_from = None
    if method == EXTENDED:
        # random at more budgets: the loop's rounds are prefix-stable for a seed, so this run
        # repeats random's rounds and goes on; it starts from random's checkpoint when there is one
        loop_kw["n_rounds"] = cfg["loop"]["extended_rounds"]
        src = out_dir / ".ckpt" / f"{split}-random-{seed}"
        if not ckpt.exists() and (src / "state.json").exists():
            shutil.copytree(src, ckpt)
            grown_from = "random"
    sel = build_selector("random" if method == EXTENDED else method, model, regressor=reg,
                         random_state=seed, **cfg.get("selector", {}))
    t0 = time.perf_counter()
    loop = ActiveLearningLoop(sel, reg, PoolOracle(), test_sets=tests,
                              groups=cfg["data"].get("groups"), random_state=seed,
                              checkpoint_dir=ckpt, feature_cache=out_dir / ".features",
                              progress_bar=False, **loop_kw)
    res = loop.run(labelled, pool)
    record = {
        "experiment": cfg["experiment"], "split": split, "method": method, "seed": seed,
        "config": {k: v for k, v in cfg.items() if not k.startswith("_")},
        "rounds": res.history, "selected": res.selected,
        "failed": {str(k): v for k, v in res.failed.items()},
        "seconds": time.perf_counter() - t0, "machine": _machine(),
        "code": _code_version(),
        "n_labelled0": len(labelled), "n_pool": len(pool),
        "n_test": {k: len(v) for k, v in tests.items()},
    }
    if grown_from:
        record["grown_from"] = grown_from  # ``seconds`` then counts the extra rounds only
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return path, True


def cmd_run(args):
    from skntk.models import load

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    out_dir = Path(args.out) if args.out else RESULTS / cfg["experiment"]
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load(cfg["model"], device=cfg.get("device", "cpu"))
    methods = args.methods or cfg["methods"]
    seeds = args.seeds if args.seeds is not None else cfg["seeds"]
    t_start = time.perf_counter()
    for seed in seeds:
        for method in methods:
            if args.max_hours and time.perf_counter() - t_start > 3600 * args.max_hours:
                print(f"stopping: --max-hours {args.max_hours} reached; rerun to continue")
                return 0
            t0 = time.perf_counter()
            path, ran = run_one(cfg, method, seed, out_dir, model)
            print(f"{'ran' if ran else 'skip'} {path.name} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    return 0

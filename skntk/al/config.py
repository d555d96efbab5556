"""Active-learning runs from a TOML file: the engine of ``skntk learn --config run.toml``.

A config names the model, the data, the selection method, the fine-tuning recipe, the oracle and
the rounds (docs/active_learning.md shows a complete file)::

    output = "al_out"                # history, plot, labelled extxyz, model, checkpoint/
    [model]
    name = "sevennet-0"              # or chgnet-0.3.0, a MACE .model file, a built-in model file
    [data]
    labelled = "train.extxyz"
    pool = "pool.extxyz"
    test = {heldout = "test.extxyz"} # or one path
    [selector]
    method = "pv_lcmd"               # see METHODS
    [finetune]                       # MLIPRegressor parameters
    epochs = 10
    [oracle]
    type = "pool"                    # pool | emt | tblite
    [loop]
    n_rounds = 3
    batch_size = 10
    random_state = 0

:func:`build_selector` is also what the evidence benchmarks use to build each method.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "build_selector", "build_oracle", "load_config", "run_config", "read_toml",
           "config_path"]

#: Selection methods by name (docs/design.md, "The paper's pipeline and the baselines").
METHODS = {
    "random": "uniformly random",
    "maxdist_embedding": "MaxDist (farthest point) on pretrained embeddings",
    "pv_energy": "PV top-B on energy NTK features",
    "pv_force": "PV top-B on force NTK features",
    "pv_lcmd": "joint NTK: PV shortlist -> LCMD (the paper's method)",
    "embedding_pv_lcmd": "pretrained embeddings: PV shortlist -> LCMD",
    "greedy_pv": "greedy batch PV on joint NTK features",
    "pool_variance_reduction": "pool-variance reduction on joint NTK features",
    "lcmd": "joint NTK: LCMD over the whole pool (no PV shortlist)",
    "lcmd_posterior": "joint NTK: LCMD over the whole pool on posterior features",
    "density_pv_lcmd": "joint NTK: PV weighted by the pool's density, shortlist -> LCMD",
    "committee": "query by committee: force disagreement of fine-tuned models",
}

_SECTIONS = {"output", "model", "data", "selector", "finetune", "oracle", "loop", "onthefly",
             "uncertainty"}
#: Keys of the ``[onthefly]`` table: OnTheFlyLearner parameters and ``n_steps``.
_ONTHEFLY_KEYS = {"threshold", "every", "budget", "refit_every", "temperature_K", "timestep_fs",
                  "friction", "reduction", "target_fraction", "window", "n_initial",
                  "min_calibration", "restart", "max_failures", "random_state", "n_steps"}
_NTK_KEYS = {"parameters", "n_features", "sketch", "force_rows", "n_probes", "energy_weight",
             "force_weight", "batch_size", "working_memory", "device", "dtype"}


def build_selector(method, model, *, regressor=None, n_to_select=None, random_state=0,
                   sigma2=1e-3, shortlist_size=None, n_members=4, **ntk):
    """A selector for ``method`` (a key of :data:`METHODS`) on ``model``'s features.

    Parameters
    ----------
    method : str
    model : MLIP
        The pretrained handle the features come from.
    regressor : MLIPRegressor or None
        Required for ``"committee"``.
    n_to_select : int or None
        Budget of the final step (the loop passes its own).
    random_state : int, default=0
        Seed of the features (sketch, probes) and of every random step.
    sigma2 : float, default=1e-3
        Noise variance of the PV steps (normalised features).
    shortlist_size : int or None, default=None
        PV shortlist handed to LCMD (``None``: :func:`skntk.pipeline.default_shortlist_size`
        without a batch size, 50: the loop sets the batch each round).
    n_members : int, default=4
        Committee size.
    **ntk
        :class:`~skntk.transformers.ForceNTKTransformer` parameters (``parameters``,
        ``n_features``, ``force_rows``, ``n_probes``, ...).

    Returns
    -------
    selector : estimator with ``fit(list[Atoms])`` and ``select(list[Atoms], n)``
    """
    from skntk.al.committee import CommitteeSelector
    from skntk.pipeline import SelectionPipeline, default_shortlist_size, make_pv_lcmd_pipeline
    from skntk.selection.baselines import MaxDistSelector, RandomSelector
    from skntk.selection.lcmd import LCMDSelector
    from skntk.selection.pv import ChunkedPosteriorVarianceSelector
    from skntk.transformers import EmbeddingTransformer, ForceNTKTransformer

    unknown = sorted(set(ntk) - _NTK_KEYS)
    if unknown:
        raise ValueError(f"unknown selector option(s) {unknown}; NTK options are "
                         f"{sorted(_NTK_KEYS)}.")
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; expected one of "
                         f"{sorted(METHODS)}.")

    def ntk_features(kind):
        return ForceNTKTransformer(model, kind=kind, random_state=random_state, **ntk)

    def pv(**kw):
        return ChunkedPosteriorVarianceSelector(sigma2, n_to_select=n_to_select, **kw)

    shortlist = shortlist_size if shortlist_size is not None else default_shortlist_size()
    if method == "random":
        return RandomSelector(n_to_select, random_state=random_state)
    if method == "committee":
        if regressor is None:
            raise ValueError("method 'committee' needs the fine-tuning regressor.")
        return CommitteeSelector(regressor, n_members=n_members, n_to_select=n_to_select,
                                 random_state=random_state)
    if method == "maxdist_embedding":
        return SelectionPipeline([("features", EmbeddingTransformer(model)),
                                  ("maxdist", MaxDistSelector(n_to_select))])
    if method == "pv_energy":
        return SelectionPipeline([("features", ntk_features("energy")), ("pv", pv())])
    if method == "pv_force":
        return SelectionPipeline([("features", ntk_features("force")), ("pv", pv())])
    if method == "greedy_pv":
        return SelectionPipeline([("features", ntk_features("joint")), ("pv", pv(greedy=True))])
    if method == "pool_variance_reduction":
        return SelectionPipeline([("features", ntk_features("joint")),
                                  ("pv", pv(criterion="pool_variance_reduction"))])
    if method == "lcmd":
        return SelectionPipeline([("features", ntk_features("joint")),
                                  ("lcmd", LCMDSelector(n_to_select, random_state=random_state))])
    if method == "lcmd_posterior":
        return SelectionPipeline([("features", ntk_features("joint")),
                                  ("lcmd", LCMDSelector(n_to_select, features="posterior",
                                                        sigma2=sigma2, random_state=random_state))])
    features = EmbeddingTransformer(model) if method == "embedding_pv_lcmd" \
        else ntk_features("joint")
    criterion = "density_weighted" if method == "density_pv_lcmd" else "variance"
    return make_pv_lcmd_pipeline(features, n_to_select=n_to_select, shortlist_size=shortlist,
                                 sigma2=sigma2, criterion=criterion, random_state=random_state)


def build_oracle(spec):
    """An oracle from the ``[oracle]`` table: ``type = "pool" | "emt" | "tblite"``."""
    from skntk.al.oracles import CalculatorOracle, PoolOracle

    spec = dict(spec or {})
    kind = spec.pop("type", "pool")
    n_jobs = int(spec.pop("n_jobs", 1))
    if kind == "pool":
        if spec or n_jobs != 1:
            raise ValueError(f"oracle type 'pool' takes no options; got {sorted(spec)}.")
        return PoolOracle()
    if kind == "emt":
        from ase.calculators.emt import EMT

        return CalculatorOracle(EMT(**spec), n_jobs=n_jobs)
    if kind == "tblite":
        try:
            from tblite.ase import TBLite
        except ImportError as err:
            raise ValueError("oracle type 'tblite' needs the tblite package: "
                             "pip install skntk[oracles]") from err
        spec.setdefault("method", "GFN2-xTB")
        spec.setdefault("verbosity", 0)
        return CalculatorOracle(TBLite(**spec), n_jobs=n_jobs)
    raise ValueError(f"unknown oracle type {kind!r}; expected 'pool', 'emt' or 'tblite'.")


def read_toml(path) -> dict:
    """The table of the TOML file ``path``; a missing file or invalid TOML is named in the error.

    The one TOML reader of ``skntk learn`` configs and of the benchmark harness's configs
    (``benchmarks/al/configs/*.toml``).
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist.")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config file {str(path)!r} is not valid TOML: {err}") from err


def config_path(p, base) -> Path:
    """A path named in a config: ``p`` as is when absolute, else relative to the folder ``base``
    (the config file's folder)."""
    q = Path(p)
    return q if q.is_absolute() else Path(base) / q


def load_config(path) -> dict:
    """Read and check a run config (TOML); paths are resolved against the file's folder."""
    path = Path(path)
    cfg = read_toml(path)
    unknown = sorted(set(cfg) - _SECTIONS)
    if unknown:
        raise ValueError(f"config {str(path)!r} has unknown section(s) {unknown}; expected "
                         f"{sorted(_SECTIONS)}.")
    data = cfg.get("data", {})
    onthefly = "onthefly" in cfg
    for key in ("start",) if onthefly else ("labelled", "pool"):
        if key not in data:
            what = "the MD's starting structure" if key == "start" else "a structure file"
            raise ValueError(f"config {str(path)!r} needs data.{key} ({what}).")
    if onthefly:
        bad = sorted(set(cfg["onthefly"]) - _ONTHEFLY_KEYS)
        if bad:
            raise ValueError(f"config {str(path)!r}: unknown key(s) {bad} in [onthefly]; valid "
                             f"keys are {sorted(_ONTHEFLY_KEYS)}.")
    base = path.parent

    def resolve(p):
        q = config_path(p, base)
        if not q.is_file():
            raise FileNotFoundError(f"data file {str(q)!r} (from {str(path)!r}) does not exist.")
        return q

    data = dict(data)
    for key in ("labelled", "pool", "start"):
        if key in data:
            data[key] = resolve(data[key])
    test = data.get("test", {})
    data["test"] = {"test": resolve(test)} if isinstance(test, str) else \
        {k: resolve(v) for k, v in test.items()}
    cfg["data"] = data
    cfg["output"] = config_path(cfg.get("output", "al_out"), base)
    from skntk.models import is_model_name

    model = cfg.setdefault("model", {})
    model.setdefault("name", "sevennet-0")
    if isinstance(model["name"], str) and not is_model_name(model["name"]):
        model["name"] = str(config_path(model["name"], base))  # a file, like the data files
    return cfg


def run_onthefly_config(cfg, *, progress_bar=False):
    """Run (or resume) on-the-fly learning (an ``[onthefly]`` config) and write its outputs.

    Writes to ``cfg["output"]``: ``checkpoint/`` (resumable state: labels, models, calibration
    pairs, the trajectory at the checks, the log), ``history.json``, ``checks.json``,
    ``labelled.extxyz``, the last model (``model.<ext>``) and ``onthefly.png`` (with
    matplotlib): the predicted error along the trajectory, the threshold and the labels.

    Returns
    -------
    result : OnTheFlyResult
    """

    from skntk.al.onthefly import OnTheFlyLearner
    from skntk.finetune import MLIPRegressor
    from skntk.io import read_structures
    from skntk.models import load
    from skntk.uncertainty import ForceUncertainty

    out = Path(cfg["output"])
    out.mkdir(parents=True, exist_ok=True)
    mcfg = dict(cfg["model"])
    model = load(mcfg.pop("name"), **mcfg)
    ft = dict(cfg.get("finetune", {}))
    ft.setdefault("progress_bar", False)
    try:
        regressor = MLIPRegressor(model, **ft)
        uncertainty = ForceUncertainty(**cfg.get("uncertainty", {}))
    except TypeError as err:
        raise ValueError(f"[finetune] / [uncertainty]: {err}") from None
    oracle_spec = dict(cfg.get("oracle") or {})
    if oracle_spec.get("type", "pool") == "pool":
        raise ValueError("on-the-fly learning needs a calculator oracle: [oracle] type = "
                         "'emt' or 'tblite'.")
    oracle = build_oracle(oracle_spec)
    otf = dict(cfg["onthefly"])
    n_steps = int(otf.pop("n_steps", 1000))
    data = cfg["data"]
    start = read_structures(data["start"])[0]
    tests = {k: read_structures(v) for k, v in data.get("test", {}).items()}
    learner = OnTheFlyLearner(model, oracle, regressor=regressor, uncertainty=uncertainty,
                              test_sets=tests, checkpoint_dir=out / "checkpoint",
                              progress_bar=progress_bar, **otf)
    result = learner.run(start, n_steps)
    (out / "checks.json").write_text(json.dumps(result.checks, indent=1))
    _write_outputs(out, result, "onthefly.png")
    return result


def _write_outputs(out, result, plot_name):
    """``history.json``, ``labelled.extxyz``, the model in its own format and ``result.plot()``
    (``plot_name``; with matplotlib) of a finished run in ``out``."""
    import ase.io

    (out / "history.json").write_text(json.dumps(result.history, indent=1))
    if result.labelled:
        ase.io.write(out / "labelled.extxyz", result.labelled, format="extxyz")
    try:
        result.model.save(out / _model_filename(result.model))
    except (NotImplementedError, ValueError) as err:
        logger.warning("the model could not be saved in its own format (%s); its weights are in "
                       "checkpoint/", err)
    if plot_name is None:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ax = result.plot()
        ax.figure.tight_layout()
        ax.figure.savefig(out / plot_name, dpi=120)
        plt.close(ax.figure)
    except ImportError:
        logger.warning("matplotlib is not installed (pip install skntk[plot]): no plot.")


def run_config(cfg, *, progress_bar=False):
    """Run (or resume) the loop a config describes and write its outputs.

    Writes to ``cfg["output"]``: ``checkpoint/`` (resumable state), ``history.json``,
    ``learning_curve.png`` (with matplotlib), ``labelled.extxyz`` (initial + new labels) and
    the fine-tuned model (``model.<ext>`` in the backend's format).

    Returns
    -------
    result : ActiveLearningResult
    """

    if "onthefly" in cfg:
        return run_onthefly_config(cfg, progress_bar=progress_bar)
    from skntk.al.loop import ActiveLearningLoop
    from skntk.finetune import MLIPRegressor
    from skntk.io import read_structures
    from skntk.models import load

    out = Path(cfg["output"])
    out.mkdir(parents=True, exist_ok=True)  # before any work: an unwritable output fails now
    mcfg = dict(cfg["model"])
    _check_keys("model", mcfg, {"name", "device", "dtype"})
    ft = dict(cfg.get("finetune", {}))
    _check_keys("finetune", ft, set(MLIPRegressor().get_params()) - {"model"})
    loop_cfg = dict(cfg.get("loop", {}))
    _check_keys("loop", loop_cfg, {"n_rounds", "batch_size", "random_state", "refeaturize",
                                   "groups", "feature_cache"})
    model = load(mcfg.pop("name"), **mcfg)
    ft.setdefault("progress_bar", False)
    regressor = MLIPRegressor(model, **ft)
    seed = loop_cfg.get("random_state", 0)
    loop_cfg["random_state"] = seed
    sel = dict(cfg.get("selector", {}))
    method = sel.pop("method", "pv_lcmd")
    selector = build_selector(method, model, regressor=regressor, random_state=seed, **sel)
    oracle = build_oracle(cfg.get("oracle"))
    data = cfg["data"]
    labelled, pool = read_structures(data["labelled"]), read_structures(data["pool"])
    tests = {k: read_structures(v) for k, v in data["test"].items()}
    loop = ActiveLearningLoop(selector, regressor, oracle, test_sets=tests,
                              checkpoint_dir=out / "checkpoint", progress_bar=progress_bar,
                              **loop_cfg)
    result = loop.run(labelled, pool)
    _write_outputs(out, result, "learning_curve.png" if tests else None)
    return result


def _check_keys(section: str, table: dict, valid: set) -> None:
    """Refuse keys of the config table ``[section]`` that nothing reads, listing the valid ones."""
    unknown = sorted(set(table) - valid)
    if unknown:
        raise ValueError(f"config section [{section}] has unknown key(s) {unknown}; valid keys "
                         f"are {sorted(valid)}.")


def _model_filename(model) -> str:
    return model.model_filename

"""Structures in, feature blocks out: NTK features and pretrained embeddings of an MLIP.

:class:`ForceNTKTransformer` turns ``list[ase.Atoms]`` into energy, force or joint NTK rows
(:mod:`skntk.ntk`) packed as :class:`skntk.blocks.FeatureBlocks`;
:class:`EmbeddingTransformer` gives
the "pretrained embedding" baseline, one row per structure.
"""

from __future__ import annotations

import logging
import os
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from ase import Atoms
from sklearn import get_config
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from skntk import linalg, ntk
from skntk._sklearn_compat import Interval, StrOptions, _fit_context
from skntk.atoms import as_atoms_list, neighbor_pairs
from skntk.blocks import FeatureBlocks
from skntk.models import resolve_model
from skntk.models._util import resolve_device
from skntk.models.base import MLIP, deterministic_on_cpu, module_state

logger = logging.getLogger(__name__)

__all__ = ["ForceNTKTransformer", "EmbeddingTransformer", "InsufficientMemoryError",
           "FORCE_ROW_BYTES_PER_EDGE", "DEFAULT_FORCE_ROW_BYTES_PER_EDGE"]

#: Peak memory of force (or joint) NTK rows of one structure, in bytes per edge (directed
#: neighbour pair within the model's cutoff), by backend class: one double-backward graph is
#: alive at a time, and it grows with the edges. Measured on the CPU:
#:
#: - ``SevenNetMLIP`` (SevenNet-0, float32): 500-atom Cu cell 6.2 GB, about 12 MB per atom at ~42
#:   edges per atom (fcc Cu, 5 Å cutoff) → ~3.0e5 bytes per edge; a 2,048-atom cell needs ~26 GB;
#: - ``BuiltinMLIP`` (n_hidden=64, n_blocks=2, float64, peak RSS growth on 108- and 500-atom Cu
#:   cells): 1.4–2.0e4 bytes per edge → 2.5e4.
#:
#: Each backend states its value as ``MLIP.force_row_bytes_per_edge`` (SevenNet-0's for CHGNet,
#: MACE and your own, not measured for them); these names are kept for code that read them.
#: ``SKNTK_SKIP_MEMORY_CHECK=1`` skips the check.
FORCE_ROW_BYTES_PER_EDGE = {"SevenNetMLIP": 3.0e5, "BuiltinMLIP": 2.5e4}
DEFAULT_FORCE_ROW_BYTES_PER_EDGE = 3.0e5


#: A structure's rows, the sketch, or the posterior would need more memory than is available
#: (raised before the work); a ``ValueError`` and a ``MemoryError``.
InsufficientMemoryError = linalg.InsufficientMemoryError


def _available_memory(device) -> float | None:
    """Bytes available for a new allocation on ``device``: free CUDA memory, or on the CPU the
    smaller of ``MemAvailable`` and the address-space limit's headroom
    (:func:`skntk.linalg.available_host_memory`); ``None`` when unknown (no check then)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return float(torch.cuda.mem_get_info(device)[0])
        except Exception:  # pragma: no cover - driver-specific
            return None
    if device.type != "cpu":
        return None
    return linalg.available_host_memory()


_gb = linalg.format_bytes


_DTYPES = {"float32": torch.float32, "float64": torch.float64}


#: Shared graphs of exact and probe force rows cost (rows x graph size): structures share a graph
#: only while the graph stays this small (per-call overhead dominates there).
_SMALL_GRAPH_ATOMS = 48


def _auto_route(n_atoms_max: int | None, d: int, n_probes: int, forward_ad: bool) -> str:
    """``force_rows="auto"``: the cheaper exact route (reverse ~``3N`` VJPs per structure,
    forward ~``1.5 d``: ``d`` JVPs at ~3 evaluations against ~2 per VJP) when it costs at most
    ``4 * n_probes`` VJPs for the largest structure, else probes (``n_probes`` VJPs)."""
    if n_atoms_max is None:
        return "probes"
    costs = {"exact": 3 * n_atoms_max}
    if forward_ad:
        costs["forward"] = 1.5 * d
    route = min(costs, key=costs.get)
    return route if costs[route] <= 4 * n_probes else "probes"


def _groups(X, batch_size: int, max_atoms: int | None) -> list[tuple[int, int]]:
    """Consecutive ``(start, stop)`` ranges of at most ``batch_size`` structures and, when
    ``max_atoms`` is set, at most ``max_atoms`` atoms (a larger structure gets its own range)."""
    out, start, atoms = [], 0, 0
    for k, a in enumerate(X):
        full = k - start >= batch_size or (max_atoms is not None and atoms + len(a) > max_atoms)
        if k > start and full:
            out.append((start, k))
            start, atoms = k, 0
        atoms += len(a)
    out.append((start, len(X)))
    return out


class _AtomsTransformerMixin:
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.requires_fit = True
        return tags

    def _batches(self, n: int, size: int):
        starts = range(0, n, size)
        return tqdm(starts, desc=type(self).__name__, disable=not self.progress_bar,
                    unit="batch", leave=False)

    def _eval_dtype(self, model: MLIP):
        if self.dtype is not None:
            return _DTYPES[self.dtype]
        return next(model.module.parameters()).dtype


class ForceNTKTransformer(_AtomsTransformerMixin, TransformerMixin, BaseEstimator):
    """Energy, force or joint NTK features of an MLIP, one block of rows per structure.

    For a structure with ``N`` atoms and the parameter subset ``θ_S`` (``P`` entries), with a seeded
    sketch ``R`` (P x d, entries N(0, 1/d), shared by every call with the same ``random_state``):

    - ``kind="energy"``: one row ``w_E g_E R``, ``g_E = ∂E/∂θ_S`` (``∂(E/N)/∂θ_S`` when
      ``normalize="atoms"``);
    - ``kind="force"``: ``3N`` rows ``w_F J_F R`` with ``J_F = ∂F/∂θ_S`` (atom-major), or, with
      probes, ``s = n_probes`` rows ``w_F Zᵀ J_F R / √s`` for Rademacher ``Z`` (3N x s), whose
      Gram matrix is unbiased for the exact one;
    - ``kind="joint"``: the energy row followed by the force rows.

    The matrix-valued kernel between structures ``A`` and ``B`` is ``G_A G_Bᵀ``.

    Parameters
    ----------
    model : MLIP or str, default=None
        An MLIP handle (:class:`skntk.models.base.MLIP`; never copied by ``clone``), or the path of
        a file written by :meth:`skntk.models.builtin.BuiltinMLIP.save` (loaded in ``fit``). A raw
        ``torch.nn.Module`` is refused with a ``TypeError``: wrap it in a handle.
    kind : {"energy", "force", "joint"}, default="energy"
    parameters : str or list of str, default="default"
        Parameter subset: a name the model declares (``"readout"``, ``"last_block"``, ``"all"``),
        ``"default"`` (the backend's ``default_subset``, chosen by measurement: SevenNet-0
        ``"last_block"``, CHGNet ``"all"``, built-in and MACE ``"readout"``), or fnmatch patterns
        over parameter names.
    n_features : int or None, default=512
        Sketch dimension ``d``; ``None`` keeps the exact gradient (``d = P``).
    sketch : {"countsketch", "gaussian"}, default="countsketch"
        The random sketch ``R`` (:class:`skntk.ntk.ParameterSketch`): ``"countsketch"``, one
        random ±1 per parameter, applied in O(P) per row whatever ``d``; ``"gaussian"``, dense
        N(0, 1/d) entries (the reference, and the only sketch before skntk 0.2). Both are
        unbiased, ``E[⟨gR, g'R⟩] = ⟨g, g'⟩``; they give different features, so the cache keys and
        stored results record the choice.
    force_rows : {"auto", "exact", "forward", "probes"}, default="auto"
        ``"exact"``: reverse-over-reverse, ~``3N`` vector-Jacobian products (VJPs) of the force
        graph per structure; ``"forward"``: forward-over-reverse, the same rows from ``d``
        forward-mode derivatives per batch, ~``1.5 d`` VJPs' worth per structure, for models that
        declare forward-mode AD (``functional = True``: built-in, SevenNet, CHGNet, MACE);
        ``"probes"``: ``n_probes`` Rademacher probe rows, ``n_probes`` VJPs. ``"auto"``: the
        cheaper exact route when its cost is at most ``4 * n_probes`` VJPs for the largest
        structure passed to ``fit``, else ``"probes"`` (decided once in ``fit`` so train and pool
        rows match; ``"probes"`` when ``fit`` gets no structures).
    n_probes : int, default=8
        Probes per structure for ``force_rows="probes"``.
    energy_weight, force_weight : float, default=1.0
        ``w_E`` and ``w_F`` (relative weights of energy and force rows).
    normalize : {"atoms"} or None, default="atoms"
        ``"atoms"``: energy rows are gradients of the energy per atom.
    device : str, default="auto"
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda:0"``; an unavailable CUDA
        device falls back to the CPU with a warning. Stored as ``device_``.
    batching : {"auto", "shared", "per_structure"}, default="auto"
        How structures share graphs; the rows do not depend on it (tested), only the cost does.
        ``"shared"``: up to ``batch_size`` structures per graph (exact and probe force rows: at
        most 48 atoms per graph), per-structure gradients by one-hot vector-Jacobian products
        through the shared graph (the route of skntk < 0.2); ``"per_structure"``: one graph per
        structure; ``"auto"`` (resolved in ``fit`` as ``batching_``): shared for
        ``force_rows="forward"`` (each forward-mode pass costs the whole batch), on CUDA
        (unmeasured), and for backends whose vectorised backward is cheap
        (``batched_double_backward``: the built-in model) when the subset holds at most a quarter
        of the model's parameters (a one-hot product then stops early); per structure elsewhere
        (SevenNet, CHGNet, MACE on the CPU: a per-structure gradient through a shared graph costs
        the whole graph, and these backends gain nothing from batching on the CPU; measured in
        docs/ntk.md).
    batch_size : int, default=32
        Structures per shared graph.
    working_memory : float or None, default=None
        Memory budget in MiB; ``None`` uses scikit-learn's ``working_memory``
        (``sklearn.get_config()``, 1024 by default). It bounds the unsketched gradient rows
        (``P`` entries each) held at once, and the rows of one vectorised backward: the graph of
        each batch is measured while it is built (:class:`skntk.ntk.GraphMeter`) and at most
        ``budget // graph bytes`` rows go through one backward. With shared graphs, the first
        graph's measured bytes per atom cap the atoms of the graphs after it.
    dtype : {"float32", "float64"} or None, default=None
        Dtype of the model evaluation (``None``: the model's own). Rows come out as float64.
    random_state : int, RandomState instance or None, default=None
        Seed of the sketch and the probes; an int gives identical features in every call.
    progress_bar : bool, default=False
        Show a tqdm bar over batches.

    Attributes
    ----------
    device_ : torch.device
        Device used.
    model_ : MLIP
        The resolved handle (the ``model`` parameter itself when it is a handle).
    parameter_names_ : list of str
        Names of the parameters in the subset.
    n_params_ : int
        ``P``.
    n_features_out_ : int
        ``d``.
    force_rows_ : {"exact", "forward", "probes"}
        Resolved force-row route.
    batching_ : {"shared", "per_structure"}
        Resolved ``batching``.
    seed_ : int
        Seed of the sketch and the probes.
    sketch_ : skntk.ntk.ParameterSketch
        The sketch (chunks of ``R`` regenerated from ``seed_`` when not cached).

    Examples
    --------
    >>> from ase.build import molecule
    >>> from skntk.models.builtin import BuiltinMLIP
    >>> model = BuiltinMLIP([1, 6, 8], n_hidden=16, n_blocks=1)
    >>> X = [molecule("H2O"), molecule("CH3OH")]
    >>> ntk = ForceNTKTransformer(model, kind="joint", n_features=32, random_state=0).fit(X)
    >>> G = ntk.transform(X)
    >>> G.kind, G.n_rows_per_structure.tolist(), G.n_features
    ('joint', [10, 19], 32)
    """

    _parameter_constraints = {
        "model": [MLIP, str, os.PathLike, torch.nn.Module, None],
        "kind": [StrOptions({"energy", "force", "joint"})],
        "parameters": [str, list, tuple],
        "n_features": [Interval(Integral, 1, None, closed="left"), None],
        "sketch": [StrOptions(set(ntk.SKETCH_METHODS))],
        "force_rows": [StrOptions({"auto", "exact", "forward", "probes"})],
        "n_probes": [Interval(Integral, 1, None, closed="left")],
        "energy_weight": [Interval(Real, 0, None, closed="left")],
        "force_weight": [Interval(Real, 0, None, closed="left")],
        "normalize": [StrOptions({"atoms"}), None],
        "device": [str, torch.device],
        "batching": [StrOptions({"auto", "shared", "per_structure"})],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "working_memory": [Interval(Real, 0, None, closed="neither"), None],
        "dtype": [StrOptions(set(_DTYPES)), None],
        "random_state": ["random_state"],
        "progress_bar": ["boolean"],
    }

    def __init__(self, model=None, *, kind="energy", parameters="default", n_features=512,
                 sketch="countsketch", force_rows="auto", n_probes=8, energy_weight=1.0,
                 force_weight=1.0, normalize="atoms", device="auto", batching="auto",
                 batch_size=32, working_memory=None, dtype=None, random_state=None,
                 progress_bar=False):
        self.model = model
        self.kind = kind
        self.parameters = parameters
        self.n_features = n_features
        self.sketch = sketch
        self.force_rows = force_rows
        self.n_probes = n_probes
        self.energy_weight = energy_weight
        self.force_weight = force_weight
        self.normalize = normalize
        self.device = device
        self.batching = batching
        self.batch_size = batch_size
        self.working_memory = working_memory
        self.dtype = dtype
        self.random_state = random_state
        self.progress_bar = progress_bar

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X=None, y=None):
        """Resolve the model, device, parameter subset, sketch seed and force-row route.

        Cheap: no model evaluation.

        Parameters
        ----------
        X : list of ase.Atoms, ase.Atoms, iterator or path, default=None
            Training structures; checked against the model's elements and used by
            ``force_rows="auto"``.
        y : None
            Ignored.

        Returns
        -------
        self : ForceNTKTransformer
        """
        model = resolve_model(self.model, type(self).__name__)
        self.device_ = resolve_device(self.device, cuda_fallback=True)
        named = model.parameters(self.parameters)
        self.parameter_names_ = [n for n, _ in named]
        self.n_params_ = int(sum(p.numel() for _, p in named))
        self.seed_ = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        n_atoms_max = None
        if X is not None:
            X = model.validate(X)
            n_atoms_max = max(len(a) for a in X)
        d = self.n_params_ if self.n_features is None else int(self.n_features)
        route = self.force_rows
        if route == "auto":
            route = _auto_route(n_atoms_max, d, self.n_probes, model.supports_torch_func)
        if route == "forward" and not model.supports_torch_func:
            raise ValueError(f"force_rows='forward' needs a model with forward-mode AD support; "
                             f"{type(model).__name__} does not declare it (functional=False).")
        self.force_rows_ = route
        self.model_ = model
        self.batching_ = self._resolve_batching(model)
        eval_dtype = self._eval_dtype(model)
        self.sketch_ = ntk.ParameterSketch([tuple(p.shape) for _, p in named], self.n_features,
                                           self.seed_, method=self.sketch, dtype=eval_dtype,
                                           device=self.device_)
        self.n_features_out_ = self.sketch_.d
        self._check_feature_memory(X)
        if self.n_features is None and self.n_params_ > 100_000:
            warnings.warn(f"n_features=None keeps all {self.n_params_} gradient entries per row; "
                          f"set n_features to sketch them.", UserWarning, stacklevel=2)
        return self

    def transform(self, X) -> FeatureBlocks:
        """NTK rows of every structure.

        Parameters
        ----------
        X : list of ase.Atoms of length n_structures, ase.Atoms, iterator or path

        Returns
        -------
        G : FeatureBlocks
            Float64 rows of shape (n_rows, n_features_out_); blocks of 1 (energy), 3N (force),
            1 + 3N (joint) rows, or ``n_probes`` / ``1 + n_probes`` rows with probes
            (``kind="plain"`` then, as the rows have no per-atom layout).

        Raises
        ------
        ValueError
            Before any featurisation: a bad structure (:func:`skntk.atoms.validate_structures`),
            or one whose force/joint rows would not fit in memory
            (:class:`InsufficientMemoryError`, see :meth:`check_memory`). During it: a structure
            whose rows are non-finite, named by its index in ``X`` and its formula.
        """
        check_is_fitted(self, "sketch_")
        model = self.model_
        X = model.validate(X)
        named = model.parameters(self.parameters)
        names = [n for n, _ in named]
        if names != self.parameter_names_:
            raise ValueError("the model's parameter subset changed since fit; refit the "
                             "transformer.")
        self.check_memory(X, validate=False)
        groups = self._graph_groups(model, X)
        blocks = []
        dtype = self._eval_dtype(model)
        meter, sized = ntk.GraphMeter(), False
        with module_state(model.module, device=self.device_, dtype=dtype, train=False,
                          requires_grad=set(names)), deterministic_on_cpu(self.device_), \
                tqdm(total=len(X), desc=type(self).__name__, unit="structure",
                     disable=not self.progress_bar, leave=False) as bar:
            params = [p for n, p in model.module.named_parameters() if n in set(names)]
            while groups:
                start, stop = groups.pop(0)
                blocks.append(self._transform_batch(model, X[start:stop], params, names, start,
                                                    meter))
                bar.update(stop - start)
                if not sized and groups:
                    # size the remaining shared graphs from the first one's measured bytes
                    sized = True
                    groups = self._resize_groups(X, groups, meter.bytes,
                                                 sum(len(a) for a in X[start:stop]))
        return FeatureBlocks.concatenate(blocks)

    def _rows_per_structure(self, n_atoms: int) -> int:
        """Rows of one structure of ``n_atoms`` atoms (energy, force or joint; probes)."""
        if self.kind == "energy":
            return 1
        force = self.n_probes if self.force_rows_ == "probes" else 3 * n_atoms
        return force + (self.kind == "joint")

    def _check_feature_memory(self, X) -> None:
        """Refuse in ``fit``, before any featurisation, parameters whose sketch and rows cannot
        fit: the sketch applied to one batch (:meth:`skntk.ntk.ParameterSketch.peak_bytes`) plus
        the float64 rows of the train structures ``X`` (one structure's rows without ``X``),
        against :func:`skntk.linalg.available_host_memory` (or free CUDA memory)."""
        if linalg.memory_check_skipped():
            return
        available = _available_memory(self.device_)
        if available is None:
            return
        sizes = [len(a) for a in X] if X is not None else [1]
        per_row = self.n_features_out_ * 8.0
        batch_rows = (min(self.batch_size, len(sizes)) if self.kind == "energy"
                      else self._rows_per_structure(max(sizes)))
        sketch = float(self.sketch_.peak_bytes(batch_rows))
        rows = per_row * sum(self._rows_per_structure(n) for n in sizes)
        if sketch + rows <= available:
            return
        what = (f"n_features={self.n_features}" if self.n_features is not None else
                f"n_features=None (all {self.n_params_} gradient entries)")
        raise InsufficientMemoryError(
            f"{what} needs about {_gb(sketch + rows)} before any structure is featurised (the "
            f"sketch applied to a batch of {batch_rows} rows {_gb(sketch)}, the "
            f"{'train' if X is not None else 'first'} rows {_gb(rows)}); {_gb(available)} "
            f"available on {self.device_}; use a smaller n_features (the default is 256) "
            f"(SKNTK_SKIP_MEMORY_CHECK=1 skips this check).")

    def estimate_memory(self, X, *, validate=True) -> np.ndarray:
        """Estimated peak bytes of featurising each structure of ``X`` on its own.

        Force and joint rows: the model's ``force_row_bytes_per_edge``
        (:class:`~skntk.models.base.MLIP`) times the structure's edges (neighbour pairs within
        ``model_.cutoff``, counted with ASE's neighbour list). Energy rows: 0 (one single
        backward; not estimated).

        Returns
        -------
        n_bytes : ndarray of shape (n_structures,)
        """
        check_is_fitted(self, "sketch_")
        X = self.model_.validate(X) if validate else as_atoms_list(X)
        if self.kind == "energy":
            return np.zeros(len(X))
        per_edge = self.model_.force_row_bytes_per_edge
        return per_edge * self._edge_counts(X)

    def _edge_counts(self, X) -> np.ndarray:
        cutoff = float(self.model_.cutoff)
        return np.array([len(neighbor_pairs(a.positions, a.cell.array, a.pbc, cutoff)[0])
                         for a in X], dtype=np.float64)

    def check_memory(self, X, *, validate=True) -> None:
        """Refuse ``X`` before any featurisation when one structure's force rows would not fit.

        Compares :meth:`estimate_memory` of every structure with the memory available on
        ``device_`` (free CUDA memory, or ``MemAvailable`` from ``/proc/meminfo``; skipped where
        neither is known, for ``kind="energy"``, and when the environment variable
        ``SKNTK_SKIP_MEMORY_CHECK=1`` is set).

        Raises
        ------
        InsufficientMemoryError
            A ``ValueError`` naming the structure, its atom and edge counts, the estimate and
            the available memory.
        """
        if self.kind == "energy" or linalg.memory_check_skipped():
            return
        available = _available_memory(self.device_)
        if available is None:
            return
        X = self.model_.validate(X) if validate else as_atoms_list(X)
        need = self.estimate_memory(X, validate=False)
        if not len(need) or need.max() <= available:
            return
        i = int(np.argmax(need > available))
        per_edge = self.model_.force_row_bytes_per_edge
        edges = int(round(need[i] / per_edge))
        raise InsufficientMemoryError(
            f"X[{i}] ({X[i].get_chemical_formula()}) has {len(X[i])} atoms and ~{edges} edges; "
            f"{self.kind} rows by {self.force_rows_!r} need about {_gb(need[i])}, "
            f"{_gb(available)} available on {self.device_}; use kind='energy', fewer atoms "
            f"per structure, or a machine with more memory (SKNTK_SKIP_MEMORY_CHECK=1 skips "
            f"this check)."
        )

    def _transform_batch(self, model, atoms, params, names, start, meter=None) -> FeatureBlocks:
        out = self._batch_rows(model, atoms, params, names, meter)
        bad = [b for b, rows in enumerate(out) if not np.all(np.isfinite(rows))]
        if not bad:
            return out
        if len(atoms) > 1:
            # a NaN in one structure of a shared graph can reach every structure's rows: find the
            # culprit by featurising the affected structures one by one
            parts = [out[b] for b in range(len(out))]
            for b in bad:
                parts[b] = self._batch_rows(model, atoms[b:b + 1], params, names)
                if not np.all(np.isfinite(parts[b].rows)):
                    self._raise_non_finite(atoms[b], start + b)
            logger.warning("structures %s gave non-finite rows only in a shared graph; "
                           "recomputed one by one.", [start + b for b in bad])
            return FeatureBlocks.concatenate(parts)
        self._raise_non_finite(atoms[0], start)

    def _raise_non_finite(self, atoms, i):
        raise ValueError(
            f"X[{i}] ({atoms.get_chemical_formula()}): {type(self.model_).__name__} gave "
            f"non-finite (NaN/inf) {self.kind} NTK rows for this structure; check its geometry "
            f"(distances, cell) and that the model supports it."
        )

    def _resolve_batching(self, model) -> str:
        if self.batching != "auto":
            return self.batching
        forward = self.kind != "energy" and self.force_rows_ == "forward"
        n_all = sum(p.numel() for p in model.module.parameters() if p.requires_grad)
        shallow = self.n_params_ <= 0.25 * max(1, n_all)
        shared = forward or self.device_.type == "cuda" or (model.batched_double_backward
                                                            and shallow)
        return "shared" if shared else "per_structure"

    def _graph_groups(self, model, X, max_atoms=None) -> list[tuple[int, int]]:
        """Ranges of ``X`` that share one graph (see ``batching``), of at most ``max_atoms``
        atoms when given."""
        if self.batching_ == "per_structure":
            return [(i, i + 1) for i in range(len(X))]
        forward = self.kind != "energy" and self.force_rows_ == "forward"
        small = None if self.kind == "energy" or forward else _SMALL_GRAPH_ATOMS
        if max_atoms is not None:
            small = max_atoms if small is None else min(small, max_atoms)
        return _groups(X, self.batch_size, small)

    def _memory_budget(self) -> int:
        """``working_memory`` in bytes."""
        mib = self.working_memory if self.working_memory is not None else \
            get_config()["working_memory"]
        return int(mib * 2 ** 20)

    def _max_unsketched(self) -> int:
        """Unsketched gradient rows (``n_params_`` entries of the evaluation dtype) that fit in
        ``working_memory``."""
        itemsize = torch.empty((), dtype=self.sketch_.dtype).element_size()
        return max(1, self._memory_budget() // (max(1, self.n_params_) * itemsize))

    def _resize_groups(self, X, groups, graph_bytes, n_atoms):
        """Regroup the shared graphs left so that each one's graph (``graph_bytes`` per
        ``n_atoms`` atoms, measured on the first) stays within ``working_memory``."""
        if self.batching_ != "shared" or graph_bytes <= self._memory_budget():
            return groups
        cap = max(1, int(self._memory_budget() * n_atoms // graph_bytes))
        start = groups[0][0]
        logger.info("graph of %d atoms took %.0f MiB (> working_memory); at most %d atoms per "
                    "graph from now on", n_atoms, graph_bytes / 2 ** 20, cap)
        return [(start + a, start + b) for a, b in self._graph_groups(None, X[start:], cap)]

    def _batch_rows(self, model, atoms, params, names, meter=None) -> FeatureBlocks:
        batch = model.collate(atoms, self.device_)
        # Common random numbers: probes are keyed by atom count, not by position in X, so
        # near-identical structures (frames of one trajectory) get near-identical rows and a
        # structure's rows do not depend on where it sits in X.
        return ntk.observation_rows(
            model, batch, params, self.sketch_, self.kind, self.force_rows_,
            (self.energy_weight, self.force_weight), names=names, n_probes=self.n_probes,
            probe_seed=self.seed_, per_atom=self.normalize == "atoms",
            max_unsketched=min(256, self._max_unsketched()),
            memory_budget=self._memory_budget(), meter=meter)

    def get_feature_names_out(self, input_features=None):
        """Names ``forcentk<kind>0 .. forcentk<kind>{d-1}`` of the feature columns.

        Returns
        -------
        names : ndarray of str of shape (n_features_out_,)
        """
        check_is_fitted(self, "sketch_")
        return np.asarray([f"forcentk{self.kind}{i}" for i in range(self.n_features_out_)],
                          dtype=object)


class EmbeddingTransformer(_AtomsTransformerMixin, TransformerMixin, BaseEstimator):
    """The model's invariant per-atom embeddings averaged per structure.

    The "pretrained embedding" baseline: ``x = (1/N) Σ_i h_i`` with ``h_i`` the model's
    :meth:`~skntk.models.base.MLIP.embeddings` of atom ``i``.

    Parameters
    ----------
    model : MLIP or str, default=None
        A handle declaring ``"embeddings"`` in ``implemented_properties``, or the path of a saved
        built-in model.
    device : str, default="auto"
    batch_size : int, default=32
    dtype : {"float32", "float64"} or None, default=None
    progress_bar : bool, default=False

    Attributes
    ----------
    device_ : torch.device
    model_ : MLIP
    n_features_out_ : int
        Embedding width (from one single-atom evaluation in ``fit``).

    Examples
    --------
    >>> from ase.build import molecule
    >>> from skntk.models.builtin import BuiltinMLIP
    >>> emb = EmbeddingTransformer(BuiltinMLIP([1, 6, 8], n_hidden=16, n_blocks=1)).fit()
    >>> emb.transform([molecule("H2O"), molecule("CH4")]).shape
    (2, 16)
    """

    _parameter_constraints = {
        "model": [MLIP, str, os.PathLike, torch.nn.Module, None],
        "device": [str, torch.device],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "dtype": [StrOptions(set(_DTYPES)), None],
        "progress_bar": ["boolean"],
    }

    def __init__(self, model=None, *, device="auto", batch_size=32, dtype=None,
                 progress_bar=False):
        self.model = model
        self.device = device
        self.batch_size = batch_size
        self.dtype = dtype
        self.progress_bar = progress_bar

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X=None, y=None):
        """Resolve model and device (cheap); checks ``X``'s elements when given."""
        model = resolve_model(self.model, type(self).__name__)
        if "embeddings" not in model.implemented_properties:
            raise ValueError(f"{type(model).__name__} does not implement embeddings "
                             f"(implemented_properties={model.implemented_properties}).")
        if X is not None:
            model.validate(X)
        self.device_ = resolve_device(self.device, cuda_fallback=True)
        self.model_ = model
        n_out = getattr(model, "n_embedding", None)
        if n_out is None:  # ask the model: a dimer well inside its cutoff
            z = min(model.species) if model.species else 1
            n_out = self._embed([Atoms([z, z], positions=[[0, 0, 0], [0, 0, 1.5]])]).shape[1]
        self.n_features_out_ = int(n_out)
        return self

    def transform(self, X) -> np.ndarray:
        """Mean embedding per structure.

        Returns
        -------
        X_emb : ndarray of shape (n_structures, n_embedding), float64
        """
        check_is_fitted(self, "model_")
        X = self.model_.validate(X)
        return self._embed(X)

    def _embed(self, X) -> np.ndarray:
        model = self.model_
        out = []
        with module_state(model.module, device=self.device_, dtype=self._eval_dtype(model),
                          train=False), torch.no_grad():
            for start in self._batches(len(X), self.batch_size):
                batch = model.collate(X[start:start + self.batch_size], self.device_)
                h = model.embeddings(batch).double()  # [n_atoms, n_embedding]
                idx = ntk.structure_index(batch.ptr)
                n = (batch.ptr[1:] - batch.ptr[:-1]).to(h.dtype).unsqueeze(1)
                s = torch.zeros(n.shape[0], h.shape[1], dtype=h.dtype, device=h.device)
                rows = (s.index_add(0, idx, h) / n).cpu().numpy()
                bad = ~np.isfinite(rows).all(axis=1)
                if bad.any():
                    k = int(np.flatnonzero(bad)[0])
                    raise ValueError(
                        f"X[{start + k}] ({X[start + k].get_chemical_formula()}): "
                        f"{type(model).__name__} gave non-finite (NaN/inf) embeddings for this "
                        f"structure; check its geometry (distances, cell) and that the model "
                        f"supports it.")
                out.append(rows)
        return np.concatenate(out)

    def get_feature_names_out(self, input_features=None):
        """Names ``embedding0 .. embedding{n_features_out_ - 1}``."""
        check_is_fitted(self, "model_")
        return np.asarray([f"embedding{i}" for i in range(self.n_features_out_)], dtype=object)


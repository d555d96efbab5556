"""Featurise a pool into the feature cache in shards, in parallel (joblib, or a Dask cluster).

:func:`featurize` streams a pool source (an extxyz path read with ``ase.io.iread``, an ``ase.db``,
a glob of files, an iterator or a list of ``ase.Atoms``) in consecutive chunks of ``shard_size``
structures, computes the rows of the structures the cache does not hold yet with a fitted
transformer's ``transform`` in joblib workers, and writes each chunk as one shard of the
content-addressed cache (:mod:`skntk.cache`) from the calling process. It returns a
:class:`~skntk.cache.PoolFeatures` that selectors stream shard by shard.

- **Resumable**: a shard is written atomically as soon as its chunk is done; a rerun (after a
  kill) verifies the shards already there and computes only the structures they miss. A
  corrupted or truncated shard fails its checksum, is deleted (with a
  :class:`~skntk.cache.CorruptCacheWarning`) and its structures are recomputed.
- **Parallel**: ``n_jobs`` joblib workers (loky processes), each sent the fitted transformer and
  a chunk of structures. When the transformer's ``model`` parameter is a name or a file
  (``"sevennet-0"``, a saved model), the network is not sent: each worker process loads it
  itself, once, and checks its weights against the caller's (a digest of every tensor). A model
  handle passed as an object travels with the transformer. On a cluster, run it inside
  ``joblib.parallel_config(backend="dask")`` with a ``dask.distributed.Client``
  (``scheduler_address=`` does that for you): the same code, the workers are Dask's.
- **Identical to serial**: chunks are cut from the pool order alone, so a structure is computed
  with the same neighbours whatever the number of workers.
- **Flat memory**: at most ``pre_dispatch`` chunks of structures and rows are in flight.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from pathlib import Path

import numpy as np

from skntk.cache import FeatureStore, PoolFeatures, model_digest, structure_key, transform_blocks
from skntk.io import DuplicateIndex, duplicate_signature

logger = logging.getLogger(__name__)

__all__ = ["featurize"]

#: Structures per shard by default: large enough for few files, small enough to lose little.
DEFAULT_SHARD_SIZE = 256


class _ModelRef:
    """Stands in for a fitted transformer's ``model_`` on its way to a worker: the worker loads
    the model itself from ``spec`` (a name or a file) and checks its weights against ``digest``
    (the parent's, :func:`skntk.cache.model_digest`)."""

    def __init__(self, spec, owner, digest, dtype=None):
        self.spec, self.owner, self.digest, self.dtype = spec, owner, digest, dtype


#: Models a worker process has loaded, by ``(spec, digest)``: loaded once per process.
_LOADED: dict = {}


def _by_reference(transformer):
    """A shallow copy of ``transformer`` whose ``model_`` is a :class:`_ModelRef` when the model
    has a name or a file (the ``model`` parameter is a string or path, or the handle came from
    :func:`skntk.models.load`, which records ``source``); ``transformer`` itself otherwise."""
    import copy
    import os

    model = getattr(transformer, "model_", None)
    spec = getattr(transformer, "get_params", dict)().get("model")
    if not isinstance(spec, (str, os.PathLike)):
        spec = getattr(model, "source", None)
    if spec is None or not hasattr(model, "module"):
        return transformer
    dtype = getattr(model, "dtype", None)
    out = copy.copy(transformer)
    out.model_ = _ModelRef(os.fspath(spec), type(transformer).__name__, model_digest(model),
                           None if dtype is None else str(dtype).replace("torch.", ""))
    return out


def _resolve_reference(transformer):
    """The transformer with its model loaded in this process (once), verified by digest."""
    import copy

    ref = getattr(transformer, "model_", None)
    if not isinstance(ref, _ModelRef):
        return transformer
    import torch

    from skntk.models import load

    key = (ref.spec, json.dumps(ref.digest, sort_keys=True))
    model = _LOADED.get(key)
    if model is None:
        model = load(ref.spec, device="cpu",
                     dtype=None if ref.dtype is None else getattr(torch, ref.dtype))
        if model_digest(model) != ref.digest:
            raise RuntimeError(
                f"a worker loaded the model {ref.spec!r} with other weights than the calling "
                f"process fitted with (the file changed, or another package version); refit "
                f"the {ref.owner} or pass the model handle itself.")
        _LOADED[key] = model
    out = copy.copy(transformer)
    out.model_ = model
    return out


def _local_device(transformer):
    """With ``device="auto"``, the transformer on this process's own device: a worker on a GPU
    node uses its GPU (one worker per GPU, e.g. dask-cuda's ``CUDA_VISIBLE_DEVICES``), whatever
    the calling process resolved. The sketch is rebuilt there from its seed (the same ``R``) and
    ``batching="auto"`` re-resolved (rows do not depend on it)."""
    import copy

    if getattr(transformer, "device", None) != "auto" or not hasattr(transformer, "device_"):
        return transformer
    from skntk.models._util import resolve_device

    device = resolve_device("auto", cuda_fallback=True)
    if device == transformer.device_:
        return transformer
    out = copy.copy(transformer)
    out.device_ = device
    if hasattr(out, "sketch_"):
        out.sketch_ = out.sketch_.to(device)
    if getattr(out, "batching", None) == "auto" and hasattr(out, "batching_"):
        out.batching_ = out._resolve_batching(out.model_)
    return out


def _transform_chunk(transformer, structures):
    """Worker task: the rows of ``structures`` (a list of ase.Atoms) as FeatureBlocks; a model
    sent by reference (:class:`_ModelRef`) is loaded here, once per process, and
    ``device="auto"`` means this process's device (:func:`_local_device`)."""
    transformer = _local_device(_resolve_reference(transformer))
    return transform_blocks(transformer, structures)


def _renamed(err, label, start):
    """``err`` (naming ``X[i]``) re-raised as naming the source and its frame ``start + i``."""
    msg = str(err)
    m = re.match(r"X\[(\d+)\]\s*(.*)", msg, flags=re.DOTALL)
    if m is None:
        return type(err)(f"{label}: {msg}")
    return type(err)(f"{label}: frame {start + int(m.group(1))} {m.group(2)}")


#: Seconds between looks at a chunk another process has claimed (its shard, or its end).
CLAIM_POLL_SECONDS = 0.5


def _source_label(source):
    return str(source) if isinstance(source, (str, Path)) else "pool"


def _chunks(source, shard_size, check, label):
    """Yield ``(start, list of ase.Atoms)`` of consecutive structures, validated by ``check``."""
    from skntk.io import iter_structures

    chunk, start = [], 0
    for k, atoms in enumerate(iter_structures(source)):
        chunk.append(atoms)
        if len(chunk) == shard_size:
            yield start, check(chunk, start)
            start, chunk = k + 1, []
    if chunk:
        yield start, check(chunk, start)


def featurize(transformer, source, directory, *, n_jobs=None, shard_size=DEFAULT_SHARD_SIZE,
              scheduler_address=None, dtype=None, pre_dispatch="2*n_jobs", progress_bar=False,
              validate=True, error_prefix=None) -> PoolFeatures:
    """Featurise the pool ``source`` into the cache ``directory``, resumably and in parallel.

    Parameters
    ----------
    transformer : fitted transformer returning FeatureBlocks (or a 2-D array) from ase.Atoms
        E.g. :class:`~skntk.transformers.ForceNTKTransformer`; a structure's rows must not
        depend on the other structures of its chunk.
    source : str, os.PathLike, iterable of ase.Atoms
        A structure file (streamed), an ``ase.db``, a glob pattern, an iterator or a list.
    directory : str or os.PathLike
        Feature cache directory (created if missing; shared with
        :func:`~skntk.cache.transform_cached`).
    n_jobs : int or None, default=None
        joblib workers (``None``: joblib's default, one unless inside a
        ``joblib.parallel_config``; ``-1``: all cores).
    shard_size : int, default=256
        Structures per chunk and shard.
    scheduler_address : str or None, default=None
        Address of a running ``dask.distributed`` scheduler (``tcp://host:8786``): the chunks
        run on its workers through joblib's Dask backend (needs ``pip install skntk[dask]``).
    dtype : numpy dtype or None, default=None
        Store the rows in this dtype (``np.float32``: half the disk and reading time, and PV
        screens them in float32); ``None`` keeps the transformer's. Shards of another dtype
        live under another cache key, so they never mix.
    pre_dispatch : int or str, default="2*n_jobs"
        Chunks in flight at once (bounds the memory).
    progress_bar : bool, default=False
        A tqdm bar over the pool (structures, rate, elapsed time; total and ETA when the source
        has a length, e.g. a list).
    validate : bool, default=True
        Check every structure (:func:`skntk.atoms.validate_structures`, against the model's
        species) and, for force rows, its memory estimate before it is featurised; errors name
        the file and the frame.
    error_prefix : str or None, default=None
        Prefixed to every ValueError and OSError (``"--pool: ..."``: the command line's option).

    Notes
    -----
    Processes featurising into one cache share the work: each chunk is claimed before it is
    computed (:meth:`skntk.cache.FeatureStore.claim`: a file created with ``O_CREAT | O_EXCL``
    holding the pid), a chunk another live process holds is put aside and taken from the cache
    once its shard appears, and the claim of a killed process is taken over.

    Returns
    -------
    features : PoolFeatures
        The distinct structures of the pool (first copies, in pool order; copies up to
        wrapping and global translation, :class:`skntk.io.DuplicateIndex`, are one
        structure), streamed from the cache; ``duplicate_signatures`` holds each one's
        :func:`skntk.io.duplicate_signature`.

    Raises
    ------
    ValueError
        A bad structure, naming ``<file>: frame <k>`` (truncated file, unknown element, atoms on
        top of each other); an empty pool.
    """
    if error_prefix is not None:
        try:
            return featurize(transformer, source, directory, n_jobs=n_jobs,
                             shard_size=shard_size, scheduler_address=scheduler_address,
                             dtype=dtype, pre_dispatch=pre_dispatch, progress_bar=progress_bar,
                             validate=validate)
        except (ValueError, OSError) as err:
            kind = type(err) if isinstance(err, (FileNotFoundError, IsADirectoryError)) else (
                OSError if isinstance(err, OSError) else ValueError)
            raise kind(f"{error_prefix}: {err}") from err
    from joblib import Parallel, delayed
    from sklearn.utils.validation import check_is_fitted

    from skntk.atoms import validate_structures

    if int(shard_size) < 1:
        raise ValueError(f"shard_size must be >= 1; got {shard_size}.")
    if hasattr(transformer, "get_params"):
        check_is_fitted(transformer)
    label = _source_label(source)
    model = getattr(transformer, "model_", None)
    validate_chunk = getattr(model, "validate", None) or (
        lambda chunk: validate_structures(chunk, name="X"))

    def check(chunk, start):
        if not validate:
            return chunk
        try:
            chunk = validate_chunk(chunk)
            if hasattr(transformer, "check_memory"):
                transformer.check_memory(chunk, validate=False)
        except ValueError as err:
            raise _renamed(err, label, start) from err
        return chunk

    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise ValueError(f"dtype must be a floating dtype or None; got {dtype}.")
    store = FeatureStore.for_transformer(transformer, directory, dtype=dtype)
    verified: set[str] = set()
    seen = DuplicateIndex()  # distinct structures up to wrapping and translation
    keys, signatures, pool_index, inverse = [], [], [], []
    stats = {"structures": 0, "computed": 0, "cached": 0}

    def cached(k):
        """Whether the cache holds a verified row block for structure key ``k``."""
        entry = store.where.get(k)
        if entry is None:
            return False
        if entry[0] not in verified:
            loaded = store.load(entry[0])  # checksums; a damaged shard is deleted and warned
            if loaded is None:
                return False
            verified.add(entry[0])
            store.admit(loaded[1])
        return True

    held: dict[int, Path] = {}  # id of a todo-key list -> its claim file, until written
    deferred: list = []  # (keys, structures) another live process has claimed

    def claimed(todo_keys, todo, bar):
        """``(keys, structures)`` still to compute once this process holds the claim on
        ``todo_keys`` (those another process wrote meanwhile count as cached; both empty
        then), or ``None`` while another live process holds it."""
        path = store.claim(todo_keys)
        if path is None:
            return None
        store.refresh()  # a shard written by the process that held this claim before
        left = [j for j, k in enumerate(todo_keys) if not cached(k)]
        stats["cached"] += len(todo_keys) - len(left)
        if bar is not None:
            bar.update(len(todo_keys) - len(left))
        todo_keys, todo = [todo_keys[j] for j in left], [todo[j] for j in left]
        if not todo:
            store.release(path)
            return [], []
        held[id(todo_keys)] = path
        return todo_keys, todo

    def claimable(bar):
        """The deferred chunks whose structures are still missing and whose claim this
        process now holds (the holder is gone, or wrote only part); the chunks the holder wrote
        meanwhile count as cached. Called only when this process holds no claim, so two
        processes never wait for each other."""
        store.refresh()
        ready, still = [], []
        for todo_keys, todo in deferred:
            left = [j for j, k in enumerate(todo_keys) if not cached(k)]
            stats["cached"] += len(todo_keys) - len(left)
            if bar is not None:
                bar.update(len(todo_keys) - len(left))
            if not left:
                continue
            todo_keys, todo = [todo_keys[j] for j in left], [todo[j] for j in left]
            mine = claimed(todo_keys, todo, bar)
            if mine is None:
                still.append((todo_keys, todo))
            elif mine[0]:
                ready.append((mine[0], delayed(_transform_chunk)(sent, mine[1])))
        deferred[:] = still
        return ready

    def tasks(bar):
        """Chunks of the structures still to compute (bookkeeping of the pool on the way)."""
        for start, chunk in _chunks(source, int(shard_size), check, label):
            todo, todo_keys = [], []
            for j, atoms in enumerate(chunk):
                sig = duplicate_signature(atoms)
                d = seen.add(sig)
                inverse.append(d)
                if d < len(keys):  # a copy of an earlier structure
                    continue
                k = structure_key(atoms)
                keys.append(k)
                signatures.append(sig)
                pool_index.append(start + j)
                if not cached(k):
                    todo.append(atoms)
                    todo_keys.append(k)
            stats["structures"] += len(chunk)
            stats["cached"] += len(chunk) - len(todo)
            if bar is not None:
                bar.update(len(chunk) - len(todo))
            if not todo:
                continue
            mine = claimed(todo_keys, todo, bar)
            if mine is None:  # another process computes it
                deferred.append((todo_keys, todo))
            elif mine[0]:
                yield mine[0], delayed(_transform_chunk)(sent, mine[1])

    from joblib import effective_n_jobs

    if scheduler_address is not None or effective_n_jobs(n_jobs) > 1:
        sent = _by_reference(transformer)  # workers load a named model themselves
    else:
        sent = transformer
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if scheduler_address is not None:
            stack.enter_context(_dask_backend(scheduler_address))
        bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            total = (len(source) if hasattr(source, "__len__")
                     and not isinstance(source, (str, Path)) else None)  # a stream: rate only
            bar = stack.enter_context(tqdm(desc="features", unit="structure", total=total))
        pending: list = []

        def calls(work):
            for todo_keys, call in work:
                pending.append(todo_keys)
                yield call

        def compute(work):
            results = Parallel(n_jobs=n_jobs, return_as="generator", pre_dispatch=pre_dispatch)(
                calls(work))
            for blocks in results:
                todo_keys = pending.pop(0)
                if dtype is not None and blocks.rows.dtype != dtype:
                    blocks = blocks.with_rows(blocks.rows.astype(dtype))
                store.admit(blocks)
                name = store.write(todo_keys, blocks)
                store.release(held.pop(id(todo_keys), None))
                verified.add(name)
                stats["computed"] += len(todo_keys)
                if bar is not None:
                    bar.update(len(todo_keys))

        try:
            compute(tasks(bar))
            while deferred:  # chunks other processes claimed: wait for their shards, or take over
                ready = claimable(bar)
                if ready:
                    compute(ready)
                elif deferred:
                    time.sleep(CLAIM_POLL_SECONDS)
        finally:
            for path in held.values():  # interrupted: the claims go, the shards written stay
                store.release(path)
            store.close()
    if not keys:
        raise ValueError(f"{label} holds no structures.")
    logger.info("featurised %s: %d structures (%d distinct), %d computed, %d from the cache, "
                "%.1f s", label, stats["structures"], len(keys), stats["computed"],
                stats["cached"], time.perf_counter() - t0)
    kind, n_feat, row_dtype = store.layout
    feats = PoolFeatures(store, keys, pool_index, inverse, kind=kind, n_features=n_feat,
                         dtype=row_dtype)
    feats.stats = stats
    feats.duplicate_signatures = signatures
    return feats


@contextlib.contextmanager
def _dask_backend(address):
    """joblib's Dask backend on the scheduler at ``address`` for the duration."""
    try:
        from dask.distributed import Client
    except ImportError as err:
        raise ImportError("scheduler_address needs dask.distributed: pip install "
                          "'skntk[dask]'.") from err
    from joblib import parallel_config

    with Client(address) as client, parallel_config(backend="dask"):
        logger.info("featurising on the Dask cluster at %s (%d workers)", address,
                    len(client.scheduler_info().get("workers", {})))
        yield client

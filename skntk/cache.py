"""Content-addressed, resumable feature cache: feature blocks persisted per structure.

A long screening run (hours of NTK featurisation) must not lose work when interrupted, and must
never be served features computed for another model, setting or structure. Every cached block is
keyed by two SHA-256 digests:

- the **transformer key** (:func:`transformer_key`): the transformer's class and every setting that
  changes rows — its ``get_params()`` less those that do not (``device``, ``batch_size``,
  ``batching``, ``working_memory``, ``progress_bar``, ``n_jobs``, ``verbose``), the fitted
  attributes that resolve them
  (``force_rows_``, ``seed_``, ``n_features_out_``, ``parameter_names_``, ``n_params_``) and, for a
  transformer with a ``model_``, a digest of the model: handle class, cutoff, species and the
  bytes, names, dtypes and shapes of every tensor of ``model_.module.state_dict()`` (parameters
  *and* buffers: upstream weights change even readout gradients); plus the skntk version;
- the **structure key** (:func:`structure_key`): atomic numbers, positions, cell and pbc.

Layout of ``directory``: one sub-directory per transformer key (so one directory serves several
models or settings), holding

- ``<digest>.shard`` files of a few structures each (at most ``shard_size`` structures or
  ``flush_seconds`` of work), written atomically (temporary file + ``os.replace``);
- ``index.bin``, mapping structure keys to (shard, position), rebuilt from the shard headers when
  missing or damaged, and extended by scanning for shards it does not list (an interrupted run);
- ``key.json``, the human-readable ingredients of the transformer key (informational only).

Every file is a small container (:func:`_write_container`): a header (JSON) protected by its own
SHA-256 and a payload whose SHA-256 and length the header records, so a truncated, emptied or
bit-flipped file is detected before anything is parsed. An index entry is a hint only: the shard
it points to is verified (checksums, transformer key, structure key at that position) before its
rows are used. A shard that fails is reported with :class:`CorruptCacheWarning` naming its path,
deleted, and its structures recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import struct
import time
import uuid
import warnings
from pathlib import Path

import numpy as np

from skntk.blocks import FeatureBlocks, FeatureData

logger = logging.getLogger(__name__)

__all__ = ["transform_cached", "transformer_key", "structure_key", "model_digest",
           "transform_blocks", "CorruptCacheWarning", "FeatureStore", "PoolFeatures"]

#: Bump when the key ingredients or the container layout change (old entries then just miss).
FORMAT_VERSION = 1
_MAGIC = b"SKNTKC\x00\x01"
_PREFIX = struct.Struct("<8sQ")  # magic, header length
_DIGEST = 32
#: Parameters that never change rows (where the work runs, how it is batched, what is shown).
_IGNORED_PARAMS = frozenset({"device", "batch_size", "batching", "working_memory", "progress_bar",
                             "n_jobs", "verbose"})
#: Fitted attributes that resolve row-changing settings (e.g. ``force_rows="auto"``).
_FITTED_ATTRS = ("force_rows_", "seed_", "n_features_out_", "parameter_names_", "n_params_")


class CorruptCacheWarning(RuntimeWarning):
    """A cache file failed to load or verify; it is deleted (or ignored) and recomputed."""


class _Corrupt(Exception):
    pass


# -- keys ----------------------------------------------------------------------------------------
def _qualname(obj) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _tensor_digest(t) -> str:
    import torch

    t = t.detach().to("cpu")
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    try:  # the raw bytes, whatever the dtype (bfloat16 included)
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    except (RuntimeError, TypeError, NotImplementedError):  # sparse, quantized, ...: exact values
        dense = t.to_dense() if t.is_sparse else t
        dense = dense.dequantize() if dense.is_quantized else dense
        h.update(repr(dense.tolist()).encode())
    return h.hexdigest()


def _module_digest(module) -> dict:
    """Class and the digest of all tensors (parameters and buffers) of a ``torch.nn.Module``."""
    import torch

    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        h.update(name.encode() + b"\x00")
        if isinstance(value, torch.Tensor):
            h.update(_tensor_digest(value).encode())
        else:  # extra state
            h.update(json.dumps(_canonical(value), sort_keys=True).encode())
        h.update(b"\x01")
    return {"module": _qualname(module), "state_sha256": h.hexdigest()}


def model_digest(model) -> dict:
    """Class, cutoff, species and the digest of every tensor of an MLIP handle (JSON-able)."""
    species = getattr(model, "species", None)
    cutoff = getattr(model, "cutoff", None)
    return {"handle": _qualname(model),
            "cutoff": None if cutoff is None else float(cutoff),
            "species": None if species is None else sorted(int(z) for z in species),
            **_module_digest(model.module)}


def _canonical(v):
    """A JSON-able, process-independent description of a parameter value."""
    import torch

    from skntk.models.base import MLIP

    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return {"float": float(v).hex()}
    if isinstance(v, (list, tuple)):
        return [_canonical(x) for x in v]
    if isinstance(v, (set, frozenset)):
        return {"set": sorted(json.dumps(_canonical(x), sort_keys=True) for x in v)}
    if isinstance(v, dict):
        return {"dict": sorted([str(k), _canonical(x)] for k, x in v.items())}
    if isinstance(v, np.ndarray):
        a = np.ascontiguousarray(v)
        return {"ndarray": [str(a.dtype), list(a.shape), hashlib.sha256(a.tobytes()).hexdigest()]}
    if isinstance(v, torch.Tensor):
        return {"tensor": _tensor_digest(v)}
    if isinstance(v, (torch.dtype, torch.device, os.PathLike)):
        return {_qualname(v): str(v)}
    if isinstance(v, MLIP):
        return {"model": model_digest(v)}
    if isinstance(v, torch.nn.Module):
        return _module_digest(v)
    if hasattr(v, "get_params"):  # a nested estimator
        return {"estimator": _qualname(v), "params": _canonical(v.get_params(deep=False))}
    # Anything else by repr: an unstable repr (an address) only makes the cache miss.
    return {"repr": _qualname(v) + ":" + repr(v)}


def _transformer_description(transformer) -> dict:
    params = dict(transformer.get_params(deep=False)) if hasattr(transformer, "get_params") else {}
    model = getattr(transformer, "model_", None)
    if model is not None:
        params.pop("model", None)  # what was resolved (and its weights) is what counts
    if hasattr(transformer, "seed_"):
        params.pop("random_state", None)  # resolved into seed_
    params = {k: v for k, v in params.items() if k not in _IGNORED_PARAMS}
    desc = {"format": FORMAT_VERSION, "skntk": _skntk_version(),
            "transformer": _qualname(transformer),
            "params": _canonical(params),
            "fitted": {a: _canonical(getattr(transformer, a)) for a in _FITTED_ATTRS
                       if hasattr(transformer, a)}}
    if model is not None:
        desc["model"] = model_digest(model) if hasattr(model, "module") else _canonical(model)
    return desc


def _skntk_version() -> str:
    from skntk._version import __version__

    return __version__


def transformer_key(transformer) -> str:
    """SHA-256 (hex) of everything of a fitted transformer that changes its rows.

    Parameters
    ----------
    transformer : fitted transformer
        Its class, ``get_params()`` (less ``device``, ``batch_size``, ``batching``,
        ``working_memory``, ``progress_bar``, ``n_jobs``, ``verbose``), the fitted ``force_rows_``,
        ``seed_``, ``n_features_out_``, ``parameter_names_``, ``n_params_`` where present, and
        the digest of ``model_`` (class, cutoff, species, every tensor of
        ``model_.module.state_dict()``) where present.

    Returns
    -------
    key : str of 64 hex digits
    """
    desc = _transformer_description(transformer)
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def structure_key(atoms) -> bytes:
    """SHA-256 (32 bytes) of a structure's atomic numbers, positions, cell and pbc."""
    numbers = np.ascontiguousarray(atoms.numbers, dtype=np.int64)
    h = hashlib.sha256(b"skntk-atoms-1" + struct.pack("<q", numbers.shape[0]))
    h.update(numbers.tobytes())
    h.update(np.ascontiguousarray(atoms.positions, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(atoms.cell.array, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(atoms.pbc, dtype=np.uint8).tobytes())
    return h.digest()


# -- containers ----------------------------------------------------------------------------------
def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _container(meta: dict, payload: bytes) -> tuple[bytes, str]:
    """File bytes and header digest of ``meta`` + ``payload``."""
    meta = {**meta, "payload_len": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest()}
    header = json.dumps(meta, sort_keys=True).encode()
    prefix = _PREFIX.pack(_MAGIC, len(header))
    digest = hashlib.sha256(prefix + header).digest()
    return prefix + header + digest + payload, digest.hex()


def _read_container(path: Path, *, header_only: bool = False) -> tuple[dict, bytes | None]:
    """Header (and payload) of a container file, verified; raises ``_Corrupt``."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) != _PREFIX.size:
                raise _Corrupt(f"truncated ({len(prefix)} bytes)")
            magic, n_header = _PREFIX.unpack(prefix)
            if magic != _MAGIC or n_header > 1 << 30:
                raise _Corrupt("not a skntk cache file (bad magic or header length)")
            header = f.read(n_header)
            digest = f.read(_DIGEST)
            if len(header) != n_header or len(digest) != _DIGEST:
                raise _Corrupt("truncated header")
            if hashlib.sha256(prefix + header).digest() != digest:
                raise _Corrupt("header checksum mismatch")
            meta = json.loads(header)
            if header_only:
                return meta, None
            payload = f.read(int(meta["payload_len"]) + 1)
    except OSError as err:
        raise _Corrupt(f"unreadable: {err}") from err
    except (ValueError, KeyError, TypeError) as err:
        raise _Corrupt(f"bad header: {err}") from err
    if len(payload) != meta["payload_len"]:
        raise _Corrupt(f"payload of {len(payload)} bytes, header says {meta['payload_len']}")
    if hashlib.sha256(payload).hexdigest() != meta["payload_sha256"]:
        raise _Corrupt("payload checksum mismatch")
    return meta, payload


#: A claim is taken over after this many seconds when its holder cannot be checked (written on
#: another host) or looks alive (its pid may have been reused).
CLAIM_STALE_SECONDS = 3600.0


def _stale(path: Path) -> bool:
    """Whether the claim file ``path`` was left by a process that is gone."""
    try:
        pid, host, stamp = path.read_text().split()[:3]
        pid, stamp = int(pid), float(stamp)
    except FileNotFoundError:
        return True  # released meanwhile
    except (OSError, ValueError):  # half-written by a holder killed between create and write
        try:
            return time.time() - path.stat().st_mtime > 60
        except FileNotFoundError:
            return True
    if host == socket.gethostname():
        if pid == os.getpid():  # this process holds none it does not know: an earlier one's
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
    return time.time() - stamp > CLAIM_STALE_SECONDS  # on another host, or a reused pid


# -- the store of one transformer key ------------------------------------------------------------
class FeatureStore:
    """Shards and index of one transformer key: the one writer of the feature cache.

    :func:`transform_cached` and :func:`skntk.parallel.featurize` both open it with
    :meth:`for_transformer`, read verified shards (:meth:`load`), write each computed chunk as a
    shard (:meth:`write`), check that every block has one layout (:meth:`admit`) and write the
    index last (:meth:`close`).

    Parameters
    ----------
    directory : pathlib.Path
        The cache directory; the store lives in its sub-directory ``key[:32]``.
    key : str of 64 hex digits
        The transformer key (:func:`transformer_key`).

    Attributes
    ----------
    where : dict of bytes to (str, int)
        Structure key → (shard name, position in it), as far as known.
    layout : tuple of (str, int, numpy dtype) or None
        ``(kind, n_features, row dtype)`` of the blocks admitted so far.
    """

    def __init__(self, directory: Path, key: str):
        self.dir = directory / key[:32]
        self.key = key
        self.index_path = self.dir / "index.bin"
        self.where: dict[bytes, tuple[str, int]] = {}  # structure key -> (shard name, position)
        self.dirty = False
        self.layout = None

    @classmethod
    def for_transformer(cls, transformer, directory, *, dtype=None) -> FeatureStore:
        """The opened store of the fitted ``transformer`` in the cache ``directory`` (created).

        Parameters
        ----------
        transformer : fitted transformer
            Keyed by :func:`transformer_key`.
        directory : str or os.PathLike
        dtype : numpy dtype or None, default=None
            The dtype the rows are stored in, when not the transformer's own (part of the key).
        """
        description = _transformer_description(transformer)
        if dtype is not None:
            description = {**description, "stored_dtype": np.dtype(dtype).str}
        key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"feature cache directory {str(directory)!r} exists and is "
                                     f"not a directory.")
        directory.mkdir(parents=True, exist_ok=True)
        for old in ("manifest.json", "shard-000000000-*.npz"):
            if next(directory.glob(old), None) is not None:
                logger.warning("feature cache %s holds files of an older cache format (%s); they "
                               "are no longer read and may be deleted.", directory, old)
                break
        store = cls(directory, key)
        store.open(description)
        return store

    def admit(self, blocks: FeatureBlocks) -> None:
        """Record the layout of the first blocks; refuse blocks of another kind or width."""
        if self.layout is None:
            self.layout = (blocks.kind, blocks.n_features, blocks.rows.dtype)
            return
        kind, n_features, _ = self.layout
        if (blocks.kind, blocks.n_features) != (kind, n_features):
            raise ValueError(f"cached blocks of kind={blocks.kind!r}, n_features="
                             f"{blocks.n_features} next to kind={kind!r}, n_features={n_features}; "
                             f"the transformer's rows depend on something its key misses.")

    def close(self) -> None:
        """Write the index; an OSError is logged (the shards are safe: the next run rebuilds
        the index from them)."""
        try:
            self.save_index()
        except OSError as err:
            logger.warning("could not write the feature cache index %s: %s", self.index_path, err)

    # index ---------------------------------------------------------------------------------
    def open(self, description: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        info = self.dir / "key.json"
        if not info.exists():
            _write_atomic(info, json.dumps({"key": self.key, **description}, indent=1,
                                           sort_keys=True).encode())
        listed: set[str] = set()
        if self.index_path.exists():
            try:
                meta, payload = _read_container(self.index_path)
                if meta.get("kind") != "index" or meta.get("transformer_key") != self.key:
                    raise _Corrupt("index of another transformer key")
                shards = meta["shards"]
                n = int(meta["n"])
                keys = np.frombuffer(payload, np.uint8, 32 * n, 0).reshape(n, 32)
                sid = np.frombuffer(payload, np.int64, n, 32 * n)
                pos = np.frombuffer(payload, np.int64, n, 40 * n)
                self.where = {k.tobytes(): (shards[s], int(p))
                              for k, s, p in zip(keys, sid.tolist(), pos.tolist(), strict=True)}
                listed = set(shards)
            except (_Corrupt, ValueError, KeyError, TypeError, IndexError) as err:
                self._warn(self.index_path, err, "rebuilding it from the shards")
                self.where, listed = {}, set()
                self.dirty = True
        present = {p.name for p in self.dir.glob("*.shard")}
        gone = listed - present
        if gone:  # entries of deleted shards
            self.where = {k: v for k, v in self.where.items() if v[0] not in gone}
            self.dirty = True
        self._add_shards(sorted(present - listed))  # not in the index (interrupted run)
        for path in (self.dir / "claims").glob("*.claim"):  # left by killed processes
            if _stale(path):
                path.unlink(missing_ok=True)

    def refresh(self) -> None:
        """Take in the shards other processes wrote since :meth:`open` (headers only)."""
        known = {v[0] for v in self.where.values()}
        self._add_shards(sorted({p.name for p in self.dir.glob("*.shard")} - known))

    def _add_shards(self, names) -> None:
        for name in names:
            path = self.dir / name
            try:
                meta, _ = _read_container(path, header_only=True)
                self._check_meta(meta)
            except FileNotFoundError:  # deleted meanwhile (another process found it damaged)
                continue
            except _Corrupt as err:
                self._drop(path, err)
                continue
            for p, k in enumerate(meta["keys"]):
                self.where[bytes.fromhex(k)] = (name, p)
            self.dirty = True

    # claims ----------------------------------------------------------------------------------
    def claim(self, keys: list[bytes]) -> Path | None:
        """Claim the work of computing ``keys`` for this process: the claim file's path, or
        ``None`` while a live process holds it.

        A claim is a file created atomically (``O_CREAT | O_EXCL``) under ``claims/``, named
        by the hash of the keys and holding ``pid host time``. A claim whose holder is gone (a
        dead pid on this host) or that is older than :data:`CLAIM_STALE_SECONDS` is stale: it
        is removed and taken over, so a killed run never blocks the next.
        """
        claims = self.dir / "claims"
        claims.mkdir(exist_ok=True)
        path = claims / (hashlib.sha256(b"".join(keys)).hexdigest()[:32] + ".claim")
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not _stale(path):
                    return None
                path.unlink(missing_ok=True)  # the holder is gone: take the work over
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()} {socket.gethostname()} {time.time():.0f}\n")
            return path
        return None

    @staticmethod
    def release(path: Path | None) -> None:
        if path is not None:
            path.unlink(missing_ok=True)

    def save_index(self) -> None:
        if not self.dirty:
            return
        shards = sorted({v[0] for v in self.where.values()})
        sid = {s: i for i, s in enumerate(shards)}
        n = len(self.where)
        keys = np.frombuffer(b"".join(self.where), np.uint8).reshape(n, 32)
        loc = np.array([(sid[s], p) for s, p in self.where.values()], np.int64).reshape(n, 2)
        payload = keys.tobytes() + loc[:, 0].tobytes() + loc[:, 1].tobytes()
        data, _ = _container({"kind": "index", "transformer_key": self.key, "shards": shards,
                              "n": n}, payload)
        _write_atomic(self.index_path, data)
        self.dirty = False

    # shards --------------------------------------------------------------------------------
    def _check_meta(self, meta: dict) -> None:
        if meta.get("kind") != "shard" or meta.get("transformer_key") != self.key:
            raise _Corrupt("not a shard of this transformer key")
        n = len(meta["keys"])
        if len(meta["offsets"]) != n + 1:
            raise _Corrupt("offsets do not match the structures")

    def load(self, name: str) -> tuple[list[bytes], FeatureBlocks] | None:
        """Verified keys and blocks of shard ``name``; ``None`` (warned, deleted) when bad."""
        path = self.dir / name
        try:
            meta, payload = _read_container(path)
            self._check_meta(meta)
            n_rows, n_cols = meta["shape"]
            dtype = np.dtype(meta["dtype"])
            if n_rows * n_cols * dtype.itemsize != len(payload):
                raise _Corrupt("rows do not match the payload")
            rows = np.frombuffer(payload, dtype).reshape(n_rows, n_cols)
            blocks = FeatureBlocks(rows, np.asarray(meta["offsets"], np.int64), kind=meta["blocks"])
        except (_Corrupt, ValueError, KeyError, TypeError) as err:
            self._drop(path, err)
            return None
        return [bytes.fromhex(k) for k in meta["keys"]], blocks

    def write(self, keys: list[bytes], blocks: FeatureBlocks) -> str:
        rows = np.ascontiguousarray(blocks.rows)
        meta = {"kind": "shard", "transformer_key": self.key, "keys": [k.hex() for k in keys],
                "offsets": blocks.offsets.tolist(), "blocks": blocks.kind,
                "shape": list(rows.shape), "dtype": rows.dtype.str}
        data, digest = _container(meta, rows.tobytes())
        name = f"{digest[:32]}.shard"
        _write_atomic(self.dir / name, data)
        for p, k in enumerate(keys):
            self.where[k] = (name, p)
        self.dirty = True
        return name

    def _drop(self, path: Path, err) -> None:
        self._warn(path, err, "deleting it; its structures are recomputed")
        path.unlink(missing_ok=True)
        self.where = {k: v for k, v in self.where.items() if v[0] != path.name}
        self.dirty = True

    @staticmethod
    def _warn(path: Path, err, action: str) -> None:
        warnings.warn(f"feature cache file {str(path)!r} is damaged ({err}); {action}.",
                      CorruptCacheWarning, stacklevel=4)


#: The name the benchmarks (and older code) import.
_Store = FeatureStore


def transform_blocks(transformer, structures) -> FeatureBlocks:
    """``transformer.transform(structures)`` as FeatureBlocks, one block per structure.

    Parameters
    ----------
    transformer : fitted transformer returning FeatureBlocks (or a 2-D array, one row each)
    structures : list of ase.Atoms of length n_structures

    Returns
    -------
    blocks : FeatureBlocks of length n_structures
    """
    out = transformer.transform(structures)
    if not isinstance(out, FeatureBlocks):
        out = FeatureBlocks.from_array(np.asarray(out))
    if len(out) != len(structures):
        raise ValueError(f"the transformer returned {len(out)} blocks for {len(structures)} "
                         f"structures.")
    return out


def transform_cached(transformer, structures, directory, *, shard_size=8,
                     flush_seconds=30.0) -> FeatureBlocks:
    """``transformer.transform(structures)``, cached per structure and resumable.

    Each structure's block is looked up under (:func:`transformer_key`, :func:`structure_key`);
    only the structures without a verified entry are transformed, a few at a time, and each such
    chunk is written as a shard as soon as it is done. A different model (weights included),
    setting or structure therefore misses and is recomputed, a subset of the structures (a pool
    shrinking over active-learning rounds) hits, and an interruption loses at most one chunk.

    Parameters
    ----------
    transformer : fitted transformer returning FeatureBlocks (or a 2-D array)
        The rows of one structure must not depend on the other structures passed with it (true
        of :class:`~skntk.transformers.ForceNTKTransformer` and
        :class:`~skntk.transformers.EmbeddingTransformer`).
    structures : list of ase.Atoms of length n_structures, iterator or path
    directory : str or os.PathLike
        Cache directory (created if missing); may hold entries of several transformer keys.
    shard_size : int, default=8
        At most this many structures per ``transform`` call and shard.
    flush_seconds : float, default=30.0
        Target work per shard: after timing the first chunks (1, 2, 4, ... structures), a chunk
        holds about as many structures as this many seconds of work (at least one).

    Returns
    -------
    blocks : FeatureBlocks of length n_structures, in input order

    Warns
    -----
    CorruptCacheWarning
        A shard or index that fails to load or verify (named by path); it is deleted or rebuilt
        and its structures recomputed.
    """
    from skntk.atoms import as_atoms_list

    if int(shard_size) < 1:
        raise ValueError(f"shard_size must be >= 1; got {shard_size}.")
    if not float(flush_seconds) > 0:
        raise ValueError(f"flush_seconds must be > 0; got {flush_seconds}.")
    structures = as_atoms_list(structures, name="structures")
    if not structures:
        raise ValueError("transform_cached needs at least one structure.")
    if hasattr(transformer, "get_params"):
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(transformer)
    store = FeatureStore.for_transformer(transformer, directory)
    skeys = [structure_key(a) for a in structures]
    found: dict[bytes, np.ndarray] = {}

    def take(entries, blocks):
        store.admit(blocks)
        for p, k in entries:
            found[k] = blocks.block(p)

    try:
        wanted = dict.fromkeys(skeys)  # unique, in input order
        by_shard = dict.fromkeys(store.where[k][0] for k in wanted if k in store.where)
        for name in by_shard:  # the index only routes: what is used comes from verified shards
            loaded = store.load(name)
            if loaded is not None:
                keys, blocks = loaded
                take([(p, k) for p, k in enumerate(keys) if k in wanted and k not in found], blocks)
        todo, seen = [], set()  # first occurrence of every structure still missing
        for i, k in enumerate(skeys):
            if k not in found and k not in seen:
                seen.add(k)
                todo.append(i)
        n_hit = len(wanted) - len(todo)
        logger.info("feature cache %s: %d of %d structures cached, %d to compute", store.dir,
                    n_hit, len(wanted), len(todo))
        chunk, start = 1, 0
        while start < len(todo):
            idx = todo[start:start + chunk]
            t0 = time.perf_counter()
            blocks = transform_blocks(transformer, [structures[i] for i in idx])
            elapsed = time.perf_counter() - t0
            keys = [skeys[i] for i in idx]
            store.write(keys, blocks)
            take(list(enumerate(keys)), blocks)
            start += len(idx)
            per = elapsed / len(idx)
            fit = math.floor(flush_seconds / per) if per > 0 else shard_size
            chunk = int(max(1, min(shard_size, 2 * len(idx), fit)))
    finally:
        store.close()
    parts = [found[k] for k in skeys]
    m = np.fromiter((len(b) for b in parts), np.int64, len(parts))
    return FeatureBlocks(np.concatenate(parts), np.concatenate([[0], np.cumsum(m)]),
                         kind=store.layout[0])


# -- a pool held in the cache: streamed shard by shard ------------------------------------------
class PoolFeatures(FeatureData):
    """The feature blocks of a pool held in a feature cache, read shard by shard on demand.

    Made by :func:`skntk.parallel.featurize`. Selectors stream it (:meth:`iter_chunks`: one
    verified shard in memory at a time) and load only the rows they keep (:meth:`take`), so a
    selection over it needs memory for one shard and the shortlist, not for the pool. Holds the
    distinct structures of the pool once each, in pool order of their first copy.

    Parameters
    ----------
    store : FeatureStore
        The opened store of the transformer key.
    keys : list of bytes of length n_structures
        Structure keys (:func:`structure_key`) of the distinct structures, in pool order.
    pool_index : ndarray of int of shape (n_structures,)
        Pool position of each distinct structure's first copy.
    inverse : ndarray of int of shape (n_pool,)
        Distinct structure of each pool position (``pool[k]`` is ``self[inverse[k]]``).
    kind : str
        Row layout of the blocks.
    n_features : int
    dtype : numpy dtype of the rows

    Attributes
    ----------
    n_pool : int
        Structures in the pool, duplicates included.
    shape : tuple of (n_structures, n_features)
    duplicate_signatures : list of length n_structures or None
        :func:`skntk.io.duplicate_signature` of each structure (set by
        :func:`skntk.parallel.featurize`).
    """

    duplicate_signatures = None

    def __init__(self, store, keys, pool_index, inverse, *, kind, n_features, dtype):
        self._store = store
        self.keys = list(keys)
        self.pool_index = np.asarray(pool_index, dtype=np.int64)
        self.inverse = np.asarray(inverse, dtype=np.int64)
        self.kind = kind
        self.n_features = int(n_features)
        self.dtype = np.dtype(dtype)
        self.n_pool = int(self.inverse.shape[0])
        missing = [i for i, k in enumerate(self.keys) if k not in store.where]
        if missing:
            raise ValueError(f"feature cache {store.dir} has no rows for {len(missing)} of the "
                             f"{len(self.keys)} structures (first: pool structure "
                             f"{int(self.pool_index[missing[0]])}); run the featurisation again.")

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return (f"PoolFeatures(n_structures={len(self)}, n_pool={self.n_pool}, "
                f"n_features={self.n_features}, kind={self.kind!r}, dtype={self.dtype}, "
                f"directory={str(self._store.dir)!r})")

    def _load(self, name):
        loaded = self._store.load(name)
        if loaded is None:
            raise ValueError(f"feature cache shard {str(self._store.dir / name)!r} was damaged "
                             f"after featurisation (deleted now); run the featurisation again "
                             f"to recompute its structures.")
        return loaded

    def iter_chunks(self):
        """Yield ``(start, FeatureBlocks)``: runs of consecutive structures from one shard.

        Memory: one shard (its file is read and verified whole) and one run at a time.
        """
        where = self._store.where
        start = 0
        n = len(self.keys)
        while start < n:
            name = where[self.keys[start]][0]
            keys, blocks = self._load(name)
            if self.keys[start:start + len(keys)] == keys:  # the usual case: a whole shard
                yield start, blocks
                start += len(keys)
                continue
            pos = {k: p for p, k in enumerate(keys)}
            stop = start
            while stop < n and where[self.keys[stop]][0] == name:
                stop += 1
            try:
                idx = np.array([pos[k] for k in self.keys[start:stop]], dtype=np.int64)
            except KeyError as err:
                raise ValueError(f"feature cache shard {name} does not hold a structure its "
                                 f"index points to; run the featurisation again.") from err
            yield start, (blocks if np.array_equal(idx, np.arange(len(blocks)))
                          else blocks[idx])
            start = stop

    def subset(self, idx) -> PoolFeatures:
        """The structures ``idx`` (increasing) as a PoolFeatures of the same pool.

        Pool positions of the structures left out get ``inverse`` -1.
        """
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        new = np.full(len(self), -1, dtype=np.int64)
        new[idx] = np.arange(idx.size)
        out = PoolFeatures(self._store, [self.keys[i] for i in idx], self.pool_index[idx],
                           new[self.inverse], kind=self.kind, n_features=self.n_features,
                           dtype=self.dtype)
        if self.duplicate_signatures is not None:
            out.duplicate_signatures = [self.duplicate_signatures[i] for i in idx]
        out.stats = getattr(self, "stats", None)
        return out

    def take(self, idx) -> FeatureBlocks:
        """Blocks of structures ``idx`` (in that order), reading only the shards holding them.

        Parameters
        ----------
        idx : array-like of int of shape (k,)

        Returns
        -------
        blocks : FeatureBlocks of length k
        """
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"structure indices out of range for {len(self)} structures.")
        if idx.size == 0:
            return FeatureBlocks(np.empty((0, self.n_features), self.dtype), [0], kind=self.kind)
        where = self._store.where
        by_shard: dict[str, list[int]] = {}
        for j, i in enumerate(idx.tolist()):
            by_shard.setdefault(where[self.keys[i]][0], []).append(j)
        parts: list = [None] * idx.size
        for name, js in by_shard.items():
            keys, blocks = self._load(name)
            pos = {k: p for p, k in enumerate(keys)}
            for j in js:
                parts[j] = blocks.block(pos[self.keys[int(idx[j])]]).copy()  # not the shard
        m = np.fromiter((len(b) for b in parts), np.int64, len(parts))
        return FeatureBlocks(np.concatenate(parts), np.concatenate([[0], np.cumsum(m)]),
                             kind=self.kind)

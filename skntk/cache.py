"""Resumable featurisation: feature blocks persisted shard by shard.

A long screening run (hours of NTK featurisation) must not lose work when interrupted. Structures
are featurised in shards of ``shard_size``; each finished shard is written atomically to
``directory/shard-<start>-<stop>.npz`` (rows, offsets, kind). Rerunning with the same directory,
transformer parameters and structures loads finished shards and computes only the missing ones.
A ``manifest.json`` records a fingerprint of the transformer's parameters and the structures so
that a cache made for other inputs is refused instead of silently reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from skntk.blocks import FeatureBlocks

logger = logging.getLogger(__name__)


def _fingerprint(transformer, structures) -> str:
    h = hashlib.sha256()
    params = transformer.get_params(deep=False)
    h.update(json.dumps({k: repr(v) for k, v in sorted(params.items())
                         if k not in ("progress_bar", "device", "batch_size", "n_jobs")}).encode())
    h.update(type(transformer).__name__.encode())
    for atoms in structures:
        h.update(atoms.numbers.tobytes())
        h.update(np.ascontiguousarray(atoms.positions, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(atoms.cell.array, dtype=np.float64).tobytes())
    return h.hexdigest()


def _save_atomic(path: Path, blocks: FeatureBlocks) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, rows=blocks.rows, offsets=blocks.offsets, kind=np.array(blocks.kind))
    os.replace(tmp, path)


def _load(path: Path) -> FeatureBlocks:
    with np.load(path) as f:
        return FeatureBlocks(f["rows"], f["offsets"], kind=str(f["kind"]))


def transform_cached(transformer, structures, directory, *, shard_size=64) -> FeatureBlocks:
    """``transformer.transform(structures)``, persisted and resumable shard by shard.

    Parameters
    ----------
    transformer : fitted transformer returning :class:`~skntk.blocks.FeatureBlocks`
    structures : list of ase.Atoms of length n_structures
    directory : str or os.PathLike
        Where shards live; created if missing.
    shard_size : int, default=64
        Structures per shard (the work lost at most when interrupted).

    Returns
    -------
    blocks : FeatureBlocks of length n_structures
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    structures = list(structures)
    key = _fingerprint(transformer, structures)
    manifest = directory / "manifest.json"
    if manifest.exists():
        old = json.loads(manifest.read_text())
        if old.get("fingerprint") != key:
            raise ValueError(
                f"feature cache {str(directory)!r} was made for other structures or transformer "
                "parameters; use another directory or delete it."
            )
    else:
        manifest.write_text(json.dumps({"fingerprint": key, "n_structures": len(structures),
                                        "shard_size": shard_size}))
    parts = []
    for start in range(0, len(structures), shard_size):
        stop = min(start + shard_size, len(structures))
        path = directory / f"shard-{start:09d}-{stop:09d}.npz"
        if path.exists():
            logger.info("loading cached shard %s", path.name)
            parts.append(_load(path))
            continue
        blocks = transformer.transform(structures[start:stop])
        if not isinstance(blocks, FeatureBlocks):
            blocks = FeatureBlocks.from_array(np.asarray(blocks))
        _save_atomic(path, blocks)
        parts.append(blocks)
    if not parts:
        raise ValueError("transform_cached needs at least one structure.")
    return FeatureBlocks.concatenate(parts)

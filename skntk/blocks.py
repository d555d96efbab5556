"""Feature data: per-structure observation rows, in memory or streamed.

A structure ``x`` contributes a block ``G_x`` of ``m_x`` rows of ``n_features`` columns
(docs/design.md, "Observation rows"): one energy row, ``3 N`` force rows, ``1 + 3 N`` joint rows,
or one row of any plain feature array.
:class:`FeatureBlocks` stores all rows of all structures in one 2-D array and the block boundaries
in ``offsets`` (the layout of MACE's ``ptr``): rows of structure ``i`` are
``rows[offsets[i]:offsets[i + 1]]``.
:class:`FeatureData` is what every holder of such blocks offers the selectors (bmdal_reg's
``FeatureData``): :class:`FeatureBlocks` in memory, :class:`skntk.cache.PoolFeatures` streamed from
the feature cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from numbers import Integral

import numpy as np

from skntk._sklearn_compat import row_key

#: Row layouts. ``"plain"``/``"energy"``: any number of rows with no per-atom meaning (usually one);
#: ``"force"``: ``3 N`` rows ordered atom-major (x, y, z of atom 0, then atom 1, ...);
#: ``"joint"``: one energy row followed by ``3 N`` force rows.
KINDS = ("plain", "energy", "force", "joint")


class FeatureData(ABC):
    """Per-structure feature blocks, however they are held: the protocol selectors read.

    A subclass implements ``__len__``, :meth:`iter_chunks` and :meth:`take` and sets ``kind``,
    ``n_features`` and ``dtype``; :meth:`to_blocks` loads everything.

    Attributes
    ----------
    kind : {"plain", "energy", "force", "joint"}
        Row layout of every block (see :data:`KINDS`).
    n_features : int
        Columns of every row.
    dtype : numpy dtype
        Of the rows.
    """

    kind: str
    n_features: int
    dtype: np.dtype

    @abstractmethod
    def __len__(self) -> int:
        """Number of structures."""

    @property
    def n_structures(self) -> int:
        return len(self)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_structures, n_features)``: one structure is one sample to scikit-learn."""
        return (len(self), self.n_features)

    @abstractmethod
    def iter_chunks(self) -> Iterator[tuple[int, FeatureBlocks]]:
        """Yield ``(start, blocks)``: runs of consecutive structures, in order, covering all."""

    @abstractmethod
    def take(self, idx) -> FeatureBlocks:
        """Structures ``idx`` (array-like of int of shape (k,)), in that order, in memory."""

    def to_blocks(self) -> FeatureBlocks:
        """All structures in memory."""
        return self.take(np.arange(len(self)))


class FeatureBlocks(FeatureData):
    """Rows of a ragged set of per-structure feature blocks.

    Parameters
    ----------
    rows : array-like of shape (n_rows, n_features)
        All observation rows, structure after structure.
    offsets : array-like of int of shape (n_structures + 1,)
        Block boundaries: ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == n_rows``.
    kind : {"plain", "energy", "force", "joint"}, default="plain"
        What the rows of a block are (see :data:`KINDS`); used by per-atom reductions.

    Attributes
    ----------
    shape : tuple of (n_structures, n_features)
        Array-like shape, so that scikit-learn's indexing and length checks treat one structure
        as one sample.

    Examples
    --------
    >>> import numpy as np
    >>> from skntk.blocks import FeatureBlocks
    >>> b = FeatureBlocks(np.arange(12.0).reshape(6, 2), [0, 1, 4, 6])
    >>> len(b), b.n_rows_per_structure.tolist()
    (3, [1, 3, 2])
    >>> b[[2, 0]].rows.tolist()
    [[8.0, 9.0], [10.0, 11.0], [0.0, 1.0]]
    """

    __array_priority__ = -1  # never let numpy treat us as an array

    def __init__(self, rows, offsets, *, kind="plain"):
        rows = np.asarray(rows)
        offsets = np.asarray(offsets)
        if rows.ndim != 2:
            raise ValueError(f"rows must be 2-D (n_rows, n_features); got shape {rows.shape}.")
        if offsets.ndim != 1 or offsets.size < 1 or not np.issubdtype(offsets.dtype, np.integer):
            raise ValueError(
                f"offsets must be a 1-D integer array of length n_structures + 1; got "
                f"shape {offsets.shape} and dtype {offsets.dtype}."
            )
        if offsets[0] != 0 or offsets[-1] != rows.shape[0] or np.any(np.diff(offsets) < 0):
            raise ValueError(
                f"offsets must start at 0, be non-decreasing and end at n_rows={rows.shape[0]}; "
                f"got offsets[0]={offsets[0]}, offsets[-1]={offsets[-1]}."
            )
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}; got {kind!r}.")
        m = np.diff(offsets)
        if kind == "force" and np.any(m % 3):
            bad = int(np.flatnonzero(m % 3)[0])
            raise ValueError(
                f"kind='force' needs 3N rows per structure; structure {bad} has {m[bad]}."
            )
        if kind == "joint" and np.any((m - 1) % 3):
            bad = int(np.flatnonzero((m - 1) % 3)[0])
            raise ValueError(
                f"kind='joint' needs 1 + 3N rows per structure; structure {bad} has {m[bad]}."
            )
        self.rows = rows
        self.offsets = offsets.astype(np.int64, copy=False)
        self.kind = kind

    # -- array-like protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def n_features(self) -> int:
        return self.rows.shape[1]

    @property
    def n_rows(self) -> int:
        return self.rows.shape[0]

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self):
        return self.rows.dtype

    @property
    def n_rows_per_structure(self) -> np.ndarray:
        """ndarray of shape (n_structures,): ``m_x``, the rows of each block."""
        return np.diff(self.offsets)

    @property
    def n_atoms(self) -> np.ndarray | None:
        """ndarray of shape (n_structures,) for force/joint blocks, else None."""
        m = self.n_rows_per_structure
        if self.kind == "force":
            return m // 3
        if self.kind == "joint":
            return (m - 1) // 3
        return None

    @property
    def structure_index(self) -> np.ndarray:
        """ndarray of shape (n_rows,): the structure each row belongs to."""
        return np.repeat(np.arange(len(self)), self.n_rows_per_structure)

    def block(self, i: int) -> np.ndarray:
        """Rows of structure ``i``, shape (m_i, n_features) (a view)."""
        return self.rows[self.offsets[i]:self.offsets[i + 1]]

    def __iter__(self):
        for i in range(len(self)):
            yield self.block(i)

    def __getitem__(self, key) -> FeatureBlocks:
        """Structures ``key`` (int, slice, integer or boolean array) as new blocks."""
        key = row_key(key)  # scikit-learn's _safe_indexing passes (key, Ellipsis)
        if isinstance(key, tuple):
            raise IndexError("FeatureBlocks supports indexing by structure only.")
        n = len(self)
        if isinstance(key, Integral):
            if not -n <= key < n:
                raise IndexError(f"structure index {key} out of range for {n} structures.")
            key = [key % n]
        if isinstance(key, slice):
            idx = np.arange(n)[key]
        else:
            idx = np.asarray(key)
            if idx.dtype == bool:
                if idx.shape != (n,):
                    raise IndexError(f"boolean mask of shape {idx.shape} for {n} structures.")
                idx = np.flatnonzero(idx)
            idx = idx.astype(np.int64).reshape(-1)
            if idx.size and (idx.min() < -n or idx.max() >= n):
                raise IndexError(f"structure indices out of range for {n} structures.")
            idx = idx % n if idx.size else idx
        starts, stops = self.offsets[idx], self.offsets[idx + 1]
        m = stops - starts
        new_offsets = np.concatenate([[0], np.cumsum(m)]).astype(np.int64)
        if idx.size and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):
            rows = self.rows[starts[0]:stops[-1]]  # contiguous: a view
        else:
            row_idx = np.repeat(starts - new_offsets[:-1], m) + np.arange(new_offsets[-1])
            rows = self.rows[row_idx]
        return FeatureBlocks(rows, new_offsets, kind=self.kind)

    # -- the FeatureData protocol -----------------------------------------------------------------
    def iter_chunks(self):
        """Yield ``(0, self)``: the blocks are in memory."""
        yield 0, self

    def take(self, idx) -> FeatureBlocks:
        """Structures ``idx`` (array-like of int of shape (k,)), as ``self[idx]``."""
        return self[np.asarray(idx, dtype=np.int64).reshape(-1)]

    def to_blocks(self) -> FeatureBlocks:
        return self

    def __repr__(self) -> str:
        return (f"FeatureBlocks(n_structures={len(self)}, n_rows={self.n_rows}, "
                f"n_features={self.n_features}, kind={self.kind!r}, dtype={self.dtype})")

    # -- conversions ---------------------------------------------------------------------------
    @classmethod
    def from_array(cls, X) -> FeatureBlocks:
        """One row per structure from a plain 2-D array of shape (n_structures, n_features)."""
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(
                f"expected a 2-D array (n_structures, n_features); got shape {X.shape}."
            )
        return cls(X, np.arange(X.shape[0] + 1, dtype=np.int64), kind="plain")

    def to_array(self) -> np.ndarray:
        """The rows as a plain (n_structures, n_features) array; needs one row per structure."""
        m = self.n_rows_per_structure
        if np.any(m != 1):
            raise ValueError(
                "to_array needs exactly one row per structure; structure "
                f"{int(np.flatnonzero(m != 1)[0])} has {int(m[m != 1][0])} rows."
            )
        return self.rows

    def with_rows(self, rows) -> FeatureBlocks:
        """Same block layout and kind around new rows of shape (n_rows, any n_features)."""
        return FeatureBlocks(rows, self.offsets, kind=self.kind)

    @classmethod
    def concatenate(cls, blocks: Sequence[FeatureBlocks]) -> FeatureBlocks:
        """Structures of several containers, in order (same n_features and kind)."""
        blocks = list(blocks)
        if not blocks:
            raise ValueError("concatenate needs at least one FeatureBlocks.")
        d, kind = blocks[0].n_features, blocks[0].kind
        for i, b in enumerate(blocks):
            if b.n_features != d:
                raise ValueError(f"blocks[{i}] has n_features={b.n_features}; blocks[0] has {d}.")
            if b.kind != kind:
                raise ValueError(f"blocks[{i}] has kind={b.kind!r}; blocks[0] has {kind!r}.")
        offsets = [np.zeros(1, np.int64)]
        total = 0
        for b in blocks:
            offsets.append(b.offsets[1:] + total)
            total += b.n_rows
        return cls(np.concatenate([b.rows for b in blocks]), np.concatenate(offsets), kind=kind)


def as_blocks(X) -> FeatureBlocks:
    """``X`` as :class:`FeatureBlocks`: blocks pass through, 2-D arrays get a row per structure."""
    if isinstance(X, FeatureBlocks):
        return X
    return FeatureBlocks.from_array(X)

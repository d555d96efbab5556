"""Tests of skntk.blocks: FeatureBlocks and the FeatureData protocol."""

import pickle

import numpy as np
import pytest

from skntk._sklearn_compat import _safe_indexing
from skntk.blocks import FeatureBlocks, FeatureData, as_blocks
from skntk.cache import PoolFeatures


def _blocks(kind="plain"):
    rows = np.arange(14.0).reshape(7, 2)
    offsets = [0, 1, 4, 7] if kind != "force" else [0, 0, 3, 6]
    if kind == "force":
        rows = rows[:6]
    return FeatureBlocks(rows, offsets, kind=kind)


def test_shape_len_and_rows_per_structure():
    b = _blocks()
    assert b.shape == (3, 2) and len(b) == 3 and b.ndim == 2
    assert b.n_rows_per_structure.tolist() == [1, 3, 3]
    assert b.structure_index.tolist() == [0, 1, 1, 1, 2, 2, 2]
    np.testing.assert_array_equal(b.block(1), b.rows[1:4])
    assert [blk.shape[0] for blk in b] == [1, 3, 3]


def test_getitem_matches_blockwise_reference():
    b = _blocks()
    for key in ([2, 0], slice(1, 3), np.array([True, False, True]), 1, -1, np.array([], int)):
        sub = b[key]
        idx = np.arange(3)[key] if not isinstance(key, int) else [key % 3]
        idx = np.atleast_1d(idx)
        expected = [b.block(i) for i in idx]
        assert len(sub) == len(idx)
        for got, exp in zip(sub, expected, strict=True):
            np.testing.assert_array_equal(got, exp)


def test_getitem_errors():
    b = _blocks()
    with pytest.raises(IndexError, match="out of range for 3 structures"):
        b[3]
    with pytest.raises(IndexError, match="boolean mask of shape"):
        b[np.array([True, False])]


def test_sklearn_safe_indexing_by_structure():
    b = _blocks()
    sub = _safe_indexing(b, [2, 1])
    np.testing.assert_array_equal(sub.rows, np.concatenate([b.block(2), b.block(1)]))


def test_from_array_to_array_round_trip():
    X = np.arange(6.0).reshape(3, 2)
    b = FeatureBlocks.from_array(X)
    np.testing.assert_array_equal(b.to_array(), X)
    assert as_blocks(X).n_rows == 3 and as_blocks(b) is b
    with pytest.raises(ValueError, match="structure 1 has 3 rows"):
        _blocks().to_array()


def test_concatenate_and_with_rows():
    b = _blocks()
    c = FeatureBlocks.concatenate([b, b[[0]]])
    assert len(c) == 4
    np.testing.assert_array_equal(c.block(3), b.block(0))
    w = b.with_rows(b.rows * 2)
    assert w.offsets is b.offsets and not hasattr(w, "shortlist")  # a plain container
    with pytest.raises(ValueError, match=r"blocks\[1\] has n_features=3"):
        FeatureBlocks.concatenate([b, FeatureBlocks.from_array(np.zeros((2, 3)))])


def test_force_layout_and_validation():
    f = _blocks("force")
    assert f.n_atoms.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="structure 0 has 2"):
        FeatureBlocks(np.zeros((2, 1)), [0, 2], kind="force")
    with pytest.raises(ValueError, match="offsets must start at 0"):
        FeatureBlocks(np.zeros((2, 1)), [0, 3])
    with pytest.raises(ValueError, match="kind must be one of"):
        FeatureBlocks(np.zeros((2, 1)), [0, 2], kind="stress")


def test_pickle_round_trip():
    b = _blocks("force")
    c = pickle.loads(pickle.dumps(b))
    np.testing.assert_array_equal(c.rows, b.rows)
    np.testing.assert_array_equal(c.offsets, b.offsets)
    assert c.kind == "force"


def test_feature_blocks_are_feature_data_in_one_chunk():
    """In memory: one chunk (itself), take(idx) is self[idx], to_blocks is itself; the cached
    pool implements the same protocol."""
    b = _blocks()
    assert isinstance(b, FeatureData) and issubclass(PoolFeatures, FeatureData)
    assert b.n_structures == len(b) == 3 and b.shape == (3, 2)
    [(start, chunk)] = list(b.iter_chunks())
    assert start == 0 and chunk is b and b.to_blocks() is b
    idx = np.array([2, 0, 0])
    np.testing.assert_array_equal(b.take(idx).rows, b[idx].rows)
    np.testing.assert_array_equal(b.take(idx).offsets, b[idx].offsets)
    assert b.take([]).shape == (0, 2)
    with pytest.raises(TypeError, match="abstract"):
        FeatureData()

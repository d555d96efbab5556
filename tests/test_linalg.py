"""Tests of skntk.linalg: robust Cholesky, chunk sizing, streaming top-k, segment sums."""

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import config_context

from skntk.linalg import (
    CholeskyError,
    StreamingTopK,
    chunk_n_rows,
    gen_structure_chunks,
    robust_cholesky,
    segment_sum,
)


def test_robust_cholesky_exact_for_positive_definite():
    rng = np.random.default_rng(0)
    B = rng.normal(size=(6, 6))
    A = B @ B.T + 0.1 * np.eye(6)
    L = robust_cholesky(A)
    assert np.allclose(np.triu(L, 1), 0.0)
    np.testing.assert_allclose(L @ L.T, A, rtol=1e-13, atol=1e-13)


def test_robust_cholesky_jitters_singular_matrix_and_logs(caplog):
    rng = np.random.default_rng(1)
    g = rng.normal(size=(2, 5))
    A = g.T @ g  # rank 2, 5x5: plain Cholesky fails
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(A - 1e-12 * np.eye(5))
    with caplog.at_level(logging.WARNING, logger="skntk.linalg"):
        L = robust_cholesky(A - 1e-12 * np.eye(5))
    assert "jitter" in caplog.text
    assert np.all(np.isfinite(L))
    # the jitter is small compared with the matrix scale
    np.testing.assert_allclose(L @ L.T, A, atol=1e-6 * np.trace(A))


def test_robust_cholesky_non_finite_is_named():
    A = np.eye(3)
    A[1, 1] = np.inf
    with pytest.raises(CholeskyError, match="non-finite 3x3 matrix"):
        robust_cholesky(A)


def test_robust_cholesky_indefinite_is_named():
    A = np.diag([1.0, -1.0, 1.0])
    with pytest.raises(CholeskyError, match="not positive definite even with diagonal jitter"):
        robust_cholesky(A, max_tries=3)


def test_robust_cholesky_rejects_non_square():
    with pytest.raises(ValueError, match=r"square 2-D matrix; got shape \(2, 3\)"):
        robust_cholesky(np.ones((2, 3)))


@pytest.mark.parametrize(
    "row_bytes, max_n_rows, working_memory, expected",
    [
        (1024, None, 1, 1024),
        (1024, None, 0.99999999, 1023),
        (1023, None, 1, 1025),
        (1025, None, 1, 1023),
        (1024, None, 2, 2048),
        (1024, 7, 1, 7),
        (1024 * 1024, None, 1, 1),
    ],
)
def test_chunk_n_rows(row_bytes, max_n_rows, working_memory, expected):
    assert chunk_n_rows(row_bytes, max_n_rows=max_n_rows, working_memory=working_memory) == expected


def test_chunk_n_rows_warns_with_both_numbers():
    with pytest.warns(UserWarning, match="Currently 1MiB, 2MiB required"):
        assert chunk_n_rows(2 * 2**20, working_memory=1) == 1


def test_chunk_n_rows_reads_sklearn_config():
    with config_context(working_memory=2):
        assert chunk_n_rows(1024) == 2048


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=20), st.integers(1, 10))
def test_gen_structure_chunks_cover_each_structure_once(sizes, max_rows):
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    chunks = list(gen_structure_chunks(offsets, max_rows))
    covered = np.concatenate([np.arange(s.start, s.stop) for s in chunks])
    np.testing.assert_array_equal(covered, np.arange(len(sizes)))
    for s in chunks:
        rows = offsets[s.stop] - offsets[s.start]
        assert rows <= max_rows or s.stop - s.start == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=40), st.integers(1, 8),
       st.integers(1, 7))
def test_streaming_topk_equals_full_sort(values, k, chunk):
    scores = np.array(values, dtype=float)  # small integer range: many ties
    top = StreamingTopK(k)
    for lo in range(0, len(scores), chunk):
        top.push(scores[lo:lo + chunk], np.arange(lo, min(lo + chunk, len(scores))))
    # reference: stable sort by decreasing score, ties by index
    ref = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
    assert top.indices().tolist() == ref
    np.testing.assert_array_equal(top.scores(), scores[ref])


def test_streaming_topk_prunes_long_streams():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=5000)
    top = StreamingTopK(3)
    for lo in range(0, 5000, 100):
        top.push(scores[lo:lo + 100], np.arange(lo, lo + 100))
        assert top._scores.size <= 2 * 3 + 1024 + 100
    assert top.indices().tolist() == np.argsort(-scores)[:3].tolist()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=12), st.integers(0, 3))
def test_segment_sum_matches_loop(sizes, width):
    rng = np.random.default_rng(len(sizes))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    shape = (offsets[-1],) if width == 0 else (offsets[-1], width)
    values = rng.normal(size=shape)
    out = segment_sum(values, offsets)
    for i in range(len(sizes)):
        np.testing.assert_allclose(out[i], values[offsets[i]:offsets[i + 1]].sum(axis=0),
                                   atol=1e-12)

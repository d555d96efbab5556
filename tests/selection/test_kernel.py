"""Tests of skntk.selection._kernel: nearest centres, gram features, greedy centre loop."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skntk.blocks import FeatureBlocks
from skntk.selection._kernel import (
    gram_features_exact,
    gram_features_sketch,
    greedy_centres,
    nearest_centres,
)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 15), n_c=st.integers(1, 12),
       budget_rows=st.integers(1, 5))
def test_nearest_centres_matches_brute_force_with_ties(seed, n, n_c, budget_rows):
    rng = np.random.default_rng(seed)
    phi = rng.integers(0, 3, size=(n, 2)).astype(float)
    centres = rng.integers(0, 3, size=(n_c, 2)).astype(float)
    sq = ((phi[:, None] - centres[None]) ** 2).sum(-1)
    wm = budget_rows * 16 * n / 2**20
    min_sq, closest = nearest_centres(phi, centres, working_memory=wm)
    np.testing.assert_array_equal(min_sq, sq.min(axis=1))
    np.testing.assert_array_equal(closest, sq.argmin(axis=1))  # argmin: first index on ties


def test_gram_features_of_single_rows_give_squared_linear_kernel():
    rng = np.random.default_rng(0)
    X = FeatureBlocks.from_array(rng.normal(size=(5, 3)))
    phi = gram_features_exact(X)
    np.testing.assert_allclose(phi @ phi.T, (X.rows @ X.rows.T) ** 2, rtol=1e-12)


def test_gram_features_chunked_equal_unchunked():
    rng = np.random.default_rng(1)
    X = FeatureBlocks(rng.normal(size=(12, 3)), [0, 3, 3, 9, 12])
    a = gram_features_exact(X, working_memory=2 * 8 * 9 / 2**20)
    np.testing.assert_allclose(a, gram_features_exact(X), rtol=1e-13)
    R1, R2 = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    with pytest.warns(UserWarning, match="Could not adhere to working_memory"):
        small = gram_features_sketch(X, R1, R2, working_memory=1e-4)
    np.testing.assert_allclose(small, gram_features_sketch(X, R1, R2), rtol=1e-13)
    assert np.all(a[1] == 0)  # empty block: zero features


def test_greedy_centres_never_repeats_and_covers_everything():
    phi = np.ones((4, 2))  # all identical: every distance is zero
    for method in ("lcmd", "maxdist"):
        picks = greedy_centres(phi, 4, method=method)
        assert sorted(picks.tolist()) == [0, 1, 2, 3]

"""Tests of skntk.selection._kernel: nearest centres, gram features, greedy centre loop, kernel
density."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skntk.blocks import FeatureBlocks
from skntk.selection._kernel import (
    KernelDensity,
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


# -- kernel density ----------------------------------------------------------------------------
def density_bruteforce(X, R):
    """ρ(x) = mean_r exp(-d²(x, r) / median d²) from the gram kernel ‖G_A G_Bᵀ‖_F², by loops."""
    def k(A, B):
        return float(np.sum((A @ B.T) ** 2))

    def d2(A, B):
        return k(A, A) + k(B, B) - 2 * k(A, B)

    ref = [R.block(j) for j in range(len(R))]
    med = np.median([d2(ref[a], ref[b]) for a in range(len(ref)) for b in range(a + 1, len(ref))])
    return np.array([np.mean([np.exp(-d2(X.block(i), r) / med) for r in ref])
                     for i in range(len(X))])


@pytest.mark.parametrize("n_sketch", [1024, 8])  # 8: d(d+1)/2 = 10 > 8 forces the sketch
def test_kernel_density_equals_bruteforce_gram_kernel(n_sketch):
    rng = np.random.default_rng(30)
    sizes = [2, 3, 1, 4, 2, 3]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    X = FeatureBlocks(rng.normal(size=(offsets[-1], 4)), offsets)
    R = X[np.array([0, 2, 3, 5])]
    kde = KernelDensity(n_sketch, working_memory=1e9 if n_sketch == 1024 else 1e-9).fit(R)
    got = kde(X)
    if n_sketch == 1024:
        assert kde.route_ == "exact"
        np.testing.assert_allclose(got, density_bruteforce(X, R), rtol=1e-10)
    else:  # an unbiased sketch of the kernel: the same density up to sketch noise, in (0, 1]
        assert kde.route_ == "sketch"
        assert np.all((got > 0) & (got <= 1))
        assert np.corrcoef(got, density_bruteforce(X, R))[0, 1] > 0.5


def test_kernel_density_single_rows_is_linear_kernel_and_scale_free():
    rng = np.random.default_rng(31)
    X = FeatureBlocks(rng.normal(size=(9, 3)), np.arange(10))
    d2 = np.sum((X.rows[:, None] - X.rows[None]) ** 2, axis=-1)
    ref = np.exp(-d2 / np.median(d2[np.triu_indices(9, 1)])).mean(axis=1)
    kde = KernelDensity().fit(X)
    assert kde.route_ == "linear"
    np.testing.assert_allclose(kde(X), ref, rtol=1e-10)
    scaled = X.with_rows(7.0 * X.rows)
    np.testing.assert_allclose(KernelDensity().fit(scaled)(scaled), ref, rtol=1e-10)


def test_kernel_density_is_lower_for_an_isolated_structure():
    rng = np.random.default_rng(32)
    rows = np.vstack([rng.normal(size=(30, 3)), [[40.0, 0.0, 0.0]]])
    X = FeatureBlocks(rows, np.arange(32))
    rho = KernelDensity().fit(X)(X)
    assert np.argmin(rho) == 30 and rho[30] < 0.1 * np.median(rho)

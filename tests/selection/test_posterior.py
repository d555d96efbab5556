"""Tests of skntk.selection._posterior: feature-space posterior against kernel-space GP algebra."""

import numpy as np
import pytest

from skntk.blocks import FeatureBlocks
from skntk.selection._posterior import FeaturePosterior, condition_posterior_features


def gp_posterior_cov(T, X, sigma2):
    """Kernel-space GP posterior K_xx - K_xT (K_TT + s2 I)^-1 K_Tx of the linear kernel."""
    K_TT = T @ T.T
    K_XT = X @ T.T
    return X @ X.T - K_XT @ np.linalg.solve(K_TT + sigma2 * np.eye(len(T)), K_XT.T)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(25, 6)), rng.normal(size=(9, 6))


@pytest.mark.parametrize("sigma2", [1e-2, 0.3, 5.0])
def test_posterior_covariance_equals_kernel_space(data, sigma2):
    T, X = data
    post = FeaturePosterior(sigma2, normalize=False).fit(T)
    psi = post.transform(X).rows
    np.testing.assert_allclose(psi @ psi.T, gp_posterior_cov(T, X, sigma2), rtol=1e-10,
                               atol=1e-12)


def test_normalize_scales_kernel_to_unit_mean_train_diagonal(data):
    T, X = data
    c2 = 1.0 / np.mean(np.sum(T**2, axis=1))
    post = FeaturePosterior(0.1, normalize=True).fit(T)
    assert np.isclose(post.scale_**2, c2)
    ref = gp_posterior_cov(np.sqrt(c2) * T, np.sqrt(c2) * X, 0.1)
    np.testing.assert_allclose(post.variance(X), np.diag(ref), rtol=1e-10)


def test_fit_is_chunk_independent(data):
    T, X = data
    small = FeaturePosterior(0.1, working_memory=3 * 8 * 6 * 2 / 2**20).fit(T)
    big = FeaturePosterior(0.1).fit(T)
    np.testing.assert_allclose(small.A_, big.A_, rtol=1e-13)
    np.testing.assert_allclose(small.transform(X).rows, big.transform(X).rows, rtol=1e-11)


def test_update_equals_refit(data):
    T, X = data
    post = FeaturePosterior(0.1, normalize=False).fit(T[:20]).update(T[20:])
    ref = FeaturePosterior(0.1, normalize=False).fit(T)
    np.testing.assert_allclose(post.A_, ref.A_, rtol=1e-13)
    np.testing.assert_allclose(post.variance(X), ref.variance(X), rtol=1e-10)


def test_condition_posterior_features_equals_refit(data):
    T, X = data
    post = FeaturePosterior(0.1, normalize=False).fit(T)
    blk = X[:3]
    psi_new, Q = condition_posterior_features(post.transform(X).rows, post.transform(blk).rows,
                                              0.1)
    ref = FeaturePosterior(0.1, normalize=False).fit(np.vstack([T, blk]))
    np.testing.assert_allclose(psi_new @ psi_new.T, ref.transform(X).rows @ ref.transform(X).rows.T,
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(Q, Q.T, atol=1e-14)


def test_predict_is_ridge_regression(data):
    T, X = data
    rng = np.random.default_rng(1)
    y = rng.normal(size=len(T))
    post = FeaturePosterior(0.3, normalize=False).fit(T, y)
    w = np.linalg.solve(T.T @ T + 0.3 * np.eye(6), T.T @ y)
    np.testing.assert_allclose(post.predict(X), X @ w, rtol=1e-10)


def test_block_rows_are_independent_observations(data):
    T, X = data
    blocks = FeatureBlocks(T, [0, 5, 5, 25])  # same rows, grouped in blocks
    a = FeaturePosterior(0.2, normalize=False).fit(blocks)
    b = FeaturePosterior(0.2, normalize=False).fit(T)
    np.testing.assert_allclose(a.A_, b.A_, rtol=1e-13)


def test_errors(data):
    T, X = data
    with pytest.raises(ValueError, match="sigma2 must be > 0; got 0"):
        FeaturePosterior(0.0).fit(T)
    with pytest.raises(ValueError, match="y has 3 targets; X has 25 rows"):
        FeaturePosterior(0.1).fit(T, np.zeros(3))
    with pytest.raises(ValueError, match="normalize=True needs train features"):
        FeaturePosterior(0.1).fit(np.zeros((3, 6)))
    post = FeaturePosterior(0.1).fit(T)
    with pytest.raises(ValueError, match="n_features=5; the posterior was fitted with 6"):
        post.transform_rows(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="predict needs a posterior fitted with targets"):
        post.predict(X)

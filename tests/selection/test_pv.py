"""Tests of skntk.selection.pv: PV against kernel-space GP algebra, streaming, greedy, criteria."""

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import ortho_group
from sklearn.base import clone

from skntk._sklearn_compat import InvalidParameterError
from skntk.blocks import FeatureBlocks
from skntk.selection.pv import (
    ChunkedPosteriorVarianceSelector,
    pv_logdet,
    pv_max_atom,
    pv_mean,
    pv_trace,
)


def gp_posterior_cov(T, X, sigma2):
    """Kernel-space GP posterior K_xx - K_xT (K_TT + s2 I)^-1 K_Tx of the linear kernel."""
    K_XT = X @ T.T
    return X @ X.T - K_XT @ np.linalg.solve(T @ T.T + sigma2 * np.eye(len(T)), K_XT.T)


def random_blocks(rng, sizes, d, kind="plain"):
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return FeatureBlocks(rng.normal(size=(offsets[-1], d)), offsets, kind=kind)


def PV(sigma2=0.1, **kw):
    kw.setdefault("normalize", False)
    return ChunkedPosteriorVarianceSelector(sigma2, **kw)


# -- exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma2", [1e-3, 0.1, 2.0])
def test_pv_single_rows_equals_kernel_space_gp(sigma2):
    rng = np.random.default_rng(0)
    T, X = rng.normal(size=(30, 8)), rng.normal(size=(12, 8))
    ref = np.diag(gp_posterior_cov(T, X, sigma2))
    pv = PV(sigma2).fit(T).score_samples(X)
    np.testing.assert_allclose(pv, ref, rtol=1e-10)


def test_pv_blocks_equals_trace_of_kernel_space_block():
    rng = np.random.default_rng(1)
    T = random_blocks(rng, [3, 6, 1, 9], 7)
    X = random_blocks(rng, [6, 1, 0, 3, 12], 7)
    full = gp_posterior_cov(T.rows, X.rows, 0.05)
    ref = [np.trace(full[X.offsets[i]:X.offsets[i + 1], X.offsets[i]:X.offsets[i + 1]])
           for i in range(len(X))]
    pv = PV(0.05).fit(T).score_samples(X)
    np.testing.assert_allclose(pv, ref, rtol=1e-10, atol=1e-14)
    assert pv[2] == 0.0


def test_normalised_pv_equals_gp_of_scaled_kernel():
    rng = np.random.default_rng(2)
    T, X = 30.0 * rng.normal(size=(15, 5)), 30.0 * rng.normal(size=(6, 5))
    c = 1.0 / np.sqrt(np.mean(np.sum(T**2, axis=1)))
    ref = np.diag(gp_posterior_cov(c * T, c * X, 0.01))
    pv = ChunkedPosteriorVarianceSelector(0.01).fit(T).score_samples(X)
    np.testing.assert_allclose(pv, ref, rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 5), min_size=1, max_size=10),
       n_rows_budget=st.integers(1, 12), seed=st.integers(0, 2**16),
       criterion=st.sampled_from(["variance", "pool_variance_reduction", "density_weighted"]))
def test_chunked_equals_unchunked(sizes, n_rows_budget, seed, criterion):
    rng = np.random.default_rng(seed)
    T = rng.normal(size=(8, 4))
    X = random_blocks(rng, sizes, 4)
    wm = n_rows_budget * 3 * 8 * 4 / 2**20  # about n_rows_budget rows per chunk
    a = PV(criterion=criterion, working_memory=wm).fit(T)
    b = PV(criterion=criterion).fit(T)
    np.testing.assert_allclose(a.score_samples(X), b.score_samples(X), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(a.transform(X).rows, b.transform(X).rows, rtol=1e-12, atol=1e-14)


def test_tiny_working_memory_warns_and_still_works():
    rng = np.random.default_rng(0)
    T, X = rng.normal(size=(5, 64)), rng.normal(size=(4, 64))
    with pytest.warns(UserWarning, match="Could not adhere to working_memory"):
        pv = PV(working_memory=1e-6).fit(T).score_samples(X)
    np.testing.assert_allclose(pv, PV().fit(T).score_samples(X), rtol=1e-12)


# -- invariants --------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), n_train=st.integers(1, 12), d=st.integers(1, 6))
def test_pv_nonnegative_and_monotone_in_labelled_set(seed, n_train, d):
    rng = np.random.default_rng(seed)
    T, X = rng.normal(size=(n_train + 4, d)), rng.normal(size=(10, d))
    pv_small = PV().fit(T[:n_train]).score_samples(X)
    pv_big = PV().fit(T).score_samples(X)
    assert np.all(pv_small >= 0) and np.all(pv_big >= 0)
    assert np.all(pv_big <= pv_small * (1 + 1e-10) + 1e-14)


@pytest.mark.parametrize("reduction", ["trace", "mean", "logdet", "max_atom"])
def test_pv_invariant_under_feature_rotation(reduction):
    rng = np.random.default_rng(3)
    T = random_blocks(rng, [3, 6], 5, kind="force")
    X = random_blocks(rng, [3, 6, 9], 5, kind="force")
    R = ortho_group.rvs(5, random_state=4)
    rot = lambda b: b.with_rows(b.rows @ R)  # noqa: E731
    a = ChunkedPosteriorVarianceSelector(0.1, reduction=reduction).fit(T).score_samples(X)
    b = ChunkedPosteriorVarianceSelector(0.1, reduction=reduction).fit(rot(T)).score_samples(rot(X))
    np.testing.assert_allclose(a, b, rtol=1e-10)


@pytest.mark.parametrize("reduction", ["trace", "mean", "logdet", "max_atom"])
def test_pv_invariant_under_atom_permutation_within_structures(reduction):
    rng = np.random.default_rng(20)
    T = random_blocks(rng, [6, 9], 4, kind="force")
    X = random_blocks(rng, [9, 12], 4, kind="force")
    # permute the atoms (groups of 3 force rows) inside every structure
    row_perm = []
    for i in range(len(X)):
        n_atoms = (X.offsets[i + 1] - X.offsets[i]) // 3
        atoms = rng.permutation(n_atoms)
        row_perm.append(X.offsets[i] + (3 * atoms[:, None] + np.arange(3)).ravel())
    Xp = X.with_rows(X.rows[np.concatenate(row_perm)])
    sel = ChunkedPosteriorVarianceSelector(0.1, reduction=reduction).fit(T)
    np.testing.assert_allclose(sel.score_samples(Xp), sel.score_samples(X), rtol=1e-10)


@pytest.mark.parametrize("criterion", ["variance", "pool_variance_reduction", "density_weighted"])
@pytest.mark.parametrize("greedy", [False, True])
def test_pool_permutation_permutes_scores_and_selection(criterion, greedy):
    rng = np.random.default_rng(5)
    T, X = rng.normal(size=(6, 4)), rng.normal(size=(20, 4))
    perm = rng.permutation(20)
    sel = PV(criterion=criterion, greedy=greedy).fit(T)
    np.testing.assert_allclose(sel.score_samples(X)[perm], sel.score_samples(X[perm]), rtol=1e-10)
    idx = sel.select(X, 5)
    idx_perm = sel.select(X[perm], 5)
    np.testing.assert_array_equal(perm[idx_perm], idx)


# -- selection ---------------------------------------------------------------------------------
def test_non_greedy_select_is_top_scores_with_first_index_ties():
    T = np.eye(3)
    X = np.array([[1.0, 0, 0], [0, 0, 5.0], [0, 5.0, 0], [0, 0, 5.0]])
    sel = PV(1.0).fit(T)
    s = sel.score_samples(X)
    assert s[1] == s[2] == s[3] > s[0]
    assert sel.select(X, 3).tolist() == [1, 2, 3]
    assert sel.selected_idx_.tolist() == [1, 2, 3]


@pytest.mark.parametrize("kind_sizes", [("plain", [1] * 15), ("force", [3, 6, 3, 9, 6, 3, 6, 3])])
def test_greedy_equals_refit_with_picks_appended(kind_sizes):
    kind, sizes = kind_sizes
    rng = np.random.default_rng(6)
    T = random_blocks(rng, [3, 3], 5, kind="force" if kind == "force" else "plain")
    X = random_blocks(rng, sizes, 5, kind=kind)
    picks = PV(0.05, greedy=True).fit(T).select(X, 4)
    for k in range(4):
        chosen = X[picks[:k]]
        labelled = FeatureBlocks(np.concatenate([T.rows, chosen.rows]),
                                 np.concatenate([T.offsets, T.offsets[-1] + chosen.offsets[1:]]))
        s = PV(0.05).fit(labelled).score_samples(X)
        s[picks[:k]] = -np.inf
        assert int(np.argmax(s)) == picks[k]


def pool_mean_pv_bruteforce(T, X, sigma2):
    return np.mean(np.diag(gp_posterior_cov(T, X, sigma2)))


def test_pool_variance_reduction_equals_bruteforce_single_rows():
    rng = np.random.default_rng(7)
    T, X = rng.normal(size=(10, 6)), rng.normal(size=(25, 6))
    base = pool_mean_pv_bruteforce(T, X, 0.1)
    ref = [base - pool_mean_pv_bruteforce(np.vstack([T, X[i:i + 1]]), X, 0.1) for i in range(25)]
    got = PV(criterion="pool_variance_reduction").fit(T).score_samples(X)
    np.testing.assert_allclose(got, ref, rtol=1e-8)


def test_pool_variance_reduction_equals_bruteforce_blocks():
    rng = np.random.default_rng(8)
    T = rng.normal(size=(7, 5))
    X = random_blocks(rng, [2, 4, 1, 3, 2], 5)
    base = np.sum(np.diag(gp_posterior_cov(T, X.rows, 0.2))) / len(X)
    ref = []
    for i in range(len(X)):
        Ti = np.vstack([T, X.block(i)])
        ref.append(base - np.sum(np.diag(gp_posterior_cov(Ti, X.rows, 0.2))) / len(X))
    got = PV(0.2, criterion="pool_variance_reduction").fit(T).score_samples(X)
    np.testing.assert_allclose(got, ref, rtol=1e-8)


def test_greedy_pool_variance_reduction_equals_bruteforce_sequence():
    rng = np.random.default_rng(9)
    T, X = rng.normal(size=(4, 5)), rng.normal(size=(18, 5))
    picks = PV(criterion="pool_variance_reduction", greedy=True).fit(T).select(X, 4)
    labelled = T
    for k in range(4):
        base = pool_mean_pv_bruteforce(labelled, X, 0.1)
        gains = np.array([base - pool_mean_pv_bruteforce(np.vstack([labelled, X[i:i + 1]]), X, 0.1)
                          for i in range(18)])
        gains[picks[:k]] = -np.inf
        assert int(np.argmax(gains)) == picks[k]
        labelled = np.vstack([labelled, X[picks[k]:picks[k] + 1]])


def test_pool_variance_reduction_avoids_isolated_outlier():
    rng = np.random.default_rng(10)
    T = rng.normal(size=(5, 3))
    cluster = rng.normal(size=(60, 3)) + np.array([4.0, 0, 0])
    outlier = np.array([[0.0, 0.0, 40.0]])
    X = np.vstack([outlier, cluster])
    assert PV().fit(T).select(X, 1).tolist() == [0]
    assert PV(criterion="pool_variance_reduction").fit(T).select(X, 1)[0] != 0


def density_bruteforce(X):
    """Leave-one-out Gaussian density of each row of X among the other rows, median-heuristic
    bandwidth (loops)."""
    d2 = np.array([[np.sum((a - b) ** 2) for b in X] for a in X])
    med = np.median(d2[np.triu_indices(len(X), 1)])
    return np.array([np.mean([np.exp(-d2[i, j] / med) for j in range(len(X)) if j != i])
                     for i in range(len(X))])


@pytest.mark.parametrize("power", [0.0, 1.0, 2.5])
def test_density_weighted_is_pv_times_pool_density(power):
    rng = np.random.default_rng(12)
    T, X = rng.normal(size=(8, 4)), rng.normal(size=(25, 4))
    pv = np.diag(gp_posterior_cov(T, X, 0.1))
    got = PV(criterion="density_weighted", density_power=power).fit(T).score_samples(X)
    np.testing.assert_allclose(got, pv * density_bruteforce(X) ** power, rtol=1e-9)


def test_density_weighted_subsamples_the_pool_evenly():
    rng = np.random.default_rng(13)
    T, X = rng.normal(size=(8, 3)), rng.normal(size=(21, 3))
    ref_idx = np.linspace(0, 20, 5).round().astype(int)  # 0, 5, 10, 15, 20
    ref = X[ref_idx]
    d2 = np.sum((X[:, None] - ref[None]) ** 2, axis=-1)
    d2_ref = np.sum((ref[:, None] - ref[None]) ** 2, axis=-1)
    w = np.exp(-d2 / np.median(d2_ref[np.triu_indices(5, 1)]))
    w[ref_idx, np.arange(5)] = np.nan  # a reference structure's own term is left out
    rho = np.nanmean(w, axis=1)
    sel = PV(criterion="density_weighted", n_density_reference=5).fit(T)
    np.testing.assert_allclose(sel.score_samples(X), np.diag(gp_posterior_cov(T, X, 0.1)) * rho,
                               rtol=1e-9)


def test_density_weighted_blocks_invariant_under_feature_rotation():
    rng = np.random.default_rng(14)
    T = random_blocks(rng, [3, 6], 5, kind="force")
    X = random_blocks(rng, [3, 6, 9, 3, 6], 5, kind="force")
    R = ortho_group.rvs(5, random_state=15)
    rot = lambda b: b.with_rows(b.rows @ R)  # noqa: E731
    sel = ChunkedPosteriorVarianceSelector(0.1, criterion="density_weighted")
    np.testing.assert_allclose(sel.fit(T).score_samples(X),
                               clone(sel).fit(rot(T)).score_samples(rot(X)), rtol=1e-9)


def test_density_weighted_avoids_isolated_outlier_and_float32_agrees():
    rng = np.random.default_rng(10)
    T = rng.normal(size=(5, 3))
    cluster = rng.normal(size=(60, 3)) + np.array([4.0, 0, 0])
    X = np.vstack([[[0.0, 0.0, 40.0]], cluster])
    sel = PV(criterion="density_weighted", greedy=False).fit(T)
    picks = sel.select(X, 3)
    assert 0 not in picks.tolist()
    assert sel.select(X.astype(np.float32), 3).tolist() == picks.tolist()
    greedy = PV(criterion="density_weighted", greedy=True).fit(T).select(X, 3)
    assert 0 not in greedy.tolist()


def test_shortlist_is_running_topk_and_respected():
    rng = np.random.default_rng(11)
    T, X = rng.normal(size=(5, 4)), rng.normal(size=(50, 4))
    scores = PV().fit(T).score_samples(X)
    for greedy in (False, True):
        sel = PV(shortlist_size=10, greedy=greedy, working_memory=5 * 3 * 8 * 4 / 2**20).fit(T)
        idx = sel.select(X, 4)
        np.testing.assert_array_equal(sel.shortlist_idx_, np.argsort(-scores, kind="stable")[:10])
        assert set(idx) <= set(sel.shortlist_idx_) and len(set(idx)) == 4
    np.testing.assert_array_equal(sel.shortlist(X), np.argsort(-scores, kind="stable")[:10])
    np.testing.assert_allclose(sel.scores_, scores, rtol=1e-12)
    out = sel.transform(X)
    assert isinstance(out, np.ndarray) and out.shape == (50, 4)  # transform never drops rows
    with pytest.raises(ValueError, match=r"n_to_select=11 exceeds the 10 shortlisted candidates "
                                         r"\(shortlist_size=10\)"):
        sel.select(X, 11)


def test_shortlist_larger_than_pool_warns():
    rng = np.random.default_rng(0)
    sel = PV(shortlist_size=100).fit(rng.normal(size=(3, 2)))
    with pytest.warns(UserWarning, match="shortlist_size=100 is greater than the 8 candidates"):
        out = sel.shortlist(rng.normal(size=(8, 2)))
    assert sorted(out.tolist()) == list(range(8))


def test_transform_arrays_in_arrays_out_and_blocks_in_blocks_out():
    rng = np.random.default_rng(13)
    T, X = rng.normal(size=(5, 3)), rng.normal(size=(7, 3))
    sel = PV().fit(T)
    psi = sel.transform(X)
    assert isinstance(psi, np.ndarray) and psi.shape == (7, 3)
    np.testing.assert_allclose(np.sum(psi**2, axis=1), sel.score_samples(X), rtol=1e-12)
    blocks = random_blocks(rng, [2, 3], 3, kind="plain")
    out = sel.transform(blocks)
    assert isinstance(out, FeatureBlocks) and out.kind == "plain"
    np.testing.assert_array_equal(out.offsets, blocks.offsets)


# -- reductions --------------------------------------------------------------------------------
def test_reductions_against_plain_loops():
    rng = np.random.default_rng(14)
    offsets = np.array([0, 3, 9, 9, 15])
    psi = rng.normal(size=(15, 4))
    blocks = [psi[offsets[i]:offsets[i + 1]] for i in range(4)]
    s2 = 0.3
    trace = [np.trace(b @ b.T) for b in blocks]
    np.testing.assert_allclose(pv_trace(psi, offsets), trace)
    np.testing.assert_allclose(pv_mean(psi, offsets), [t / max(len(b), 1)
                                                       for t, b in zip(trace, blocks, strict=True)])
    logdet = [0.5 * np.linalg.slogdet(np.eye(len(b)) + b @ b.T / s2)[1] for b in blocks]
    np.testing.assert_allclose(pv_logdet(psi, offsets, sigma2=s2), logdet, atol=1e-12)
    max_atom = [max([np.trace((b @ b.T)[3 * a:3 * a + 3, 3 * a:3 * a + 3])
                     for a in range(len(b) // 3)], default=0.0) for b in blocks]
    np.testing.assert_allclose(pv_max_atom(psi, offsets, kind="force"), max_atom)
    # joint: energy row first, then force rows
    joff = np.array([0, 4, 7])
    jpsi = rng.normal(size=(7, 4))
    jb = [jpsi[1:4], jpsi[5:7]]
    with pytest.raises(ValueError):  # 2 force rows is not 3N; checked by FeatureBlocks below
        FeatureBlocks(jpsi, joff, kind="joint")
    joff = np.array([0, 4, 8])
    jpsi = rng.normal(size=(8, 4))
    jb = [jpsi[1:4], jpsi[5:8]]
    np.testing.assert_allclose(pv_max_atom(jpsi, joff, kind="joint"),
                               [np.sum(b**2) for b in jb])
    with pytest.raises(ValueError, match="max_atom' needs force or joint blocks; got kind='plain'"):
        pv_max_atom(psi, offsets, kind="plain")


def test_logdet_wide_blocks_use_feature_gram():
    rng = np.random.default_rng(15)
    psi = rng.normal(size=(7, 3))  # m = 7 > d = 3
    ref = 0.5 * np.linalg.slogdet(np.eye(7) + psi @ psi.T / 0.2)[1]
    np.testing.assert_allclose(pv_logdet(psi, np.array([0, 7]), sigma2=0.2), [ref])


def test_callable_reduction():
    rng = np.random.default_rng(16)
    T, X = rng.normal(size=(5, 3)), rng.normal(size=(6, 3))

    def neg_trace(psi, offsets, *, kind, sigma2):
        return -pv_trace(psi, offsets)

    a = PV(reduction=neg_trace).fit(T).score_samples(X)
    np.testing.assert_allclose(a, -PV().fit(T).score_samples(X))


# -- estimator plumbing ------------------------------------------------------------------------
def test_clone_params_and_pickle_of_fitted_selector():
    rng = np.random.default_rng(17)
    T, X = rng.normal(size=(5, 3)), rng.normal(size=(9, 3))
    sel = ChunkedPosteriorVarianceSelector(0.2, greedy=True, shortlist_size=6).fit(T)
    c = clone(sel)
    assert c.get_params() == sel.get_params() and not hasattr(c, "posterior_")
    c.set_params(sigma2=0.5, reduction="logdet")
    assert c.sigma2 == 0.5 and sel.sigma2 == 0.2
    s = pickle.loads(pickle.dumps(sel))
    np.testing.assert_array_equal(s.score_samples(X), sel.score_samples(X))
    np.testing.assert_array_equal(s.select(X, 3), sel.select(X, 3))


def test_score_is_one_float_and_prefers_informative_batches():
    rng = np.random.default_rng(18)
    T = rng.normal(size=(3, 4))
    X = rng.normal(size=(40, 4))
    y = X @ np.array([1.0, -2.0, 0.5, 3.0])
    score = PV(n_to_select=8).fit(T).score(X, y)
    assert isinstance(score, float) and -1.0 < score <= 0.0


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_bad_input_errors():
    rng = np.random.default_rng(19)
    T, X = rng.normal(size=(5, 4)), rng.normal(size=(10, 4))
    sel = PV().fit(T)
    with pytest.raises(ValueError, match=r"Found array with 0 sample\(s\)"):
        sel.select(np.empty((0, 4)), 1)
    with pytest.raises(ValueError, match="X has 0 structures"):
        sel.select(FeatureBlocks(np.empty((0, 4)), [0]), 1)
    Xnan = X.copy()
    Xnan[3, 1] = np.nan
    with pytest.raises(ValueError, match="Input X contains NaN"):
        sel.score_samples(Xnan)
    Xinf = FeatureBlocks(np.vstack([X, [[np.inf, 0, 0, 0]]]), [0, 5, 10, 11])
    with pytest.raises(ValueError, match=r"NaN or infinity: structure 2 \(row 10\)"):
        sel.select(Xinf, 1)
    with pytest.raises(ValueError, match="X has 3 features, but ChunkedPosteriorVarianceSelector "
                                         "is expecting 4 features"):
        sel.select(X[:, :3], 1)
    with pytest.raises(ValueError, match="X has 3 features, but"):
        sel.transform(FeatureBlocks.from_array(X[:, :3]))
    with pytest.raises(ValueError, match="n_to_select=11 exceeds the 10 candidates in X"):
        sel.select(X, 11)
    with pytest.raises(ValueError, match="n_to_select must be None"):
        sel.select(X, -0.5)
    for bad in (0.0, -1.0):
        with pytest.raises(InvalidParameterError, match="'sigma2' parameter"):
            ChunkedPosteriorVarianceSelector(bad).fit(T)
    with pytest.raises(InvalidParameterError, match="'reduction' parameter"):
        ChunkedPosteriorVarianceSelector(reduction="median").fit(T)
    with pytest.raises(ValueError, match=r"X\[0\] has an entry of magnitude 1e\+200, whose "
                                         "square overflows; use normalize=True"):
        PV().fit(np.full((3, 4), 1e200))
    # normalize=True divides huge train features by their largest entry first: finite scores
    huge = ChunkedPosteriorVarianceSelector().fit(np.full((3, 4), 1e200) + T[:3] * 1e199)
    assert np.all(np.isfinite(huge.score_samples(X * 1e200)))
    with pytest.raises(ValueError, match="normalize=True needs train features with a positive"):
        ChunkedPosteriorVarianceSelector().fit(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="max_atom' needs force or joint blocks"):
        PV(reduction="max_atom").fit(T).score_samples(X)

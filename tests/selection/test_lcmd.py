"""Tests of skntk.selection.lcmd against a plain O(n^2) reference of bmdal_reg's LCMD."""

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone

from skntk._sklearn_compat import InvalidParameterError
from skntk.blocks import FeatureBlocks
from skntk.selection.lcmd import LCMDSelector
from skntk.selection.pv import ChunkedPosteriorVarianceSelector


def lcmd_reference(pool, train, n_to_select, sel_with_train=True):
    """bmdal_reg's LargestClusterMaxDistSelectionMethod, written out with a full distance matrix."""
    n_pool = len(pool)
    feats = np.vstack([pool, train]) if sel_with_train and len(train) else pool
    K = feats @ feats.T
    sq = np.diag(K)[:, None] + np.diag(K)[None, :] - 2 * K
    min_sq = [np.inf] * n_pool
    closest = [0] * n_pool
    n_added = 0
    selected = []

    def add(i):
        nonlocal n_added
        for p in range(n_pool):
            if sq[i, p] < min_sq[p]:
                min_sq[p] = sq[i, p]
                closest[p] = n_added + 1
        n_added += 1

    for t in range(len(feats) - n_pool):
        add(n_pool + t)
    for _ in range(n_to_select):
        if n_added == 0:
            diag = [K[p, p] for p in range(n_pool)]
            j = diag.index(max(diag))
        else:
            sizes = {}
            for p in range(n_pool):
                sizes[closest[p]] = sizes.get(closest[p], 0.0) + min_sq[p]
            biggest = max(sizes.values())
            scores = [min_sq[p] if sizes[closest[p]] == biggest and p not in selected else -np.inf
                      for p in range(n_pool)]
            j = scores.index(max(scores))
        selected.append(j)
        add(j)
    return selected


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n_pool=st.integers(1, 25), n_train=st.integers(0, 6),
       d=st.integers(1, 4), sel_with_train=st.booleans(), data=st.data())
def test_lcmd_equals_reference_on_random_data(seed, n_pool, n_train, d, sel_with_train, data):
    rng = np.random.default_rng(seed)
    pool, train = rng.normal(size=(n_pool, d)), rng.normal(size=(max(n_train, 1), d))[:n_train]
    n = data.draw(st.integers(1, n_pool))
    ref = lcmd_reference(pool, train, n, sel_with_train)
    if n_train == 0:  # fit needs labelled structures; P mode is the no-train case
        train, sel_with_train = rng.normal(size=(1, d)), False
    got = LCMDSelector(n, sel_with_train=sel_with_train).fit(train).select(pool)
    assert got.tolist() == ref


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n_pool=st.integers(2, 20), n_train=st.integers(1, 5),
       sel_with_train=st.booleans())
def test_lcmd_equals_reference_with_ties(seed, n_pool, n_train, sel_with_train):
    rng = np.random.default_rng(seed)
    # integer coordinates in {0, 1, 2}: many exactly equal distances and cluster sizes
    pool = rng.integers(0, 3, size=(n_pool, 2)).astype(float)
    train = rng.integers(0, 3, size=(n_train, 2)).astype(float)
    n = int(rng.integers(1, n_pool + 1))
    ref = lcmd_reference(pool, train, n, sel_with_train)
    got = LCMDSelector(n, sel_with_train=sel_with_train).fit(train).select(pool)
    assert got.tolist() == ref
    assert len(set(got.tolist())) == n


def test_first_index_tie_break_and_no_train_start():
    pool = np.array([[1.0, 0], [3.0, 0], [0, 3.0], [3.0, 0]])
    # P mode: start at the largest k(x, x) = 9, first index among the three ties
    assert LCMDSelector(1, sel_with_train=False).fit(pool).select(pool).tolist() == [1]
    # with a centre at the origin, pool[1], pool[2] and pool[3] are equally far: first index
    assert LCMDSelector(1).fit(np.zeros((1, 2))).select(pool).tolist() == [1]


def test_largest_cluster_wins_over_farthest_point():
    train = np.array([[0.0, 0.0], [10.0, 0.0]])
    # cluster of centre 1 (x=10): many moderately far members; centre 0: one far member
    pool = np.array([[0.0, 3.0]] + [[10.0, 2.0 + 0.01 * i] for i in range(10)])
    idx = LCMDSelector(1).fit(train).select(pool)
    assert idx.tolist() == [10]  # farthest member of the largest cluster, not pool[0]


def test_never_repeats_even_with_duplicates():
    pool = np.zeros((6, 2))
    idx = LCMDSelector(6).fit(np.zeros((2, 2))).select(pool)
    assert sorted(idx.tolist()) == list(range(6))


def test_after_a_selector_step_indices_map_to_pool():
    """In a pipeline, LCMD sees only the rows the step before it picked; indices map back."""
    from skntk.pipeline import SelectionPipeline
    from skntk.selection.baselines import MaxDistSelector

    rng = np.random.default_rng(0)
    train, pool = rng.normal(size=(4, 3)), rng.normal(size=(30, 3))
    # MaxDist (linear kernel: its transform is the identity) picks 6, LCMD 3 of those
    pipe = SelectionPipeline([("maxdist", MaxDistSelector(6)), ("lcmd", LCMDSelector(3))])
    idx = pipe.fit(train).select(pool)
    shortlist = MaxDistSelector(6).fit(train).select(pool)
    assert sorted(shortlist.tolist()) != list(range(6))
    ref = lcmd_reference(pool[shortlist], train, 3)
    assert idx.tolist() == shortlist[ref].tolist()


def gram_kernel_reference(A, B):
    return np.sum((A @ B.T) ** 2)


def test_gram_kernel_exact_route_equals_reference():
    rng = np.random.default_rng(1)
    sizes_t, sizes_p = [3, 6], [3, 9, 6, 3, 3, 6]
    T = FeatureBlocks(rng.normal(size=(9, 4)), np.r_[0, np.cumsum(sizes_t)], kind="force")
    P = FeatureBlocks(rng.normal(size=(30, 4)), np.r_[0, np.cumsum(sizes_p)], kind="force")
    sel = LCMDSelector(4).fit(T)
    assert sel.kernel_ == "gram" and sel.gram_features_ == "exact"
    phi = sel.transform(P)
    K = np.array([[gram_kernel_reference(P.block(i), P.block(j)) for j in range(6)]
                  for i in range(6)])
    np.testing.assert_allclose(phi @ phi.T, K, rtol=1e-10)
    # the selection is LCMD on that kernel: compare with the reference on explicit features
    ref = lcmd_reference(phi, sel.transform(T), 4)
    assert sel.select(P).tolist() == ref


def test_gram_kernel_is_rotation_invariant():
    rng = np.random.default_rng(2)
    from scipy.stats import ortho_group

    R = ortho_group.rvs(4, random_state=3)
    T = FeatureBlocks(rng.normal(size=(6, 4)), [0, 3, 6], kind="force")
    P = FeatureBlocks(rng.normal(size=(18, 4)), [0, 3, 9, 12, 18], kind="force")
    a = LCMDSelector(3).fit(T).select(P)
    b = LCMDSelector(3).fit(T.with_rows(T.rows @ R)).select(P.with_rows(P.rows @ R))
    assert a.tolist() == b.tolist()


def test_gram_sketch_is_unbiased():
    rng = np.random.default_rng(4)
    P = FeatureBlocks(rng.normal(size=(9, 5)), [0, 3, 9], kind="force")
    exact = gram_kernel_reference(P.block(0), P.block(1))
    ests = []
    for seed in range(40):
        sel = LCMDSelector(gram_features="sketch", n_sketch_features=256, random_state=seed)
        phi = sel.fit(P).transform(P)
        ests.append(phi[0] @ phi[1])
    ests = np.array(ests)
    # unbiased: the mean over seeds is within 4 standard errors of the exact kernel
    assert abs(ests.mean() - exact) < 4 * ests.std() / np.sqrt(len(ests)) + 1e-9
    assert ests.std() > 0  # really random


def test_posterior_features_equal_pv_transform_route():
    rng = np.random.default_rng(5)
    train, pool = rng.normal(size=(8, 3)), rng.normal(size=(40, 3))
    own = LCMDSelector(5, features="posterior", sigma2=0.01).fit(train).select(pool)
    pv = ChunkedPosteriorVarianceSelector(0.01).fit(train)
    chained = LCMDSelector(5).fit(pv.transform(train)).select(pv.transform(pool))
    assert own.tolist() == chained.tolist()


def test_linear_kernel_rejects_multi_row_blocks():
    P = FeatureBlocks(np.zeros((4, 2)), [0, 1, 4])
    with pytest.raises(ValueError, match="needs one row per structure; structure 1"):
        LCMDSelector(1, kernel="linear").fit(P)


def test_score_samples_are_distances_to_train_centres():
    train = np.array([[0.0, 0.0], [4.0, 0.0]])
    pool = np.array([[1.0, 0.0], [4.0, 2.0]])
    np.testing.assert_allclose(LCMDSelector().fit(train).score_samples(pool), [1.0, 4.0])
    np.testing.assert_allclose(LCMDSelector(sel_with_train=False).fit(train).score_samples(pool),
                               [1.0, 20.0])


def test_chunked_train_centres_equal_unchunked():
    rng = np.random.default_rng(6)
    train, pool = rng.normal(size=(50, 3)), rng.normal(size=(20, 3))
    with pytest.warns(UserWarning, match="Could not adhere"):
        a = LCMDSelector(6, working_memory=1e-7).fit(train).select(pool)
    b = LCMDSelector(6).fit(train).select(pool)
    assert a.tolist() == b.tolist() == lcmd_reference(pool, train, 6)


def test_clone_and_pickle():
    rng = np.random.default_rng(7)
    train, pool = rng.normal(size=(5, 3)), rng.normal(size=(12, 3))
    sel = LCMDSelector(3, features="posterior").fit(train)
    assert clone(sel).get_params() == sel.get_params()
    s = pickle.loads(pickle.dumps(sel))
    assert s.select(pool).tolist() == sel.select(pool).tolist()


def test_bad_input():
    rng = np.random.default_rng(8)
    sel = LCMDSelector(3).fit(rng.normal(size=(5, 3)))
    with pytest.raises(ValueError, match="n_to_select=13 exceeds the 12 candidates"):
        sel.select(rng.normal(size=(12, 3)), 13)
    with pytest.raises(ValueError, match="X has 2 features, but LCMDSelector is expecting 3"):
        sel.select(rng.normal(size=(12, 2)))
    with pytest.raises(ValueError, match="Input X contains infinity"):
        sel.select(np.full((4, 3), np.inf))
    with pytest.raises(InvalidParameterError, match="'kernel' parameter of LCMDSelector"):
        LCMDSelector(kernel="rbf").fit(rng.normal(size=(5, 3)))
    with pytest.raises(InvalidParameterError, match="'sigma2' parameter of LCMDSelector"):
        LCMDSelector(sigma2=0).fit(rng.normal(size=(5, 3)))

"""Tests of skntk.selection.baselines: RandomSelector and MaxDistSelector."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skntk.selection.baselines import MaxDistSelector, RandomSelector


def maxdist_reference(pool, train, n_to_select):
    """Farthest-point selection with a full distance matrix (bmdal_reg's MaxDist)."""
    feats = np.vstack([pool, train]) if len(train) else pool
    sq = ((feats[:, None, :] - feats[None, :, :]) ** 2).sum(-1)
    n_pool = len(pool)
    centres = list(range(n_pool, len(feats)))
    selected = []
    for _ in range(n_to_select):
        if not centres:
            norms = (pool**2).sum(1)
            j = int(np.argmax(norms))
        else:
            d = sq[np.ix_(centres, range(n_pool))].min(axis=0)
            d[selected] = -np.inf
            j = int(np.argmax(d))
        selected.append(j)
        centres.append(j)
    return selected


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n_pool=st.integers(1, 20), n_train=st.integers(0, 5),
       integer=st.booleans())
def test_maxdist_equals_reference(seed, n_pool, n_train, integer):
    rng = np.random.default_rng(seed)
    draw = ((lambda s: rng.integers(0, 3, size=s).astype(float)) if integer
            else (lambda s: rng.normal(size=s)))
    pool, train = draw((n_pool, 3)), draw((n_train, 3))
    n = int(rng.integers(1, n_pool + 1))
    ref = maxdist_reference(pool, train, n)
    fit_on, with_train = (train, True) if n_train else (pool[:1], False)
    got = MaxDistSelector(n, sel_with_train=with_train).fit(fit_on).select(pool)
    assert got.tolist() == ref


def test_maxdist_picks_farthest_point_not_largest_cluster():
    train = np.array([[0.0, 0.0], [10.0, 0.0]])
    pool = np.array([[0.0, 3.0]] + [[10.0, 2.0 + 0.01 * i] for i in range(10)])
    assert MaxDistSelector(1).fit(train).select(pool).tolist() == [0]


def test_random_selector_unique_and_reproducible():
    X = np.zeros((50, 2))
    sel = RandomSelector(10, random_state=0).fit(X)
    a, b = sel.select(X), sel.select(X)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 10 and a.max() < 50
    assert RandomSelector(10, random_state=1).fit(X).select(X).tolist() != a.tolist()
    with pytest.raises(ValueError, match=r"n_to_select=51 exceeds the 50 candidates in X"):
        sel.select(X, 51)


def test_random_selector_is_uniform():
    X = np.zeros((5, 1))
    counts = np.zeros(5)
    rng = np.random.RandomState(0)
    for _ in range(500):
        counts[RandomSelector(1, random_state=rng).fit(X).select(X)] += 1
    assert counts.min() > 60  # each ~100 expected

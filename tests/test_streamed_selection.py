"""The one streamed selection path: selector steps chained by indices, the old PV → LCMD chain
reproduced, float32 screening equal to float64, pools streamed from feature shards in flat memory.
"""

import tracemalloc

import numpy as np
import pytest
from ase import Atoms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.base import BaseEstimator, TransformerMixin

from skntk.blocks import FeatureBlocks
from skntk.parallel import featurize
from skntk.pipeline import make_pv_lcmd_pipeline
from skntk.selection.pv import ChunkedPosteriorVarianceSelector


def psi_reference(train, rows, sigma2):
    """Ψ = σ c G L⁻ᵀ with A = c² TᵀT + σ² I (c² = 1 / mean squared train row norm), plainly."""
    c2 = 1.0 / np.mean(np.sum(train**2, axis=1))
    A = c2 * train.T @ train + sigma2 * np.eye(train.shape[1])
    return np.sqrt(sigma2 * c2) * np.linalg.solve(np.linalg.cholesky(A), rows.T).T


def lcmd_reference(cand, centres, n):
    """LCMD with the train centres, squared Euclidean distances written out (bmdal semantics)."""
    C, picks = list(centres), []
    for _ in range(n):
        d2 = np.array([[np.sum((x - c) ** 2) for c in C] for x in cand])
        nearest, mind = d2.argmin(axis=1), d2.min(axis=1)
        sizes = np.bincount(nearest, weights=mind, minlength=len(C))
        ok = [i for i in range(len(cand)) if sizes[nearest[i]] == sizes.max() and i not in picks]
        j = max(ok, key=lambda i: (mind[i], -i))
        picks.append(j)
        C.append(cand[j])
    return picks


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(20, 80), d=st.integers(2, 6),
       m=st.integers(5, 20), b=st.integers(1, 5))
def test_pipeline_picks_equal_the_plain_pv_then_lcmd_chain(seed, n, d, m, b):
    rng = np.random.default_rng(seed)
    train, pool = rng.normal(size=(8, d)), rng.normal(size=(n, d)) * rng.uniform(0.5, 2, n)[:, None]
    m = min(m, n)
    b = min(b, m)
    pipe = make_pv_lcmd_pipeline(n_to_select=b, shortlist_size=m, sigma2=1e-2).fit(train)
    idx = pipe.select(pool)
    psi = psi_reference(train, pool, 1e-2)
    scores = np.sum(psi**2, axis=1)
    shortlist = np.argsort(-scores, kind="stable")[:m]
    ref = shortlist[lcmd_reference(psi[shortlist], psi_reference(train, train, 1e-2), b)]
    assert idx.tolist() == ref.tolist()
    np.testing.assert_allclose(pipe["pv"].scores_, scores, rtol=1e-9)
    assert pipe["pv"].shortlist_idx_.tolist() == shortlist.tolist()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 40), blocks=st.booleans())
def test_float32_screening_picks_the_float64_indices(seed, m, blocks):
    rng = np.random.default_rng(seed)
    if blocks:
        sizes = rng.integers(1, 5, size=300)
        X32 = FeatureBlocks(rng.normal(size=(sizes.sum(), 8)).astype(np.float32),
                            np.r_[0, np.cumsum(sizes)], kind="plain")
        X64 = X32.with_rows(X32.rows.astype(np.float64))
    else:
        X32 = rng.normal(size=(300, 8)).astype(np.float32)
        X64 = X32.astype(np.float64)  # the same numbers
    T = rng.normal(size=(12, 8))
    sel = ChunkedPosteriorVarianceSelector(1e-3, shortlist_size=m, working_memory=0.01).fit(T)
    short32 = sel.shortlist(X32).copy()
    s32 = sel.scores_.copy()
    short64 = sel.shortlist(X64).copy()
    exact = sel.score_samples(X64)
    assert short32.tolist() == short64.tolist()
    np.testing.assert_allclose(s32[short32], exact[short32], rtol=1e-12)  # rescored in float64
    np.testing.assert_allclose(s32, exact, rtol=1e-4)  # the rest: float32 precision
    assert sel.select(X32, min(m, 5)).tolist() == sel.select(X64, min(m, 5)).tolist()


def test_float32_overflow_is_refused_by_name():
    rng = np.random.default_rng(0)
    T = rng.normal(size=(20, 4))
    X = rng.normal(size=(50, 4)).astype(np.float32)
    X[31] = 1e25  # finite in float32; its squared posterior feature is not
    sel = ChunkedPosteriorVarianceSelector(shortlist_size=5).fit(T)
    assert np.isfinite(sel.score_samples(X)[31])  # float64 scores are fine
    with pytest.raises(ValueError, match=r"X\[31\]: its posterior variance overflows float32 "
                                         r".*pass float64 features"):
        sel.shortlist(X)
    with pytest.raises(ValueError, match=r"X\[31\]: its posterior variance overflows float32"):
        make_pv_lcmd_pipeline(n_to_select=2, shortlist_size=5).fit(T).select(X)
    assert 31 in sel.shortlist(X.astype(np.float64))


class HashFeatures(TransformerMixin, BaseEstimator):
    """A cheap deterministic featuriser of ase.Atoms: ``d`` float32 numbers from the positions."""

    def __init__(self, d=64):
        self.d = d

    def fit(self, X, y=None):
        self.n_features_out_ = self.d
        return self

    def transform(self, X):
        rows = []
        for a in X:
            seed = int(abs(np.sum(a.positions) * 1e6)) % (2**32)
            rows.append(np.random.default_rng(seed).normal(size=self.d))
        return np.asarray(rows, dtype=np.float32)


def atoms_pool(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Atoms("H2", positions=rng.normal(size=(2, 3)) * 3) for _ in range(n)]


@pytest.mark.parametrize("criterion", ["variance", "pool_variance_reduction", "density_weighted"])
def test_streamed_pipeline_equals_the_in_memory_one(tmp_path, criterion):
    pool = atoms_pool(300)
    train = atoms_pool(20, seed=1)
    pipe = make_pv_lcmd_pipeline(HashFeatures(), n_to_select=6, shortlist_size=40,
                                 criterion=criterion).fit(train)
    in_memory = pipe.select(pool)
    pipe.set_params(feature_cache=tmp_path)
    assert pipe.select(pool).tolist() == in_memory.tolist()
    assert pipe.select(iter(pool)).tolist() == in_memory.tolist()  # a one-shot iterator
    # the final step saw only the shortlisted rows
    assert set(in_memory.tolist()) <= set(pipe["pv"].shortlist_idx_.tolist())
    assert len(pipe["pv"].scores_) == 300


def test_selection_from_shards_has_flat_memory(tmp_path):
    """Peak memory of a selection from shards grows by far less than the pool's rows."""
    d = 64
    peaks = {}
    train = HashFeatures(d).fit(None).transform(atoms_pool(50, seed=1))
    for n in (2000, 8000):
        feats = featurize(HashFeatures(d).fit(None), atoms_pool(n), tmp_path / str(n),
                          shard_size=250)
        pipe = make_pv_lcmd_pipeline(n_to_select=10, shortlist_size=100,
                                     working_memory=1).fit(train)
        pipe.select(feats)  # warm
        tracemalloc.start()
        idx = pipe.select(feats)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(set(idx.tolist())) == 10
    rows_per_structure = d * 4  # float32 bytes: what holding the pool would cost
    growth = (peaks[8000] - peaks[2000]) / 6000
    # O(n) bookkeeping only (scores, indices: tens of bytes per structure), not the rows
    assert growth < rows_per_structure / 4, (peaks, growth)
    print(f"peak traced memory of select: {peaks}; {growth:.1f} B per extra structure")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_train=st.integers(0, 30), b=st.integers(1, 12))
def test_lcmd_float32_assignment_picks_the_float64_indices(seed, n_train, b):
    from skntk.selection.lcmd import LCMDSelector

    rng = np.random.default_rng(seed)
    T = rng.normal(size=(max(n_train, 1), 6)).astype(np.float32)
    X = (rng.normal(size=(200, 6)) * rng.uniform(0.2, 3, size=(200, 1))).astype(np.float32)
    kw = dict(sel_with_train=n_train > 0, working_memory=0.005)  # many chunks
    p32 = LCMDSelector(b, **kw).fit(T).select(X)
    p64 = LCMDSelector(b, **kw).fit(T.astype(np.float64)).select(X.astype(np.float64))
    assert p32.tolist() == p64.tolist()
    if n_train:
        ref = lcmd_reference(X.astype(np.float64), T.astype(np.float64), b)
        assert p64.tolist() == ref


def test_nearest_centres_equal_a_plain_argmin():
    from skntk.selection._kernel import nearest_centres

    rng = np.random.default_rng(3)
    phi, C = rng.normal(size=(500, 5)), rng.normal(size=(37, 5))
    d2 = ((phi[:, None, :] - C[None]) ** 2).sum(-1)
    for x in (phi, phi.astype(np.float32)):
        sq, arg = nearest_centres(x, C, working_memory=0.002)
        assert arg.tolist() == d2.argmin(axis=1).tolist()
        exact = ((np.asarray(x, np.float64) - C[arg]) ** 2).sum(-1)
        np.testing.assert_allclose(sq, exact, rtol=1e-12)

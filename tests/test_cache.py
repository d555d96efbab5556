import numpy as np
import pytest
from ase.build import molecule
from sklearn.base import BaseEstimator, TransformerMixin

from skntk.blocks import FeatureBlocks
from skntk.cache import transform_cached


class CountingTransformer(TransformerMixin, BaseEstimator):
    """Force-like blocks (3N rows of positions) that count calls and can fail on demand."""

    def __init__(self, scale=1.0):
        self.scale = scale

    def fit(self, X=None, y=None):
        self.calls_ = 0
        self.fail_after = None  # set by a test to simulate Ctrl-C; not a parameter
        return self

    def transform(self, X):
        if self.fail_after is not None and self.calls_ >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls_ += 1
        rows = np.concatenate([(a.positions * self.scale).reshape(-1, 1) @ np.ones((1, 2))
                               for a in X])
        m = [3 * len(a) for a in X]
        return FeatureBlocks(rows, np.concatenate([[0], np.cumsum(m)]), kind="force")


@pytest.fixture
def structures():
    mols = ["H2O", "CH4", "NH3", "C2H6", "CO2", "HCN", "H2", "O2"]
    out = []
    for i, name in enumerate(mols):
        a = molecule(name)
        a.rattle(0.01, seed=i)
        out.append(a)
    return out


def test_resume_after_interruption(tmp_path, structures):
    full = CountingTransformer().fit().transform(structures)
    interrupted = CountingTransformer().fit()
    interrupted.fail_after = 2
    with pytest.raises(KeyboardInterrupt):
        transform_cached(interrupted, structures, tmp_path, shard_size=3)
    assert len(list(tmp_path.glob("shard-*.npz"))) == 2  # the finished shards are kept
    resumed = CountingTransformer().fit()
    got = transform_cached(resumed, structures, tmp_path, shard_size=3)
    assert resumed.calls_ == 1  # only the missing third shard is computed
    np.testing.assert_array_equal(got.rows, full.rows)
    np.testing.assert_array_equal(got.offsets, full.offsets)
    assert got.kind == "force"
    again = CountingTransformer().fit()
    transform_cached(again, structures, tmp_path, shard_size=3)
    assert again.calls_ == 0


def test_stale_cache_refused(tmp_path, structures):
    transform_cached(CountingTransformer().fit(), structures, tmp_path, shard_size=4)
    with pytest.raises(ValueError, match="other structures or transformer parameters"):
        transform_cached(CountingTransformer(scale=2.0).fit(), structures, tmp_path, shard_size=4)
    moved = [a.copy() for a in structures]
    moved[5].positions[0, 0] += 1e-3
    with pytest.raises(ValueError, match="other structures"):
        transform_cached(CountingTransformer().fit(), moved, tmp_path, shard_size=4)

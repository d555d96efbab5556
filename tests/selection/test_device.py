"""The selection's products in torch on a device (here the CPU, as CI has no GPU) pick what the
NumPy path picks: PV top-M in float64 and float32 screening, LCMD and MaxDist with train centres."""

import numpy as np
import pytest
import torch

from skntk.blocks import FeatureBlocks
from skntk.linalg import DeviceProduct, array_device
from skntk.pipeline import make_pv_lcmd_pipeline
from skntk.selection import ChunkedPosteriorVarianceSelector, LCMDSelector, MaxDistSelector


def test_array_device_and_product():
    assert array_device(None) is None
    assert array_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert array_device("auto") is None  # no GPU: NumPy on the host
    right = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # columns 0 and 1 always tie
    rows = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 1.0]])
    for dev in (None, torch.device("cpu")):
        p = DeviceProduct(right, dev)
        assert p.argmax(rows).tolist() == [0, 2, 0]  # ties: the first column
        np.testing.assert_allclose(p(rows), rows @ right)
        out = np.empty((3, 3))
        assert p(rows, out=out) is out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pv_on_a_device_ranks_like_numpy(dtype, monkeypatch):
    rng = np.random.default_rng(0)
    train = rng.normal(size=(40, 16))
    pool = rng.normal(size=(3000, 16)) * rng.uniform(0.2, 2.0, size=(3000, 1))
    host = ChunkedPosteriorVarianceSelector(shortlist_size=200, working_memory=0.05).fit(train)
    dev = ChunkedPosteriorVarianceSelector(shortlist_size=200, working_memory=0.05,
                                           device="cpu").fit(train)
    P = pool.astype(dtype)
    expected = host.shortlist(P)
    sent = []
    real = torch.from_numpy
    monkeypatch.setattr(torch, "from_numpy", lambda a: sent.append(a.shape) or real(a))
    np.testing.assert_array_equal(dev.shortlist(P), expected)
    assert sum(s[0] for s in sent if s[1:] == (16,)) >= 3000  # every row went through torch
    np.testing.assert_allclose(dev.score_samples(P), host.score_samples(P),
                               rtol=1e-5 if dtype == np.float32 else 1e-10)


@pytest.mark.parametrize("Sel", [LCMDSelector, MaxDistSelector])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_centre_selectors_on_a_device_pick_like_numpy(Sel, dtype, monkeypatch):
    rng = np.random.default_rng(1)
    train, pool = rng.normal(size=(300, 8)), rng.normal(size=(2000, 8)).astype(dtype)
    host = Sel(n_to_select=25, working_memory=0.05).fit(train)
    dev = Sel(n_to_select=25, working_memory=0.05, device="cpu").fit(train)
    expected = host.select(pool).tolist()
    calls = []
    real = torch.argmax
    monkeypatch.setattr(torch, "argmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert dev.select(pool).tolist() == expected
    assert calls  # the assignment ran in torch
    np.testing.assert_allclose(dev.score_samples(pool), host.score_samples(pool), rtol=1e-12)


def test_pipeline_on_a_device_with_gram_blocks():
    """Joint-like multi-row blocks (gram kernel) through the whole PV -> LCMD chain."""
    rng = np.random.default_rng(2)

    def blocks(n, m):
        return FeatureBlocks(rng.normal(size=(n * m, 6)), np.arange(0, n * m + 1, m))

    train, pool = blocks(30, 3), blocks(500, 3)
    host = make_pv_lcmd_pipeline(n_to_select=8, shortlist_size=60).fit(train)
    dev = make_pv_lcmd_pipeline(n_to_select=8, shortlist_size=60, device="cpu").fit(train)
    assert dev.select(pool).tolist() == host.select(pool).tolist()

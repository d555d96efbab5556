import re

import numpy as np
import pytest
import torch
from ase.build import molecule
from sklearn.base import BaseEstimator, TransformerMixin

from skntk.blocks import FeatureBlocks
from skntk.cache import CorruptCacheWarning, structure_key, transform_cached, transformer_key
from skntk.models.builtin import BuiltinMLIP
from skntk.transformers import ForceNTKTransformer


class CountingTransformer(TransformerMixin, BaseEstimator):
    """Force-like blocks (3N rows of positions) that count structures and can fail on demand."""

    def __init__(self, scale=1.0):
        self.scale = scale

    def fit(self, X=None, y=None):
        self.calls_ = 0
        self.seen_ = 0
        self.fail_after = None  # simulate Ctrl-C once this many structures are done
        return self

    def transform(self, X):
        X = list(X)
        if self.fail_after is not None and self.seen_ + len(X) > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls_ += 1
        self.seen_ += len(X)
        rows = np.concatenate([(a.positions * self.scale).reshape(-1, 1) @ np.ones((1, 2))
                               for a in X])
        m = [3 * len(a) for a in X]
        return FeatureBlocks(rows, np.concatenate([[0], np.cumsum(m)]), kind="force")


class CountingNTK(ForceNTKTransformer):
    """The real transformer, counting the structures it featurises."""

    def fit(self, X=None, y=None):
        self.seen_ = 0
        return super().fit(X, y)

    def transform(self, X):
        X = list(X)
        self.seen_ += len(X)
        return super().transform(X)


@pytest.fixture
def structures():
    mols = ["H2O", "CH4", "NH3", "C2H6", "CO2", "HCN", "H2", "O2"]
    out = []
    for i, name in enumerate(mols):
        a = molecule(name)
        a.rattle(0.01, seed=i)
        out.append(a)
    return out


@pytest.fixture
def organics():
    out = []
    for i, name in enumerate(["H2O", "CH4", "CO2", "C2H6", "CH3OH", "H2CO"]):
        a = molecule(name)
        a.rattle(0.02, seed=i)
        a.cell = np.eye(3) * 4.0  # small box: pbc changes the neighbours
        a.center()
        out.append(a)
    return out


def _model(seed):
    return BuiltinMLIP([1, 6, 8], n_hidden=8, n_blocks=1, random_state=seed)


def _ntk(model, X, **kw):
    kw = {"kind": "energy", "n_features": 16, "random_state": 0, "device": "cpu",
          "dtype": "float64", **kw}
    return CountingNTK(model, **kw).fit(X)


def _fresh(model, X, **kw):
    return ForceNTKTransformer(model, **{"kind": "energy", "n_features": 16, "random_state": 0,
                                         "device": "cpu", "dtype": "float64", **kw}).fit(X)


def _assert_same(got, want, exact=False):
    assert got.kind == want.kind
    np.testing.assert_array_equal(got.offsets, want.offsets)
    if exact:
        np.testing.assert_array_equal(got.rows, want.rows)
    else:  # chunking may reorder float sums; stale features differ by percents
        np.testing.assert_allclose(got.rows, want.rows, rtol=1e-9, atol=1e-12)


def _shards(directory):
    return sorted(directory.glob("*/*.shard"))


# -- resumability ---------------------------------------------------------------------------------
def test_resume_after_interruption(tmp_path, structures):
    full = CountingTransformer().fit().transform(structures)
    interrupted = CountingTransformer().fit()
    interrupted.fail_after = 3  # chunks of 1, 2 finish, the chunk of 4 is interrupted
    with pytest.raises(KeyboardInterrupt):
        transform_cached(interrupted, structures, tmp_path)
    assert len(_shards(tmp_path)) == 2  # the finished small shards are kept
    resumed = CountingTransformer().fit()
    got = transform_cached(resumed, structures, tmp_path)
    assert resumed.seen_ == 5  # only the 5 missing structures are computed
    _assert_same(got, full, exact=True)
    again = CountingTransformer().fit()
    _assert_same(transform_cached(again, structures, tmp_path), full, exact=True)
    assert again.seen_ == 0


def test_slow_work_is_flushed_per_structure(tmp_path, structures):
    slow = CountingTransformer().fit()
    slow.fail_after = 5
    with pytest.raises(KeyboardInterrupt):  # each structure "takes longer" than flush_seconds
        transform_cached(slow, structures, tmp_path, flush_seconds=1e-9)
    assert slow.calls_ == 5 and len(_shards(tmp_path)) == 5
    resumed = CountingTransformer().fit()
    transform_cached(resumed, structures, tmp_path, shard_size=3)
    assert resumed.seen_ == 3 and max(resumed.calls_, 0) == 2  # chunks of 1, 2 (<= shard_size)


def test_bad_arguments(tmp_path, structures):
    with pytest.raises(ValueError, match="at least one structure"):
        transform_cached(CountingTransformer().fit(), [], tmp_path)
    with pytest.raises(ValueError, match="shard_size"):
        transform_cached(CountingTransformer().fit(), structures, tmp_path, shard_size=0)


# -- content addressing --------------------------------------------------------------------------
def test_other_model_misses_and_one_directory_serves_both(tmp_path, organics):
    X = organics
    m0, m1 = _model(0), _model(1)
    a = _ntk(m0, X)
    first = transform_cached(a, X, tmp_path)
    _assert_same(first, _fresh(m0, X).transform(X))
    b = _ntk(m1, X)
    second = transform_cached(b, X, tmp_path)
    assert b.seen_ == len(X)  # another model's weights: every structure misses
    _assert_same(second, _fresh(m1, X).transform(X))
    assert not np.allclose(second.rows, first.rows)
    assert len(list(tmp_path.glob("*/index.bin"))) == 2
    again_a, again_b = _ntk(m0, X), _ntk(m1, X)  # both keys are served from one directory
    _assert_same(transform_cached(again_a, X, tmp_path), first, exact=True)
    _assert_same(transform_cached(again_b, X, tmp_path), second, exact=True)
    assert again_a.seen_ == 0 and again_b.seen_ == 0


def test_upstream_weight_change_misses_readout_features(tmp_path, organics):
    X = organics[:4]
    model = _model(0)
    before = transform_cached(_ntk(model, X, parameters="readout"), X, tmp_path)
    with torch.no_grad():  # fine-tuned in place: same handle, other non-readout weights
        model.module.embedding.weight.add_(0.1)
    t = _ntk(model, X, parameters="readout")
    after = transform_cached(t, X, tmp_path)
    assert t.seen_ == len(X)
    assert not np.allclose(after.rows, before.rows)
    _assert_same(after, _fresh(model, X, parameters="readout").transform(X))


def test_pbc_change_recomputes_only_that_structure(tmp_path, organics):
    model = _model(0)
    before = transform_cached(_ntk(model, organics), organics, tmp_path)
    changed = [a.copy() for a in organics]
    changed[2].pbc = True
    t = _ntk(model, changed)
    after = transform_cached(t, changed, tmp_path)
    assert t.seen_ == 1
    assert not np.allclose(after.block(2), before.block(2), rtol=1e-3)
    _assert_same(after, _fresh(model, changed).transform(changed))


def test_resolved_force_route_change_misses(tmp_path, organics):
    model = _model(0)
    X = organics[:3]
    exact = _ntk(model, X, kind="force", force_rows="auto", n_probes=4)
    assert exact.force_rows_ == "exact"
    got_exact = transform_cached(exact, X, tmp_path)
    big = molecule("C6H6")  # 3N > 4 n_probes: "auto" now resolves to probes
    probes = _ntk(model, X + [big], kind="force", force_rows="auto", n_probes=4)
    assert probes.force_rows_ == "probes"
    got = transform_cached(probes, X, tmp_path)
    assert probes.seen_ == len(X)
    assert got.n_rows_per_structure.tolist() == [4, 4, 4]
    assert got_exact.n_rows_per_structure.tolist() == [9, 15, 9]
    _assert_same(got, _fresh(model, X + [big], kind="force", n_probes=4).transform(X))


def test_key_ingredients():
    X = [molecule("H2O")]
    model = _model(0)
    base = transformer_key(_fresh(model, X))
    same = [dict(batch_size=1), dict(progress_bar=True), dict(device="cpu"),
            dict(batching="per_structure"), dict(working_memory=1.0)]
    for kw in same:
        assert transformer_key(_fresh(model, X, **kw)) == base, kw
    other = [dict(n_features=8), dict(energy_weight=2.0), dict(normalize=None),
             dict(parameters="all"), dict(dtype="float32"), dict(random_state=1),
             dict(kind="joint"), dict(n_probes=3, kind="force"), dict(sketch="gaussian")]
    for kw in other:
        assert transformer_key(_fresh(model, X, **kw)) != base, kw
    assert transformer_key(_fresh(_model(1), X)) != base
    a = molecule("H2O")
    k = structure_key(a)
    for change in ("positions", "cell", "pbc", "numbers"):
        b = a.copy()
        if change == "positions":
            b.positions[0, 0] += 1e-12
        elif change == "cell":
            b.cell = np.eye(3)
        elif change == "pbc":
            b.pbc = [True, False, False]
        else:
            b.numbers[0] = 9
        assert structure_key(b) != k, change
    assert transformer_key(CountingTransformer().fit()) != transformer_key(
        CountingTransformer(scale=2.0).fit())


def test_shrinking_pool_hits(tmp_path, structures):
    full = CountingTransformer().fit().transform(structures)
    transform_cached(CountingTransformer().fit(), structures, tmp_path)
    pool = [structures[i] for i in (7, 5, 2, 3)]
    t = CountingTransformer().fit()
    _assert_same(transform_cached(t, pool, tmp_path), full[[7, 5, 2, 3]], exact=True)
    assert t.seen_ == 0
    new = molecule("CH3OH")
    t = CountingTransformer().fit()
    got = transform_cached(t, pool + [new, structures[5]], tmp_path)  # a duplicate, a new one
    assert t.seen_ == 1 and len(got) == 6
    _assert_same(got[:4], full[[7, 5, 2, 3]], exact=True)
    _assert_same(got[[5]], full[[5]], exact=True)


# -- damage --------------------------------------------------------------------------------------
def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _empty(path):
    path.write_bytes(b"")


def _flip_payload(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))


def _flip_header(path):
    data = bytearray(path.read_bytes())
    data[20] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _empty, _flip_payload, _flip_header])
def test_damaged_shard_is_named_and_recomputed(tmp_path, structures, damage):
    full = CountingTransformer().fit().transform(structures)
    transform_cached(CountingTransformer().fit(), structures, tmp_path)  # shards of 1, 2, 4, 1
    shard = max(_shards(tmp_path), key=lambda p: p.stat().st_size)  # the 4-structure shard
    damage(shard)
    t = CountingTransformer().fit()
    with pytest.warns(CorruptCacheWarning, match=re.escape(str(shard))):
        got = transform_cached(t, structures, tmp_path)
    assert t.seen_ == 4  # that shard's structures, and only those
    _assert_same(got, full, exact=True)
    t = CountingTransformer().fit()
    _assert_same(transform_cached(t, structures, tmp_path), full, exact=True)
    assert t.seen_ == 0  # repaired


@pytest.mark.parametrize("damage", [_truncate, _flip_payload, None])
def test_damaged_or_missing_index_is_rebuilt(tmp_path, structures, damage, recwarn):
    full = CountingTransformer().fit().transform(structures)
    transform_cached(CountingTransformer().fit(), structures, tmp_path)
    (index,) = tmp_path.glob("*/index.bin")
    t = CountingTransformer().fit()
    if damage is None:
        index.unlink()
        got = transform_cached(t, structures, tmp_path)
        assert not [w for w in recwarn if issubclass(w.category, CorruptCacheWarning)]
    else:
        damage(index)
        with pytest.warns(CorruptCacheWarning, match=re.escape(str(index))):
            got = transform_cached(t, structures, tmp_path)
    assert t.seen_ == 0  # rebuilt from the shard headers
    _assert_same(got, full, exact=True)


def test_index_entries_are_never_trusted(tmp_path, structures):
    full = CountingTransformer().fit().transform(structures)
    transform_cached(CountingTransformer().fit(), structures, tmp_path)
    a, b = sorted(_shards(tmp_path), key=lambda p: p.stat().st_size)[-2:]
    da, db = a.read_bytes(), b.read_bytes()  # valid shards under each other's names
    a.write_bytes(db)
    b.write_bytes(da)
    t = CountingTransformer().fit()
    _assert_same(transform_cached(t, structures, tmp_path), full, exact=True)
    assert t.seen_ == 0


def test_shard_of_another_key_is_refused(tmp_path, structures):
    transform_cached(CountingTransformer().fit(), structures, tmp_path)
    transform_cached(CountingTransformer(scale=2.0).fit(), structures[:1], tmp_path / "other")
    (foreign,) = _shards(tmp_path / "other")
    target = next(p for p in tmp_path.iterdir() if p.is_dir() and p.name != "other")
    planted = target / foreign.name
    planted.write_bytes(foreign.read_bytes())
    t = CountingTransformer().fit()
    with pytest.warns(CorruptCacheWarning, match=re.escape(str(planted))):
        got = transform_cached(t, structures, tmp_path)
    assert t.seen_ == 0
    _assert_same(got, CountingTransformer().fit().transform(structures), exact=True)

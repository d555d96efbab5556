"""Tests of skntk.parallel.featurize and skntk.cache.PoolFeatures: pools as sources, shards that
resume, damaged shards recomputed, workers (joblib, a real Dask LocalCluster) equal to serial."""

import os
import re
import warnings
from unittest import mock

import ase.db
import ase.io
import numpy as np
import pytest
from ase.build import molecule

from skntk.blocks import FeatureBlocks
from skntk.cache import CorruptCacheWarning, PoolFeatures
from skntk.models.builtin import BuiltinMLIP
from skntk.parallel import featurize
from skntk.pipeline import make_pv_lcmd_pipeline
from skntk.transformers import ForceNTKTransformer

NAMES = ["H2O", "CH4", "CH3OH", "C2H6", "CH3CHO", "HCOOH"]


def molecules(n, seed=0):
    """``n`` distinct rattled H/C/O molecules."""
    out = []
    for k in range(n):
        a = molecule(NAMES[k % len(NAMES)])
        a.rattle(0.05, seed=seed + k)
        out.append(a)
    return out


@pytest.fixture(scope="module")
def ntk():
    model = BuiltinMLIP([1, 6, 8], n_hidden=8, n_blocks=1, random_state=0)
    return ForceNTKTransformer(model, kind="energy", n_features=16, random_state=0).fit(
        molecules(6, seed=100))


@pytest.fixture(scope="module")
def pool():
    return molecules(23)


def chunked_reference(ntk, pool, shard_size):
    """The transformer on consecutive chunks of ``shard_size`` structures, written plainly."""
    parts = [ntk.transform(pool[i:i + shard_size]) for i in range(0, len(pool), shard_size)]
    return FeatureBlocks.concatenate(parts)


@pytest.fixture
def counting(monkeypatch):
    """Counts the structures the (serial) workers featurise; ``fail_after`` calls: a kill."""
    import skntk.parallel

    real = skntk.parallel._transform_chunk
    state = {"n": 0, "calls": 0, "fail_after": None}

    def task(transformer, structures):
        if state["fail_after"] is not None and state["calls"] >= state["fail_after"]:
            raise KeyboardInterrupt("killed")
        state["calls"] += 1
        state["n"] += len(structures)
        return real(transformer, structures)

    monkeypatch.setattr(skntk.parallel, "_transform_chunk", task)
    return state


def test_featurize_a_file_equals_the_transformer_shard_by_shard(ntk, pool, tmp_path):
    ase.io.write(tmp_path / "pool.extxyz", pool)
    feats = featurize(ntk, tmp_path / "pool.extxyz", tmp_path / "cache", shard_size=5)
    assert isinstance(feats, PoolFeatures) and len(feats) == feats.n_pool == 23
    ref = chunked_reference(ntk, ase.io.read(tmp_path / "pool.extxyz", ":"), 5)
    got = feats.take(np.arange(23))
    np.testing.assert_array_equal(got.rows, ref.rows)
    np.testing.assert_array_equal(got.offsets, ref.offsets)
    # streaming yields the same rows in pool order, one shard at a time
    starts, parts = zip(*feats.iter_chunks(), strict=True)
    assert list(starts) == [0, 5, 10, 15, 20]
    np.testing.assert_array_equal(FeatureBlocks.concatenate(parts).rows, ref.rows)
    # and take() returns any order
    idx = np.array([22, 0, 7, 7, 13])
    np.testing.assert_array_equal(feats.take(idx).rows, ref[idx].rows)
    # the whole-pool transform agrees to float tolerance (rows do not depend on the chunk)
    np.testing.assert_allclose(got.rows, ntk.transform(pool).rows, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["list", "iterator", "db", "glob"])
def test_every_source_gives_the_same_features(ntk, pool, tmp_path, kind):
    if kind == "list":
        source = pool
    elif kind == "iterator":
        source = iter(pool)
    elif kind == "db":
        with ase.db.connect(tmp_path / "pool.db") as db:
            for a in pool:
                db.write(a)
        source = tmp_path / "pool.db"
    else:
        ase.io.write(tmp_path / "a.extxyz", pool[:11])
        ase.io.write(tmp_path / "b.extxyz", pool[11:])
        source = str(tmp_path / "*.extxyz")
    # what the source holds (a text file rounds positions), read back plainly
    held = list(pool) if kind in ("list", "iterator") else (
        [row.toatoms() for row in ase.db.connect(source).select()] if kind == "db"
        else ase.io.read(tmp_path / "a.extxyz", ":") + ase.io.read(tmp_path / "b.extxyz", ":"))
    feats = featurize(ntk, source, tmp_path / "cache", shard_size=4)
    ref = chunked_reference(ntk, held, 4)
    np.testing.assert_array_equal(feats.take(np.arange(len(pool))).rows, ref.rows)


def test_a_killed_run_resumes_and_recomputes_nothing_written(ntk, pool, tmp_path, counting):
    counting["fail_after"] = 3
    with pytest.raises(KeyboardInterrupt):
        featurize(ntk, pool, tmp_path, shard_size=4)
    assert counting["n"] == 12  # three shards written before the kill
    counting.update(n=0, fail_after=None)
    feats = featurize(ntk, pool, tmp_path, shard_size=4)
    assert counting["n"] == 23 - 12
    assert feats.stats == {"structures": 23, "computed": 11, "cached": 12}
    np.testing.assert_array_equal(feats.take(np.arange(23)).rows,
                                  chunked_reference(ntk, pool, 4).rows)
    counting["n"] = 0
    featurize(ntk, pool, tmp_path, shard_size=4)
    assert counting["n"] == 0


def test_damaged_shards_are_detected_and_only_they_recomputed(ntk, pool, tmp_path, counting):
    featurize(ntk, pool, tmp_path, shard_size=5)
    # the two largest shards hold 5 structures each (the fifth holds the remaining 3)
    shards = sorted(tmp_path.rglob("*.shard"), key=lambda p: (-p.stat().st_size, p.name))
    assert len(shards) == 5
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])  # truncated
    flipped = bytearray(shards[1].read_bytes())
    flipped[-3] ^= 0xFF  # one bit-flipped payload byte
    shards[1].write_bytes(bytes(flipped))
    counting["n"] = 0
    with pytest.warns(CorruptCacheWarning, match=r"feature cache file .*\.shard.* is damaged"):
        feats = featurize(ntk, pool, tmp_path, shard_size=5)
    assert counting["n"] == 10  # the two damaged shards' structures, nothing else
    np.testing.assert_array_equal(feats.take(np.arange(23)).rows,
                                  chunked_reference(ntk, pool, 5).rows)


def test_duplicates_are_featurised_once_and_mapped_back(ntk, pool, tmp_path, counting):
    dup = pool[:5] + [pool[1], pool[3]] + pool[5:8]
    feats = featurize(ntk, dup, tmp_path, shard_size=4)
    assert (len(feats), feats.n_pool, counting["n"]) == (8, 10, 8)
    assert feats.pool_index.tolist() == [0, 1, 2, 3, 4, 7, 8, 9]
    assert feats.inverse.tolist() == [0, 1, 2, 3, 4, 1, 3, 5, 6, 7]


def test_take_reads_only_the_shards_it_needs(ntk, pool, tmp_path, monkeypatch):
    feats = featurize(ntk, pool, tmp_path, shard_size=5)
    loads = []
    real = feats._store.load
    monkeypatch.setattr(feats._store, "load", lambda name: loads.append(name) or real(name))
    feats.take([1, 3, 21])
    assert len(loads) == 2  # shard 0 (structures 1 and 3) and shard 4 (structure 21)


def test_bad_structures_name_file_and_frame(ntk, pool, tmp_path):
    path = tmp_path / "pool.extxyz"
    ase.io.write(path, pool[:4])
    text = path.read_text().splitlines()
    n0 = int(text[0])
    n1 = int(text[n0 + 2])
    path.write_text("\n".join(text[: n0 + 2 + 1 + n1 // 2]) + "\n")  # frame 1 cut in half
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: frame 1: XYZError"):
        featurize(ntk, path, tmp_path / "cache")
    bad = [a.copy() for a in pool[:9]]
    bad[7].numbers[0] = 29  # Cu: not an element of the model
    ase.io.write(path, bad)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: frame 7 \(H4Cu\) contains "
                                         r"Cu \(Z=29\), which BuiltinMLIP does not cover"):
        featurize(ntk, path, tmp_path / "cache", shard_size=4)


def test_joblib_workers_equal_serial(ntk, pool, tmp_path):
    serial = featurize(ntk, pool, tmp_path / "serial", shard_size=6)
    parallel = featurize(ntk, pool, tmp_path / "parallel", shard_size=6, n_jobs=2)
    a, b = serial.take(np.arange(23)), parallel.take(np.arange(23))
    # float32 model: worker processes may use another torch thread count (reduction order)
    np.testing.assert_allclose(b.rows, a.rows, rtol=1e-5, atol=1e-8)
    pipe = make_pv_lcmd_pipeline(n_to_select=4, shortlist_size=10).fit(ntk.transform(pool[:6]))
    assert pipe.select(parallel).tolist() == pipe.select(serial).tolist()


def test_dask_local_cluster_equals_serial(ntk, pool, tmp_path):
    """Dask workers load the model from its file themselves (the transformer names the file)
    and give the serial features and picks."""
    distributed = pytest.importorskip("dask.distributed")
    serial = featurize(ntk, pool, tmp_path / "serial", shard_size=6)
    path = ntk.model_.save(tmp_path / "model.pt")
    by_file = ForceNTKTransformer(str(path), kind="energy", n_features=16, random_state=0).fit()
    # LocalCluster sets OMP_NUM_THREADS=1 (and more) in this process's environment: restored
    # after, or every later subprocess of the suite would run torch on one thread
    with warnings.catch_warnings(), mock.patch.dict(os.environ):
        warnings.simplefilter("ignore")  # dask's own port / resource notices
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster:
            assert len(cluster.workers) == 2
            on_dask = featurize(by_file, pool, tmp_path / "dask", shard_size=6,
                                scheduler_address=cluster.scheduler_address)
    a, b = serial.take(np.arange(23)), on_dask.take(np.arange(23))
    np.testing.assert_allclose(b.rows, a.rows, rtol=1e-5, atol=1e-8)
    pipe = make_pv_lcmd_pipeline(n_to_select=4, shortlist_size=10).fit(ntk.transform(pool[:6]))
    assert pipe.select(on_dask).tolist() == pipe.select(serial).tolist()


def test_float32_shards_live_apart_and_select_like_float64(ntk, pool, tmp_path):
    f64 = featurize(ntk, pool, tmp_path, shard_size=6)
    f32 = featurize(ntk, pool, tmp_path, shard_size=6, dtype=np.float32)
    assert f32.dtype == np.float32 and f64.dtype == np.float64
    a, b = f64.take(np.arange(23)), f32.take(np.arange(23))
    assert b.rows.dtype == np.float32
    np.testing.assert_array_equal(b.rows, a.rows.astype(np.float32))
    assert len({p.parent for p in tmp_path.rglob("*.shard")}) == 2  # two cache keys
    pipe = make_pv_lcmd_pipeline(n_to_select=4, shortlist_size=10).fit(ntk.transform(pool[:6]))
    assert pipe.select(f32).tolist() == pipe.select(f64).tolist()


def test_a_glob_that_matches_nothing_is_named(tmp_path):
    from skntk.io import read_structures

    with pytest.raises(FileNotFoundError, match=r"no structure file matches '.*nothing-\*\.xyz'"):
        read_structures(str(tmp_path / "nothing-*.xyz"))


def test_workers_load_a_named_model_themselves_and_check_its_weights(pool, tmp_path):
    """A transformer whose model is a file is sent without the network (the payload shrinks to
    a reference), workers load it once and give the serial rows; a file whose weights changed
    after fit is refused by the worker, naming the file."""
    import pickle

    import skntk.parallel as par

    path = BuiltinMLIP([1, 6, 8], n_hidden=32, n_blocks=2, random_state=0).save(
        tmp_path / "model.pt")
    t = ForceNTKTransformer(str(path), kind="energy", n_features=16, random_state=0).fit()
    sent = par._by_reference(t)
    assert isinstance(sent.model_, par._ModelRef) and t.model_ is not sent.model_
    assert len(pickle.dumps(sent)) < 0.2 * len(pickle.dumps(t))
    assert par._resolve_reference(sent).model_ is par._resolve_reference(sent).model_  # once
    serial = featurize(t, pool, tmp_path / "serial", shard_size=6)
    parallel = featurize(t, pool, tmp_path / "parallel", shard_size=6, n_jobs=2)
    np.testing.assert_allclose(parallel.take(np.arange(23)).rows,
                               serial.take(np.arange(23)).rows, rtol=1e-5, atol=1e-8)
    # a handle built in memory travels as it is; one from skntk.models.load knows its file
    built = BuiltinMLIP([1, 6, 8], n_hidden=8, n_blocks=1)
    assert par._by_reference(ForceNTKTransformer(built, n_features=4).fit()).model_ is built
    from skntk.models import load

    loaded = load(path)
    assert loaded.source == str(path.resolve())
    ref = par._by_reference(ForceNTKTransformer(loaded, n_features=4).fit()).model_
    assert isinstance(ref, par._ModelRef) and ref.spec == loaded.source
    other = BuiltinMLIP([1, 6, 8], n_hidden=32, n_blocks=2, random_state=0).save(
        tmp_path / "other.pt")
    t2 = ForceNTKTransformer(str(other), kind="energy", n_features=16, random_state=0).fit()
    BuiltinMLIP([1, 6, 8], n_hidden=32, n_blocks=2, random_state=1).save(other)  # changed
    with pytest.raises(RuntimeError, match="other weights"):
        featurize(t2, pool, tmp_path / "changed", shard_size=6, n_jobs=2)


def test_device_auto_means_the_workers_own_device(ntk, pool):
    """device="auto" is re-resolved in each worker (its GPU when it has one): simulated here by a
    caller whose device was another one; the worker moves the sketch (same seed, same R) to its
    own device and gives the caller's rows. An explicit device is kept as given."""
    import copy

    import torch

    import skntk.parallel as par

    assert par._local_device(ntk) is ntk  # same device: nothing to do
    elsewhere = copy.copy(ntk)
    elsewhere.device_ = torch.device("meta")  # "the caller's device", unusable here
    elsewhere.sketch_ = ntk.sketch_.to("meta")
    local = par._local_device(elsewhere)
    assert local.device_ == ntk.device_ and local.sketch_.device == ntk.device_
    assert local.batching_ == ntk.batching_
    np.testing.assert_array_equal(par._transform_chunk(elsewhere, pool[:5]).rows,
                                  ntk.transform(pool[:5]).rows)
    fixed = copy.copy(elsewhere)
    fixed.device = "meta"
    assert par._local_device(fixed) is fixed
    sk = ntk.sketch_
    assert sk.to(sk.device) is sk and torch.equal(sk.to("meta").to("cpu").dense(), sk.dense())

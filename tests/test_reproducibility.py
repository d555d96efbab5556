"""Same inputs, same selection: in one process, across processes, through the CLI, and under a
permutation of the pool."""

import json
import subprocess
import sys
import textwrap

import ase.io
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skntk.blocks import FeatureBlocks
from skntk.io import example_path, read_structures, split_by
from skntk.pipeline import make_pv_lcmd_pipeline
from skntk.transformers import ForceNTKTransformer
from tests.builders import tiny_builtin

# The README sample on small molecules with the built-in model (shortlist and batch scaled down).
README_SCRIPT = textwrap.dedent("""
    import numpy as np
    from ase.build import molecule
    from skntk import ForceNTKTransformer, make_pv_lcmd_pipeline
    from skntk.models.builtin import BuiltinMLIP

    def frames(name, n, rng):
        out = []
        for _ in range(n):
            a = molecule(name)
            a.positions += rng.normal(scale=0.1, size=a.positions.shape)
            out.append(a)
        return out

    rng = np.random.default_rng(0)
    train_atoms = frames("CH3OH", 3, rng) + frames("H2O", 3, rng)
    pool_atoms = frames("CH3OH", 8, rng) + frames("H2O", 8, rng) + frames("CH4", 8, rng)
    model = BuiltinMLIP([1, 6, 8], n_hidden=16, n_blocks=1, random_state=0)

    def readout(**kw):
        pipe = make_pv_lcmd_pipeline(
            ForceNTKTransformer(model, kind="joint", force_rows="probes", n_probes=4,
                                random_state=0),
            shortlist_size=12, n_to_select=4, random_state=0, **kw)
        pipe.fit(train_atoms)
        return pipe.select(pool_atoms).tolist(), pipe
""")


def _readme_namespace():
    ns = {}
    exec(compile(README_SCRIPT, "readme_sample", "exec"), ns)
    return ns


def test_readme_pipeline_same_indices_in_one_process():
    ns = _readme_namespace()
    runs = [ns["readout"]()[0] for _ in range(5)]
    assert all(r == runs[0] for r in runs), runs
    assert len(set(runs[0])) == 4


def test_readme_pipeline_same_indices_across_processes():
    ns = _readme_namespace()
    here = ns["readout"]()[0]
    script = README_SCRIPT + "\nimport json\nprint(json.dumps(readout()[0]))\n"
    outs = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=600, check=True)
        outs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1] == here


def test_sketched_routes_are_seeded_by_the_pipeline():
    """Unseeded transformer + forced LCMD sketch: the pipeline's random_state seeds both."""
    ns = _readme_namespace()
    model, train, pool = ns["model"], ns["train_atoms"], ns["pool_atoms"]
    transformer = ForceNTKTransformer(model, kind="joint", force_rows="probes", n_probes=4,
                                      n_features=32)

    def run(seed):
        pipe = make_pv_lcmd_pipeline(transformer, shortlist_size=12, n_to_select=4,
                                     gram_features="sketch", n_sketch_features=64,
                                     random_state=seed)
        return pipe.fit(train).select(pool).tolist(), pipe

    (a, pipe), (b, _) = run(3), run(3)
    assert a == b
    assert pipe["features"].random_state == 3 and pipe["lcmd"].random_state == 3
    assert transformer.random_state is None  # the caller's transformer is not changed
    assert pipe["lcmd"].gram_features_ == "sketch"
    assert run(None)[0] == run(None)[0]  # None is the fixed seed 0
    # a seed set on the transformer is kept
    seeded = ForceNTKTransformer(model, kind="energy", random_state=7)
    assert make_pv_lcmd_pipeline(seeded, random_state=1)["features"] is seeded


def test_lcmd_prefers_the_exact_gram_route_and_defaults_to_a_fixed_seed():
    from skntk.selection.lcmd import LCMDSelector

    rng = np.random.default_rng(0)
    T = FeatureBlocks(rng.normal(size=(30, 64)), np.arange(0, 31, 5), kind="plain")
    P = FeatureBlocks(rng.normal(size=(100, 64)), np.arange(0, 101, 5), kind="plain")
    sel = LCMDSelector(4).fit(T)  # d(d+1)/2 = 2080 > n_sketch_features, but affordable
    assert sel.gram_features_ == "exact"
    small = LCMDSelector(4, working_memory=0.1).fit(T)  # too big for the budget: sketch
    assert small.gram_features_ == "sketch"
    a = small.select(P).tolist()
    assert a == LCMDSelector(4, working_memory=0.1).fit(T).select(P).tolist()


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    frames = read_structures(example_path())
    species = sorted({int(z) for a in frames for z in a.numbers})
    d = tmp_path_factory.mktemp("cli_seed")
    tiny_builtin(species, cutoff=4.0).save(d / "m.pt")
    sids = sorted({a.info["sid"] for a in frames})
    train_idx, pool_idx = split_by(frames, "sid", sids[:1])
    ase.io.write(d / "train.extxyz", [frames[i] for i in train_idx[:6]])
    ase.io.write(d / "pool.extxyz", [frames[i] for i in pool_idx[:16]])
    return d


def test_cli_select_with_seed_is_reproducible(cli_files):
    d = cli_files
    picks = []
    for k in range(2):
        out = d / f"sel{k}.extxyz"
        cmd = [sys.executable, "-m", "skntk.cli", "select", "--model", str(d / "m.pt"),
               "--train", str(d / "train.extxyz"), "--pool", str(d / "pool.extxyz"), "-n", "3",
               "--n-features", "48", "--n-probes", "2", "--shortlist", "8", "--seed", "0",
               "--device", "cpu", "-o", str(out), "--no-plot"]
        subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        picks.append(json.loads((d / f"sel{k}_report.json").read_text())["selected"])
    assert picks[0] == picks[1] and len(set(picks[0])) == 3


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), blocks=st.booleans())
def test_permuting_the_pool_never_changes_the_chosen_rows(seed, blocks):
    rng = np.random.default_rng(seed)
    d = 5
    if blocks:  # multi-row blocks through the sketched gram route (fixed seed)
        m_train, m_pool = rng.integers(1, 4, size=8), rng.integers(1, 4, size=40)
        train = FeatureBlocks(rng.normal(size=(m_train.sum(), d)), np.r_[0, np.cumsum(m_train)])
        pool = FeatureBlocks(rng.normal(size=(m_pool.sum(), d)), np.r_[0, np.cumsum(m_pool)])
        kw = dict(gram_features="sketch", n_sketch_features=32)
    else:
        train, pool = rng.normal(size=(8, d)), rng.normal(size=(40, d))
        kw = {}
    pipe = make_pv_lcmd_pipeline(n_to_select=5, shortlist_size=15, sigma2=1e-2, random_state=0,
                                 **kw).fit(train)
    idx = pipe.select(pool)
    perm = rng.permutation(40)
    idx_perm = pipe.select(pool[perm])
    assert perm[idx_perm].tolist() == idx.tolist()

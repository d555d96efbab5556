"""What skntk refuses (docs/refusals.md): every refusal names its culprit, and comes before work.

Items 4-8 of the "trust" issue: overlapping atoms and non-finite model output, duplicate pool
frames, structures too big for memory, bad CLI input, invalid elements / overflowing features /
the shortlist message.
"""

import os
import re
import subprocess
import sys

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from hypothesis import given, settings
from hypothesis import strategies as st

from skntk import transformers
from skntk.atoms import MIN_DISTANCE, validate_structures
from skntk.blocks import FeatureBlocks
from skntk.cli import main
from skntk.io import structure_hash, unique_structures
from skntk.pipeline import SelectionPipeline, make_pv_lcmd_pipeline
from skntk.selection.lcmd import LCMDSelector
from skntk.selection.pv import ChunkedPosteriorVarianceSelector
from skntk.transformers import ForceNTKTransformer, InsufficientMemoryError
from tests.builders import molecules, tiny_builtin


def chon_model():
    return tiny_builtin((1, 6, 7, 8), n_hidden=16)

# -- 4. overlapping atoms; non-finite model output ---------------------------------------------
def test_overlapping_atoms_are_refused_naming_structure_and_pair():
    X = molecules(8)
    bad = X[6].copy()
    bad.positions[3] = bad.positions[1] + [0.0, 0.0, 0.5 * MIN_DISTANCE]
    X[6] = bad
    ntk = ForceNTKTransformer(tiny_builtin(), n_features=8, random_state=0).fit(X[:2])
    formula = bad.get_chemical_formula()
    with pytest.raises(ValueError, match=rf"X\[6\] \({formula}\): atoms 1 and 3 are 0.05 Å apart, "
                                         r"closer than skntk.atoms.MIN_DISTANCE = 0.1 Å"):
        ntk.transform(X)
    # periodic images count: an atom 0.05 Å from another one's image across the boundary
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.positions[1] = cu.positions[0] + cu.cell[0] + [0.05, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"X\[0\] \(Cu4\): atoms 0 and 1 are 0.05 Å apart "
                                         r"\(across a periodic boundary\)"):
        validate_structures([cu])


def test_non_finite_rows_name_the_structure_in_X_not_the_batch_position():
    model = tiny_builtin()
    X = [molecule(n) for n in ["CH4", "C2H6", "CH4", "C2H6", "C2H4", "H2O", "CH4"]]
    ntk = ForceNTKTransformer(model, n_features=8, batch_size=2, random_state=0).fit(X[:1])
    with torch.no_grad():  # oxygen's embedding is NaN: only X[5] (H2O, batch position 1) is bad
        model.module.embedding.weight[2] = float("nan")
    with pytest.raises(ValueError, match=r"X\[5\] \(H2O\): BuiltinMLIP gave non-finite "
                                         r"\(NaN/inf\) energy NTK rows"):
        ntk.transform(X)
    # in one shared graph the NaN may reach every row; the culprit is still X[5]
    ntk.set_params(batch_size=32)
    with pytest.raises(ValueError, match=r"X\[5\] \(H2O\)"):
        ntk.transform(X)


# -- 5. duplicates -------------------------------------------------------------------------------
def test_duplicates_are_candidates_once_and_warned_about_once():
    distinct = molecules(6, seed=10)
    rng = np.random.default_rng(0)
    order = rng.permutation(24)
    pool = [distinct[k % 6].copy() for k in order]  # 6 structures x 4 copies, shuffled
    pipe = make_pv_lcmd_pipeline(ForceNTKTransformer(tiny_builtin(), n_features=16),
                                 shortlist_size=6, n_to_select=5, random_state=0)
    pipe.fit(molecules(3, seed=50))
    message = (r"pool has 18 duplicate structures \(same numbers, cell and pbc, positions up to "
               r"wrapping and translation\); each is a candidate once")
    with pytest.warns(UserWarning, match=message) as rec:
        idx = pipe.select(pool)
    assert len([w for w in rec if "duplicate" in str(w.message)]) == 1
    assert len({structure_hash(pool[i]) for i in idx}) == 5
    first, _ = unique_structures(pool)
    assert set(idx.tolist()) <= set(first.tolist())  # first copies, indices into the given pool
    assert pipe.selected_idx_.tolist() == idx.tolist()


def test_adding_duplicates_never_repeats_a_structure_in_a_batch():
    pipe = make_pv_lcmd_pipeline(ForceNTKTransformer(tiny_builtin(), n_features=16),
                                 shortlist_size=8, n_to_select=4, random_state=0)
    pipe.fit(molecules(3, seed=50))
    distinct = molecules(8, seed=20)

    @settings(max_examples=10, deadline=None, derandomize=True)
    @given(st.lists(st.integers(0, 7), min_size=1, max_size=16), st.randoms(use_true_random=False))
    def check(extra, rnd):
        pool = [a.copy() for a in distinct] + [distinct[k].copy() for k in extra]
        rnd.shuffle(pool)
        with pytest.warns(UserWarning, match="duplicate structures"):
            idx = pipe.select(pool)
        hashes = [structure_hash(pool[i]) for i in idx]
        assert len(set(hashes)) == len(hashes) == 4

    check()


# -- 6. memory -----------------------------------------------------------------------------------
def test_too_big_structure_is_refused_before_any_featurisation(monkeypatch):
    model = tiny_builtin((1, 6, 8, 29))
    cu = bulk("Cu", "fcc", a=3.6) * (3, 3, 3)
    X = [molecule("H2O"), cu, molecule("CH4")]
    ntk = ForceNTKTransformer(model, kind="force", force_rows="probes", n_probes=2,
                              n_features=8, random_state=0).fit(X[:1])
    calls, no_rows = [], FeatureBlocks(np.zeros((0, 8)), [0])
    monkeypatch.setattr(ForceNTKTransformer, "_batch_rows",
                        lambda self, *a, **k: calls.append(1) or no_rows)
    monkeypatch.setattr(transformers, "_available_memory", lambda device: 5e6)
    with pytest.raises(InsufficientMemoryError,
                       match=r"X\[1\] \(Cu27\) has 27 atoms and ~\d+ edges; force rows by "
                             r"'probes' need about [\d.]+ MB, 5.0 MB available on cpu; use "
                             r"kind='energy', fewer atoms per structure, or a machine with more "
                             r"memory") as err:
        ntk.transform(X)
    assert isinstance(err.value, ValueError) and isinstance(err.value, MemoryError)
    assert calls == []  # nothing was featurised (and so nothing lost)
    assert ntk.estimate_memory(X)[1] > ntk.estimate_memory(X)[0] > 0
    monkeypatch.setenv("SKNTK_SKIP_MEMORY_CHECK", "1")
    ntk.transform(X)
    assert calls  # the switch lets it run


# -- 7. the command line -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    tiny_builtin().save(d / "model.pt")
    ase.io.write(d / "train.extxyz", molecules(3, seed=50))
    ase.io.write(d / "pool.extxyz", molecules(8, seed=0))
    lines = (d / "pool.extxyz").read_text().splitlines()
    n0, n1 = int(lines[0]), int(lines[int(lines[0]) + 2])
    cut = n0 + 2 + 2 + n1 - 1  # frame 1 loses its last atom line
    (d / "truncated.extxyz").write_text("\n".join(lines[:cut]) + "\n")
    (d / "junk.pt").write_text("1 2 3: not a model\n")
    overlap = molecules(4)
    overlap[2].positions[1] = overlap[2].positions[0]
    ase.io.write(d / "overlap.extxyz", overlap)
    return d


def _select(files, *extra, pool="pool.extxyz", model="model.pt"):
    return ["select", "--model", str(files / model), "--train", str(files / "train.extxyz"),
            "--pool", str(files / pool), "--kind", "energy", "--n-features", "8", "-n", "2",
            *extra]


@pytest.mark.parametrize("case,message", [
    ("missing", r"error: --pool: no structure file at '.*missing.extxyz'\.\n"),
    ("directory", r"error: --pool: '.*' is a directory, not a structure file\.\n"),
    ("truncated", r"error: --pool: .*truncated.extxyz: frame 1: XYZError: .*Frame has \d+ atoms, "
                  r"expected \d+\n"),
    ("junk model", r"error: model '.*junk.pt' is not a model file: it is neither a torch zip "
                   r"archive nor a pickle \(it starts with b'1 2 3: not a'\)\.\n"),
    ("overlap", r"error: --pool: .*overlap.extxyz: frame 2 \(C2H6\): atoms 0 and 1 are 0 Å "
                r"apart, closer than "
                r"skntk.atoms.MIN_DISTANCE = 0.1 Å.*\n"),
    ("missing output dir", r"error: -o/--output .*nodir.sel.extxyz: directory .*nodir does not "
                           r"exist\.\n"),
])
def test_cli_bad_input_is_one_error_line(files, tmp_path, capsys, monkeypatch, case, message):
    import skntk.cli

    out = ["-o", str(tmp_path / "sel.extxyz"), "--no-plot"]
    no_dir = str(tmp_path / "nodir" / "sel.extxyz")
    argv = {"missing": _select(files, *out, pool="missing.extxyz"),
            "directory": ["select", "--model", str(files / "model.pt"), "--train",
                          str(files / "train.extxyz"), "--pool", str(files), *out],
            "truncated": _select(files, *out, pool="truncated.extxyz"),
            "junk model": _select(files, *out, model="junk.pt"),
            "overlap": _select(files, *out, pool="overlap.extxyz"),
            "missing output dir": _select(files, "-o", no_dir)}[case]
    if case == "missing output dir":  # refused before any featurisation
        monkeypatch.setattr(skntk.cli, "run_selection", lambda *a, **k: pytest.fail("ran"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(message, err, flags=re.DOTALL), err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["--shortlist", "0"], "argument --shortlist: must be >= 1; got 0"),
    (["-n", "0"], "argument -n/--n-to-select: must be >= 1; got 0"),
    (["--sigma2", "-1"], "argument --sigma2: must be a finite number > 0; got -1"),
])
def test_cli_options_are_validated(files, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(_select(files, *argv))
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_demo_max_pool_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--max-pool", "-1"])
    assert exit_.value.code == 2
    assert "argument --max-pool: must be >= 1; got -1" in capsys.readouterr().err


def test_cli_shortlist_smaller_than_batch_and_duplicates(files, tmp_path, capsys):
    assert main(_select(files, "--shortlist", "1", "-o", str(tmp_path / "s.extxyz"))) == 2
    assert "error: --shortlist 1 is smaller than -n 2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--shortlist 1 is smaller"):  # -v: the traceback
        main(_select(files, "--shortlist", "1", "-v", "-o", str(tmp_path / "s.extxyz")))
    dup = molecules(2) + molecules(2)  # 2 distinct structures, each twice
    ase.io.write(tmp_path / "dup.extxyz", dup)
    argv = _select(files, "-o", str(tmp_path / "d.extxyz"), "--no-plot")
    argv[argv.index("--pool") + 1] = str(tmp_path / "dup.extxyz")
    assert main(argv) == 0
    warning = ("warning: pool has 2 duplicate structures (same numbers, cell and pbc, positions up "
               "to wrapping and translation); each is a candidate once.\n")
    assert capsys.readouterr().err == warning
    picked = ase.io.read(tmp_path / "d.extxyz", ":")
    assert sorted(a.info["pool_index"] for a in picked) == [0, 1]
    argv[argv.index("-n") + 1] = "3"
    assert main(argv) == 2
    assert capsys.readouterr().err == warning + (
        "error: n_to_select=3 exceeds the 2 distinct pool structures (2 of the 4 are "
        "duplicates).\n")


def test_cli_one_structure_pool_with_plot(files, tmp_path, capsys):
    ase.io.write(tmp_path / "one.extxyz", molecules(1))
    out = tmp_path / "sel.extxyz"
    argv = _select(files, "-o", str(out))
    argv[argv.index("--pool") + 1] = str(tmp_path / "one.extxyz")
    argv[argv.index("-n") + 1] = "1"
    assert main(argv) == 0
    assert len(ase.io.read(out, ":")) == 1
    assert (tmp_path / "sel_report.json").exists() and (tmp_path / "sel.png").stat().st_size > 0
    assert "selected 1" in capsys.readouterr().out


def test_cli_subprocess_prints_no_traceback(files, tmp_path):
    argv = _select(files, "-o", str(tmp_path / "s.extxyz"), pool="truncated.extxyz")
    proc = subprocess.run([sys.executable, "-c",
                           "from skntk.cli import main; raise SystemExit(main())", *argv],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --pool: ")
    assert "truncated.extxyz: frame 1:" in lines[0]


# -- 8. smaller ones -----------------------------------------------------------------------------
@pytest.mark.parametrize("z", [200, -1, 0])
def test_invalid_atomic_numbers_are_refused(z):
    X = [molecule("H2O"), Atoms([1, z, 1], positions=[[0, 0, 0], [0, 0, 1], [0, 0, 2]])]
    with pytest.raises(ValueError, match=rf"X\[1\] has atomic number Z={z} at atom 1; atomic "
                                         r"numbers must be 1\.\.118\."):
        validate_structures(X)


def test_overflowing_features_are_refused_naming_the_structure():
    rng = np.random.default_rng(0)
    T, X = rng.normal(size=(20, 4)), rng.normal(size=(10, 4))
    X[3] *= 1e200
    pv = ChunkedPosteriorVarianceSelector(shortlist_size=4).fit(T)
    with pytest.raises(ValueError, match=r"X\[3\]: its posterior variance is inf in float64"):
        pv.score_samples(X)
    with pytest.raises(ValueError, match=r"X\[3\]"):
        pv.select(X, 2)
    # the same features with huge train features too: scaled, finite, same ranking as unscaled
    big = ChunkedPosteriorVarianceSelector().fit(T * 1e200)
    ref = ChunkedPosteriorVarianceSelector().fit(T)
    X[3] /= 1e200
    np.testing.assert_allclose(big.score_samples(X * 1e200), ref.score_samples(X), rtol=1e-10)


def test_shortlist_message_says_what_x_holds():
    rng = np.random.default_rng(0)
    T, X = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
    pipe = SelectionPipeline([("pv", ChunkedPosteriorVarianceSelector(shortlist_size=5)),
                              ("lcmd", LCMDSelector(n_to_select=6))]).fit(T)
    with pytest.raises(ValueError, match=r"n_to_select=6 exceeds the 5 candidates left by "
                                         r"step 'pv' \(the pool holds 20 structures\)"):
        pipe.select(X)  # LCMD sees the 5 shortlisted structures only


# == issue 27 ("trust, second round") ===========================================================
ETHANOL = "tests/data/ethanol_40.extxyz"


def ethanol(n=6):
    """``n`` labelled ethanol frames (DFT energies and forces) from the shipped test slice."""
    from pathlib import Path

    return ase.io.read(Path(__file__).parent / "data" / "ethanol_40.extxyz", f":{n}")


def _set_label(atoms, energy=None, forces=None):
    """Replace ``atoms``' stored label (calculator results) in place."""
    if energy is not None:
        atoms.calc.results["energy"] = energy
    if forces is not None:
        atoms.calc.results["forces"] = forces


# -- 1. labels are checked when they enter -------------------------------------------------------
@pytest.mark.parametrize("corrupt,message", [
    (lambda a: _set_label(a, energy=float("nan")),
     r"X\[4\] \(C2H6O\) has a non-finite energy label \(nan eV\); labels must be finite"),
    (lambda a: _set_label(a, energy=float("inf")), r"X\[4\] \(C2H6O\) has a non-finite energy"),
    (lambda a: _set_label(a, forces=np.where(np.arange(27).reshape(9, 3) == 7, np.nan, 0.0)),
     r"X\[4\] \(C2H6O\) has non-finite forces at atom 2 \(\[0.0, nan, 0.0\] eV/Å\)"),
    (lambda a: _set_label(a, forces=np.zeros((8, 3))),
     r"X\[4\] \(C2H6O\) has forces of shape \(8, 3\); expected \(9, 3\)\.$"),
])
def test_bad_labels_are_refused_by_fit_before_any_training(corrupt, message, monkeypatch):
    from skntk.finetune import MLIPRegressor

    X = ethanol()
    corrupt(X[4])
    reg = MLIPRegressor(chon_model(), epochs=1, random_state=0)
    monkeypatch.setattr(MLIPRegressor, "_train", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match=message):
        reg.fit(X)


def test_bad_labels_are_refused_at_loop_start_and_bad_oracle_labels_fail():
    from skntk.al.loop import ActiveLearningLoop
    from skntk.al.oracles import LabelResult, PoolOracle
    from skntk.finetune import MLIPRegressor
    from skntk.selection.baselines import RandomSelector

    class Counting(PoolOracle):
        calls = 0

        def label(self, structures):
            Counting.calls += 1
            return super().label(structures)

    frames = ethanol(8)
    labelled, pool = frames[:3], frames[3:]
    labelled[1] = labelled[1].copy()
    labelled[1].calc = None
    labelled[1].info["energy"] = float("nan")
    reg = MLIPRegressor(chon_model(), epochs=0, random_state=0)
    loop = ActiveLearningLoop(RandomSelector(), reg, Counting(), n_rounds=1, batch_size=2,
                              random_state=0, progress_bar=False)
    with pytest.raises(ValueError, match=r"labelled\[1\] \(C2H6O\) has a non-finite energy"):
        loop.run(labelled, pool)
    assert Counting.calls == 0

    class NaNForces:  # an oracle of one's own that returns NaN forces without an error
        def label(self, structures):
            out = []
            for a in structures:
                b = a.copy()
                b.calc = SinglePointCalculator(b, energy=-1.0,
                                               forces=np.full((len(a), 3), np.nan))
                out.append(LabelResult(b, None, 0.0))
            return out

    loop = ActiveLearningLoop(RandomSelector(), reg, NaNForces(), n_rounds=1, batch_size=2,
                              random_state=0, progress_bar=False)
    res = loop.run(frames[:3], [a.copy() for a in pool])
    assert res.selected == [] and len(res.failed) == 2
    assert all("pool[" in m and "non-finite forces at atom 0" in m for m in res.failed.values())


def test_learn_refuses_a_nan_label_in_one_line(tmp_path, capsys):
    X = ethanol(6)
    X[4].calc.results["energy"] = float("nan")
    ase.io.write(tmp_path / "train.extxyz", X[:5])
    ase.io.write(tmp_path / "pool.extxyz", ethanol(10)[6:])
    chon_model().save(tmp_path / "m.pt")
    (tmp_path / "run.toml").write_text(f'output = "out"\n[model]\nname = "{tmp_path}/m.pt"\n'
                                       '[data]\nlabelled = "train.extxyz"\npool = "pool.extxyz"\n'
                                       '[selector]\nmethod = "random"\n[finetune]\nepochs = 1\n'
                                       '[loop]\nn_rounds = 1\nbatch_size = 1\n')
    assert main(["learn", "--config", str(tmp_path / "run.toml")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: labelled[4] (C2H6O) has a non-finite energy label (nan eV); labels must be finite "
        "numbers: fix or drop this structure."]


# -- 2. evaluate skips structures with non-finite labels, naming and counting them --------------
def test_evaluate_skips_nan_labels_with_a_warning_naming_them():
    from ase.calculators.emt import EMT

    from skntk.metrics import evaluate

    frames = []
    for k in range(4):
        a = bulk("Cu", cubic=True)
        a.rattle(0.05, seed=k)
        a.calc = SinglePointCalculator(a, energy=0.1 * k, forces=np.zeros((4, 3)))
        frames.append(a)
    clean = evaluate(EMT(), frames[:1] + frames[2:], groups=["a", "b", "b"])
    frames[1].calc.results["energy"] = float("nan")
    with pytest.warns(UserWarning, match=r"evaluate\(\) skips 1 of the 4 structures, whose labels "
                                         r"are not finite \(counted in 'n_skipped'\): X\[1\] "
                                         r"\(Cu4\) has a non-finite energy label \(nan eV\)\."):
        got = evaluate(EMT(), frames, groups=["a", "z", "b", "b"])
    assert got["n_skipped"] == 1 and got["n_structures"] == 3 and clean["n_skipped"] == 0
    assert np.isfinite(got["energy_mae"]) and got["energy_mae"] == clean["energy_mae"]
    assert sorted(got["groups"]) == ["a", "b"]
    for a in frames:
        a.calc.results["forces"] = np.full((4, 3), np.inf)
    with pytest.raises(ValueError, match=r"evaluate\(\): no structure has finite labels \(X\[0\] "
                                         r"\(Cu4\) has non-finite forces at atom 0"):
        evaluate(EMT(), frames)


# -- 3, 4. duplicates up to wrapping and translation; copies of labelled structures -------------
def periodic_copies(n=3, n_copies=3, seed=0):
    """``n`` rattled periodic Cu cells, each followed by ``n_copies - 1`` re-wrapped copies
    (atoms moved by lattice vectors, then the whole cell translated and wrapped)."""
    out = []
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.6, cubic=True)
        a.rattle(0.1, seed=seed + k)
        out.append(a)
        for c in range(1, n_copies):
            b = a.copy()
            b.positions[c % len(b)] += c * a.cell[0] - a.cell[2]
            b.positions += [0.37 * c, -1.1, 2.9 * c]
            b.wrap()
            out.append(b)
    return out


def test_duplicate_index_sees_wrapped_and_translated_copies_only(tmp_path):
    from skntk.io import DuplicateIndex

    pool = periodic_copies()
    first, inverse = unique_structures(pool)
    assert first.tolist() == [0, 3, 6] and inverse.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len({structure_hash(a) for a in pool}) == 9  # the exact hash still tells them apart
    ase.io.write(tmp_path / "p.extxyz", pool)  # positions rounded to 1e-8 Å in the file
    assert unique_structures(ase.io.read(tmp_path / "p.extxyz", ":"))[0].tolist() == [0, 3, 6]
    index = DuplicateIndex()
    assert [index.add(a) for a in pool[::3]] == [0, 1, 2]
    moved = pool[0].copy()
    moved.positions[1] += [1e-4, 0, 0]  # a real change is not a duplicate
    assert index.find(moved) is None and index.find(pool[1]) == 0
    mol = molecules(1)[0]
    shifted = mol.copy()
    shifted.positions += [3.0, -2.0, 1.0]
    assert unique_structures([mol, shifted])[0].tolist() == [0]
    slab = pool[3].copy()
    slab.pbc = [True, True, False]  # not periodic along c: wrapping along c changes it
    assert index.find(slab) is None


def test_periodic_copies_are_candidates_once_in_the_pipeline_and_the_cli(tmp_path, capsys):
    pool = periodic_copies()
    model = tiny_builtin((29,))
    pipe = make_pv_lcmd_pipeline(ForceNTKTransformer(model, n_features=16, random_state=0),
                                 shortlist_size=3, n_to_select=3, random_state=0)
    pipe.fit(periodic_copies(2, 1, seed=50))
    with pytest.warns(UserWarning, match="pool has 6 duplicate structures"):
        idx = pipe.select(pool)
    assert sorted(idx.tolist()) == [0, 3, 6]
    model.save(tmp_path / "cu.pt")
    ase.io.write(tmp_path / "train.extxyz", periodic_copies(2, 1, seed=50))
    ase.io.write(tmp_path / "pool.extxyz", pool)
    argv = ["select", "--model", str(tmp_path / "cu.pt"), "--train", str(tmp_path / "train.extxyz"),
            "--pool", str(tmp_path / "pool.extxyz"), "--kind", "energy", "--n-features", "8",
            "-n", "6", "--no-plot", "-o", str(tmp_path / "sel.extxyz")]
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: n_to_select=6 exceeds the 3 distinct pool structures (6 of the 9 are "
        "duplicates).")


def test_copies_of_labelled_structures_are_never_picked():
    labelled = periodic_copies(3, 1, seed=0)
    model = tiny_builtin((29,))
    pipe = make_pv_lcmd_pipeline(ForceNTKTransformer(model, n_features=16, random_state=0),
                                 shortlist_size=4, n_to_select=2, random_state=0)
    pipe.fit(labelled)
    same = [a.copy() for a in periodic_copies(3, 2, seed=0)[1::2]]  # re-wrapped copies only
    with pytest.warns(UserWarning, match="3 of the 3 pool structures duplicate labelled"), \
            pytest.raises(ValueError, match="every one of the 3 pool structures duplicates a "
                                            "labelled structure: nothing is left to select"):
        pipe.select(same)
    pool = same + periodic_copies(3, 1, seed=100)
    with pytest.warns(UserWarning) as rec:
        idx = pipe.select(pool)
    msgs = [str(w.message) for w in rec if "labelled" in str(w.message)]
    assert msgs == ["3 of the 6 pool structures duplicate labelled structures (up to wrapping and "
                    "translation): X[0] (Cu4), X[1] (Cu4), X[2] (Cu4); they are never "
                    "candidates."]
    assert set(idx.tolist()) <= {3, 4, 5}


def test_the_loop_and_the_cli_never_pick_copies_of_labelled_structures(tmp_path, capsys):
    from skntk.al.loop import ActiveLearningLoop
    from skntk.al.oracles import PoolOracle
    from skntk.finetune import MLIPRegressor
    from skntk.selection.baselines import RandomSelector

    frames = ethanol(8)
    labelled, rest = frames[:3], frames[3:]
    pool = [a.copy() for a in labelled] + rest  # copies lose the calculator: relabel them
    for a, b in zip(pool, labelled + rest, strict=True):
        a.calc = SinglePointCalculator(a, **b.calc.results)
        a.positions += [1.0, 2.0, 3.0]
    reg = MLIPRegressor(chon_model(), epochs=0, random_state=0)
    loop = ActiveLearningLoop(RandomSelector(), reg, PoolOracle(), n_rounds=2, batch_size=3,
                              random_state=0, progress_bar=False)
    with pytest.warns(UserWarning, match=r"3 of the 8 pool structures duplicate labelled "
                                         r"structures .*: pool\[0\] \(C2H6O\), pool\[1\]"):
        res = loop.run(labelled, pool)
    assert sorted(res.selected) == [3, 4, 5, 6, 7]
    chon_model().save(tmp_path / "m.pt")
    ase.io.write(tmp_path / "train.extxyz", labelled)
    ase.io.write(tmp_path / "pool.extxyz", pool)
    argv = ["select", "--model", str(tmp_path / "m.pt"), "--train", str(tmp_path / "train.extxyz"),
            "--pool", str(tmp_path / "pool.extxyz"), "--kind", "energy", "--n-features", "8",
            "-n", "5", "--no-plot", "-o", str(tmp_path / "sel.extxyz"),
            "--scores", str(tmp_path / "pv.csv")]
    assert main(argv) == 0
    assert capsys.readouterr().err == (
        "warning: 3 of the 8 pool structures duplicate labelled structures (up to wrapping and "
        "translation): X[0], X[1], X[2]; they are never candidates.\n")
    picked = ase.io.read(tmp_path / "sel.extxyz", ":")
    assert sorted(a.info["pool_index"] for a in picked) == [3, 4, 5, 6, 7]
    pv = np.loadtxt(tmp_path / "pv.csv", delimiter=",", skiprows=1)[:, 1]
    assert np.isnan(pv[:3]).all() and np.isfinite(pv[3:]).all()
    argv[argv.index("-n") + 1] = "6"
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: n_to_select=6 exceeds the 5 distinct pool structures (0 of the 8 are duplicates, "
        "3 duplicate labelled ones).")


# -- 5. a finished checkpoint asked for fewer rounds ---------------------------------------------
def test_a_checkpoint_with_more_rounds_than_asked_is_refused(tmp_path):
    from skntk.al.loop import ActiveLearningLoop
    from skntk.al.oracles import PoolOracle
    from skntk.finetune import MLIPRegressor
    from skntk.selection.baselines import RandomSelector

    frames = ethanol(10)

    def loop(n):
        return ActiveLearningLoop(RandomSelector(), MLIPRegressor(chon_model(), epochs=0),
                                  PoolOracle(), n_rounds=n, batch_size=1, random_state=0,
                                  checkpoint_dir=tmp_path, progress_bar=False)

    full = loop(3).run(frames[:2], frames[2:])
    assert len(full.history) == 4
    with pytest.raises(ValueError, match=re.escape(
            f"checkpoint {str(tmp_path)!r} holds 3 finished rounds (rounds 0-3, 5 labelled "
            f"structures, the model of round 3); n_rounds=1 asks for fewer: pass n_rounds=3 to "
            f"read it (result.history[:2] is the shorter run's history) or use another "
            f"checkpoint_dir.")):
        loop(1).run(frames[:2], frames[2:])
    assert loop(3).run(frames[:2], frames[2:]).history == full.history


# -- 10. probe rows and reduction="max_atom" -----------------------------------------------------
def test_max_atom_on_probe_rows_says_probe_rows_are_not_per_atom():
    X = molecules(4)
    ntk = ForceNTKTransformer(tiny_builtin(), kind="joint", force_rows="probes", n_probes=2,
                              n_features=8, random_state=0).fit(X[:2])
    pv = ChunkedPosteriorVarianceSelector(reduction="max_atom", n_to_select=1)
    with pytest.raises(ValueError, match=re.escape(
            "reduction='max_atom' needs force or joint blocks; got kind='plain' (rows with no "
            "per-atom layout). ForceNTKTransformer's probe rows (force_rows='probes', or 'auto' "
            "when it picks probes) are 'plain' even for kind='joint' or 'force': each probe row "
            "mixes the forces of all atoms, so probe rows are not per atom. Use "
            "force_rows='exact' for per-atom rows (3 per atom), or reduction='trace'.")):
        pv.fit(ntk.transform(X[:2])).select(ntk.transform(X[2:]))
    exact = ntk.set_params(force_rows="exact").fit(X[:2])
    assert pv.fit(exact.transform(X[:2])).select(exact.transform(X[2:])).shape == (1,)


# -- 9. errors that blamed the wrong thing --------------------------------------------------------
@pytest.mark.parametrize("extra,message", [
    (["--device", "tpu"], "error: device='tpu' is not a device: expected 'auto', 'cpu', 'cuda' "
                          "or 'cuda:<index>' (a torch device)."),
    (["--n-jobs", "0"], "skntk select: error: argument --n-jobs: must be a number of workers >= "
                        "1, or -1 for all cores; got 0"),
    (["--seed", "-1"], "skntk select: error: argument --seed: must be an integer in "
                       "0..4294967295; got -1"),
    (["--model", "nosuch.pt"], "error: no model file at 'nosuch.pt' (and it is not a model name: "
                               "['7net-0', 'chgnet', 'chgnet-0.2.0', 'chgnet-0.3.0', 'sevennet', "
                               "'sevennet-0'])."),
])
def test_cli_errors_blame_the_option_at_fault(files, tmp_path, capsys, extra, message):
    argv = _select(files, "-o", str(tmp_path / "s.extxyz"), "--no-plot", *extra)
    with pytest.raises(SystemExit) if "argument" in message else _no_exit() as code:
        assert main(argv) == 2
    assert code is None or code.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == message


class _no_exit:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_library_errors_name_the_parameter_or_the_structure(tmp_path):
    from skntk.parallel import featurize

    X = molecules(4)
    with pytest.raises(ValueError, match=re.escape(
            "The 'random_state' parameter of make_pv_lcmd_pipeline must be an int in "
            "[0, 4294967295], a RandomState instance or None. Got 'abc' instead.")):
        make_pv_lcmd_pipeline(n_to_select=1, random_state="abc")
    huge = bulk("Cu", cubic=True)
    huge.set_cell(huge.cell * 1e12, scale_atoms=True)
    with pytest.raises(ValueError, match=re.escape(
            "X[1] (Cu4) has a periodic cell vector of length 3.61e+12 Å, beyond "
            "skntk.atoms.MAX_LENGTH = 1e+06 Å; check the units of its cell and positions.")):
        validate_structures([X[0], huge])
    ntk = ForceNTKTransformer(tiny_builtin(), n_features=8, random_state=0).fit(X[:2])
    pipe = make_pv_lcmd_pipeline(ntk, n_to_select=1, shortlist_size=2).fit(X[:2])
    with pytest.raises(TypeError, match=re.escape("X[1] is a str, not an ase.Atoms.")):
        pipe.select([X[2], "CH4", X[3]])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="feature cache directory '.*afile' exists and is "
                                                 "not a directory"):
        featurize(ntk, X[2:], tmp_path / "afile")


def test_cli_corrupt_cache_warning_is_one_line(files, tmp_path, capsys):
    argv = ["featurize", "--model", str(files / "model.pt"), "--train",
            str(files / "train.extxyz"), "--pool", str(files / "pool.extxyz"), "--kind", "energy",
            "--n-features", "8", "--cache", str(tmp_path / "c")]
    assert main(argv) == 0
    shard = next((tmp_path / "c").rglob("*.shard"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(data)
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert re.fullmatch(r"warning: feature cache file '.*\.shard' is damaged \(.*\); deleting it; "
                        r"its structures are recomputed\.\n", err), err


def test_learn_wrong_finetune_key_and_checkpoint_mismatch_name_the_field(tmp_path, capsys):
    from skntk.al.loop import ActiveLearningLoop
    from skntk.al.oracles import PoolOracle
    from skntk.finetune import MLIPRegressor
    from skntk.selection.baselines import RandomSelector

    X = ethanol(5)
    ase.io.write(tmp_path / "train.extxyz", X[:2])
    ase.io.write(tmp_path / "pool.extxyz", X[2:])
    chon_model().save(tmp_path / "m.pt")
    (tmp_path / "run.toml").write_text(f'output = "out"\n[model]\nname = "{tmp_path}/m.pt"\n'
                                       '[data]\nlabelled = "train.extxyz"\npool = "pool.extxyz"\n'
                                       '[finetune]\nepoch = 1\n')
    assert main(["learn", "--config", str(tmp_path / "run.toml")]) == 2
    assert capsys.readouterr().err == (
        "error: config section [finetune] has unknown key(s) ['epoch']; valid keys are "
        "['batch_size', 'device', 'energy_weight', 'epochs', 'force_weight', 'learning_rate', "
        "'parameters', 'patience', 'progress_bar', 'random_state', 'refit_shifts', "
        "'validation_fraction'].\n")
    model = chon_model()

    def loop(epochs):
        return ActiveLearningLoop(RandomSelector(), MLIPRegressor(model, epochs=epochs),
                                  PoolOracle(), n_rounds=1, batch_size=1, progress_bar=False,
                                  checkpoint_dir=tmp_path / "ck")

    loop(0).run(X[:2], X[2:])
    with pytest.raises(ValueError, match=re.escape(
            f"checkpoint {str(tmp_path / 'ck')!r} was written with other arguments "
            f"(regressor.epochs: checkpoint '0' vs now '1'); use another checkpoint_dir.")):
        loop(1).run(X[:2], X[2:])


# -- 8. Ctrl-C: one line, exit code 130, resume exact ---------------------------------------------
_INTERRUPTIBLE = """
import signal, sys, time
# Python installs its Ctrl-C handler only where SIGINT is not ignored: never inherit an ignore
signal.signal(signal.SIGINT, signal.default_int_handler)
import skntk.parallel as p
p.featurize.__kwdefaults__["shard_size"] = 2
compute, calls = p._transform_chunk, []
def slow(*args):
    calls.append(1)
    if len(calls) == 2:  # the first shard is on disk: wait here for the signal
        print("ready", flush=True)
        time.sleep(300)
    return compute(*args)
p._transform_chunk = slow
from skntk.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_ctrl_c_during_featurize_is_one_line_and_resumes(files, tmp_path, capsys):
    import signal

    argv = ["featurize", "--model", str(files / "model.pt"), "--train",
            str(files / "train.extxyz"), "--pool", str(files / "pool.extxyz"), "--kind", "energy",
            "--n-features", "8", "--cache", str(tmp_path / "c")]
    import torch

    # the interrupted run's shard is compared bit for bit with rows computed here: the same
    # number of torch threads in both processes (float32 sums depend on it)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTIBLE, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err == (f"interrupted: the pool features computed so far are kept in --cache "
                   f"{tmp_path / 'c'}; run the same command again to resume (nothing cached is "
                   f"recomputed).\n")
    assert main(argv) == 0  # resumed: the first shard is reused, the rest computed
    assert "featurised 8 pool structures (8 distinct): 6 computed, 2 already in" in \
        capsys.readouterr().out
    resumed = _cached_rows(files, tmp_path / "c")
    assert main(argv[:-1] + [str(tmp_path / "fresh")]) == 0
    np.testing.assert_array_equal(resumed, _cached_rows(files, tmp_path / "fresh"))


def _cached_rows(files, cache):
    from skntk.cli import _featurizer
    from skntk.parallel import featurize

    ntk, _, _ = _featurizer(str(files / "model.pt"), ase.io.read(files / "train.extxyz", ":"),
                            kind="energy", n_features=8, progress_bar=False)
    feats = featurize(ntk, str(files / "pool.extxyz"), cache)
    assert feats.stats["computed"] == 0
    return feats.take(np.arange(len(feats))).rows


@pytest.mark.parametrize("command,note", [
    ("select", "nothing was saved (no --cache); run the command again, with --cache DIR to keep "
               "the pool features of an interrupted run."),
    ("learn", "the finished rounds and every label are kept in {out}; run `skntk learn --config "
              "{cfg}` again to resume from the last finished round."),
])
def test_ctrl_c_during_select_and_learn_is_one_line(files, tmp_path, capsys, monkeypatch,
                                                    command, note):
    import skntk.al.config
    import skntk.cli

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(skntk.cli, "run_selection", interrupt)
    monkeypatch.setattr(skntk.al.config, "run_config", interrupt)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'output = "out"\n[data]\nlabelled = "{files}/train.extxyz"\n'
                   f'pool = "{files}/pool.extxyz"\n')
    argv = (_select(files, "-o", str(tmp_path / "s.extxyz")) if command == "select"
            else ["learn", "--config", str(cfg)])
    assert main(argv) == 130
    assert capsys.readouterr().err == "interrupted: " + note.format(
        out=tmp_path / "out" / "checkpoint", cfg=cfg) + "\n"


# -- 6. memory estimated from the parameters, before any work -----------------------------------
def test_huge_n_features_is_refused_in_fit_before_any_work(monkeypatch):
    import skntk.linalg

    monkeypatch.setattr(skntk.linalg, "available_host_memory", lambda: 8e9)
    monkeypatch.delenv("SKNTK_SKIP_MEMORY_CHECK", raising=False)
    model = chon_model()
    monkeypatch.setattr(type(model), "energy", lambda *a, **k: pytest.fail("featurised"))
    X = ethanol(2)
    ntk = ForceNTKTransformer(model, n_features=10**9, random_state=0, device="cpu")
    with pytest.raises(InsufficientMemoryError, match=r"^n_features=1000000000 needs about "
                       r"[\d.]+ [TG]B before any structure is featurised \(the sketch applied to "
                       r"a batch of 2 rows [\d.]+ [TG]B, the train rows [\d.]+ GB\); 8.0 GB "
                       r"available on cpu; use a smaller n_features \(the default is 256\)"):
        ntk.fit(X)
    assert ForceNTKTransformer(model, n_features=64, device="cpu").fit(X).n_features_out_ == 64


def test_cli_n_features_beyond_memory_is_refused_before_the_pool(files, tmp_path, capsys,
                                                                 monkeypatch):
    import skntk.parallel
    import skntk.selection._posterior as posterior

    monkeypatch.setattr(posterior, "available_host_memory", lambda: 8e9)
    # the pool is featurised by the pipeline through skntk.parallel.featurize: never reached
    monkeypatch.setattr(skntk.parallel, "featurize", lambda *a, **k: pytest.fail("featurised"))
    monkeypatch.delenv("SKNTK_SKIP_MEMORY_CHECK", raising=False)
    argv = _select(files, "-o", str(tmp_path / "s.extxyz"))
    argv[argv.index("--n-features") + 1] = "100000"
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "error: --n-features 100000: the posterior needs about 320.0 GB (four 100000 x 100000 "
        "float64 matrices); 8.0 GB available (the smaller of free memory and the address-space "
        "limit); use fewer features (SKNTK_SKIP_MEMORY_CHECK=1 skips this check).\n")


def test_available_memory_honours_the_address_space_limit(monkeypatch):
    import resource

    from skntk.linalg import available_host_memory

    free = available_host_memory()
    monkeypatch.setattr(resource, "getrlimit", lambda which: (
        (int(3e9) + _vm_size(), resource.RLIM_INFINITY) if which == resource.RLIMIT_AS
        else (resource.RLIM_INFINITY, resource.RLIM_INFINITY)))
    limited = available_host_memory()
    assert limited <= min(free, 3e9) + 1e8 and limited > 2e9


def _vm_size():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


# -- 7. processes sharing a feature cache share the work ----------------------------------------
_SLOW_FEATURIZE = """
import sys, time
from pathlib import Path
import skntk.parallel as p
p.featurize.__kwdefaults__["shard_size"] = 2
compute, calls = p._transform_chunk, []
def slow(*args):
    calls.append(1)
    if MODE == "hang" and len(calls) == 2:
        print("ready", flush=True)
        time.sleep(60)
    time.sleep(0.4)
    return compute(*args)
p._transform_chunk = slow
MODE, barrier = sys.argv[1], Path(sys.argv[2])
from skntk.cli import main
if MODE != "hang":  # start featurising together with the other process
    (barrier / MODE).touch()
    while len(list(barrier.iterdir())) < 2:
        time.sleep(0.05)
raise SystemExit(main(sys.argv[3:]))
"""


def _featurize_argv(files, cache):
    return ["featurize", "--model", str(files / "model.pt"), "--train",
            str(files / "train.extxyz"), "--pool", str(files / "pool.extxyz"), "--kind", "energy",
            "--n-features", "8", "--cache", str(cache)]


def test_two_processes_on_one_cache_compute_each_shard_once(files, tmp_path):
    (tmp_path / "barrier").mkdir()
    argv = _featurize_argv(files, tmp_path / "c")
    procs = [subprocess.Popen([sys.executable, "-c", _SLOW_FEATURIZE, name,
                               str(tmp_path / "barrier"), *argv],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    computed = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        computed.append(int(re.search(r"(\d+) computed", out).group(1)))
    assert sum(computed) == 8, computed  # each of the 8 structures computed by one process
    assert not list((tmp_path / "c").rglob("*.claim"))


def test_a_killed_holder_does_not_block_the_next_run(files, tmp_path, capsys, monkeypatch):
    import signal

    from skntk.parallel import featurize

    monkeypatch.setitem(featurize.__kwdefaults__, "shard_size", 2)  # the killed run's chunks
    argv = _featurize_argv(files, tmp_path / "c")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_FEATURIZE, "hang", str(tmp_path), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGKILL)  # no clean-up: its claim stays behind
        proc.wait(timeout=60)
    finally:
        proc.kill()
    claims = list((tmp_path / "c").rglob("*.claim"))
    assert len(claims) >= 1 and claims[0].read_text().split()[0] == str(proc.pid)
    assert main(argv) == 0
    assert "featurised 8 pool structures (8 distinct): 6 computed, 2 already in" in \
        capsys.readouterr().out
    assert not list((tmp_path / "c").rglob("*.claim"))  # taken over, or swept as stale


# -- fuzz: random corruptions through fit, select, the loop and evaluate: never a silent result --
def _corrupt(frames, kind, k, j, value):
    """A copy of ``frames`` with frame ``k`` corrupted (``kind``; atom ``j``; ``value``)."""
    out = [a.copy() for a in frames]
    for a, b in zip(out, frames, strict=True):
        a.calc = SinglePointCalculator(a, energy=b.calc.results["energy"],
                                       forces=np.array(b.calc.results["forces"]))
    a = out[k]
    j = j % len(a)
    if kind == "energy":
        a.calc.results["energy"] = value
    elif kind == "force":
        a.calc.results["forces"][j, j % 3] = value
    elif kind == "forces shape":
        a.calc.results["forces"] = a.calc.results["forces"][:-1]
    elif kind == "position":
        a.positions[j, j % 3] = value
    elif kind == "cell":
        a.pbc = True
        a.cell[j % 3, j % 3] = value
    elif kind == "copy":  # a translated (and, for a periodic frame, re-wrapped) copy of k + 1
        c = out[(k + 1) % len(out)].copy()
        c.calc = SinglePointCalculator(c, **out[(k + 1) % len(out)].calc.results)
        c.positions += [0.5 * value if np.isfinite(value) else 1.0, -2.0, 3.0]
        out[k] = c
    return out


_KINDS = ["energy", "force", "forces shape", "position", "cell", "copy"]
_fuzz = settings(max_examples=12, deadline=None, derandomize=True)
_corruptions = st.tuples(st.sampled_from(_KINDS), st.integers(0, 5), st.integers(0, 8),
                         st.sampled_from([np.nan, np.inf, -np.inf]))


def _label_bad(kind):
    return kind in ("energy", "force", "forces shape")


def test_fuzz_fit_and_evaluate_never_return_a_silent_result():
    from skntk.finetune import MLIPRegressor
    from skntk.metrics import evaluate

    frames = ethanol(6)
    reg = MLIPRegressor(chon_model(), epochs=0, random_state=0).fit(frames[:3])

    @_fuzz
    @given(_corruptions)
    def check(c):
        kind, k, j, value = c
        X = _corrupt(frames, kind, k, j, value)
        if kind == "copy":  # a duplicate is a fine training set and test set
            assert np.isfinite(MLIPRegressor(chon_model(), epochs=0).fit(X).predict(X)).all()
            assert np.isfinite(evaluate(reg, X)["energy_mae"])
            return
        with pytest.raises((ValueError, TypeError), match=rf"X\[{k}\] \(C2H6O\)"):
            MLIPRegressor(chon_model(), epochs=0).fit(X)
        if _label_bad(kind) and kind != "forces shape":
            with pytest.warns(UserWarning, match=rf"skips 1 of the 6 .*X\[{k}\] \(C2H6O\)"):
                m = evaluate(reg, X)
            assert m["n_skipped"] == 1 and np.isfinite(m["energy_mae"])
        else:
            with pytest.raises((ValueError, TypeError), match=rf"X\[{k}\]"):
                evaluate(reg, X)

    check()


def test_fuzz_select_and_loop_never_return_a_silent_result():
    from skntk.al.loop import ActiveLearningLoop
    from skntk.al.oracles import PoolOracle
    from skntk.finetune import MLIPRegressor
    from skntk.selection.baselines import RandomSelector

    frames = ethanol(9)
    labelled, pool = frames[:3], frames[3:]
    pipe = make_pv_lcmd_pipeline(ForceNTKTransformer(chon_model(), kind="energy", n_features=8),
                                 shortlist_size=3, n_to_select=2, random_state=0).fit(labelled)

    @_fuzz
    @given(_corruptions)
    def check(c):
        kind, k, j, value = c
        P = _corrupt(pool, kind, k, j, value)
        if kind in ("position", "cell"):
            with pytest.raises(ValueError, match=rf"X\[{k}\] \(C2H6O\)"):
                pipe.select(P)
        elif kind == "copy":
            with pytest.warns(UserWarning, match="pool has 1 duplicate structures"):
                idx = pipe.select(P)
            assert k not in idx.tolist() or (k + 1) % 6 not in idx.tolist()
        else:  # labels play no part in a selection
            assert len(set(pipe.select(P).tolist())) == 2
        L = _corrupt(labelled, kind, k % 3, j, value)
        loop = ActiveLearningLoop(RandomSelector(), MLIPRegressor(chon_model(), epochs=0),
                                  PoolOracle(), n_rounds=1, batch_size=6, random_state=0,
                                  progress_bar=False)
        if kind == "copy":
            return
        with pytest.raises((ValueError, TypeError), match=rf"labelled\[{k % 3}\] \(C2H6O\)"):
            loop.run(L, pool)
        if _label_bad(kind):  # a bad label in the pool: a failed label, never a training one
            res = loop.run(labelled, P)
            assert k in res.failed and k not in res.selected

    check()

import json

import ase.io
import numpy as np
import pytest

from skntk.cli import main
from skntk.io import example_path, read_structures, split_by
from skntk.models.builtin import BuiltinMLIP


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    frames = read_structures(example_path())
    species = sorted({int(z) for a in frames for z in a.numbers})
    path = tmp_path_factory.mktemp("model") / "builtin.pt"
    BuiltinMLIP(species, cutoff=4.0, n_hidden=8, n_blocks=1, random_state=0).save(path)
    return path


def test_select_writes_pool_frames(tmp_path, model_file, capsys):
    frames = read_structures(example_path())
    sids = sorted({a.info["sid"] for a in frames})
    train_idx, pool_idx = split_by(frames, "sid", sids[:1])
    ase.io.write(tmp_path / "train.extxyz", [frames[i] for i in train_idx])
    ase.io.write(tmp_path / "pool.extxyz", [frames[i] for i in pool_idx[:30]])
    out = tmp_path / "sel.extxyz"
    rc = main(["select", "--model", str(model_file), "--train", str(tmp_path / "train.extxyz"),
               "--pool", str(tmp_path / "pool.extxyz"), "-n", "4", "--n-features", "32",
               "--n-probes", "2", "--shortlist", "12", "-o", str(out), "--no-plot"])
    assert rc == 0
    selected = ase.io.read(out, ":")
    pool = read_structures(tmp_path / "pool.extxyz")
    idx = [a.info["pool_index"] for a in selected]
    assert len(idx) == 4 and len(set(idx)) == 4
    assert [a.info["selection_rank"] for a in selected] == [0, 1, 2, 3]
    for a in selected:  # the written frame is the pool frame, labels included
        src = pool[a.info["pool_index"]]
        np.testing.assert_allclose(a.positions, src.positions)
        assert a.get_potential_energy() == pytest.approx(src.get_potential_energy())
    report = json.loads((tmp_path / "sel_report.json").read_text())
    assert report["selected"] == idx
    text = capsys.readouterr().out
    assert "time per stage" in text and "PV screen" in text


def test_demo_runs_on_bundled_data(tmp_path, model_file, capsys):
    rc = main(["demo", "--model", str(model_file), "--max-pool", "20", "-n", "3",
               "--n-features", "32", "--n-probes", "2", "--out", str(tmp_path)])
    assert rc == 0
    assert len(ase.io.read(tmp_path / "selected.extxyz", ":")) == 3
    assert (tmp_path / "selection.png").stat().st_size > 0
    assert "pool = 20 frames" in capsys.readouterr().out


def test_too_large_batch_is_an_error(tmp_path, model_file, capsys):
    rc = main(["demo", "--model", str(model_file), "--max-pool", "5", "-n", "6",
               "--out", str(tmp_path)])
    assert rc == 2
    assert "-n 6 exceeds the 5 pool structures" in capsys.readouterr().err


def test_one_line_warnings_reemits_foreign_warnings_once(capsys):
    """A foreign warning inside the CLI's warning filter is re-emitted once (it once re-recorded
    itself forever, growing memory until the demo was killed)."""
    import warnings

    from skntk.cli import _one_line_warnings

    with warnings.catch_warnings(record=True) as outer:
        warnings.simplefilter("always")
        with _one_line_warnings():
            warnings.warn("from elsewhere", RuntimeWarning, stacklevel=1)
    assert [str(w.message) for w in outer] == ["from elsewhere"]


def _files(tmp_path):
    frames = read_structures(example_path())
    sids = sorted({a.info["sid"] for a in frames})
    train_idx, pool_idx = split_by(frames, "sid", sids[:1])
    ase.io.write(tmp_path / "train.extxyz", [frames[i] for i in train_idx])
    ase.io.write(tmp_path / "pool.extxyz", [frames[i] for i in pool_idx[:30]])
    return ["--train", str(tmp_path / "train.extxyz"), "--pool", str(tmp_path / "pool.extxyz"),
            "--kind", "energy", "--n-features", "16"]


def test_featurize_then_select_from_the_shards(tmp_path, model_file, capsys, monkeypatch):
    import skntk.parallel

    common = ["--model", str(model_file), *_files(tmp_path), "--cache", str(tmp_path / "c")]
    assert main(["featurize", *common]) == 0
    assert "featurised 30 pool structures (30 distinct): 30 computed, 0 already in" in \
        capsys.readouterr().out
    assert main(["featurize", *common]) == 0  # a rerun resumes: nothing left to compute
    assert "0 computed, 30 already in" in capsys.readouterr().out
    monkeypatch.setattr(skntk.parallel, "_transform_chunk",
                        lambda *a: pytest.fail("select featurised a cached structure"))
    out = tmp_path / "sel.extxyz"
    assert main(["select", *common, "-n", "4", "--shortlist", "10", "-o", str(out), "--no-plot",
                 "--scores", str(tmp_path / "scores.csv")]) == 0
    monkeypatch.undo()
    cached = json.loads((tmp_path / "sel_report.json").read_text())["selected"]
    # the same selection without a cache (a temporary one) and with two workers
    out2 = tmp_path / "sel2.extxyz"
    assert main(["select", "--model", str(model_file), *_files(tmp_path), "-n", "4",
                 "--shortlist", "10", "-o", str(out2), "--no-plot", "--n-jobs", "2"]) == 0
    assert json.loads((tmp_path / "sel2_report.json").read_text())["selected"] == cached
    table = np.loadtxt(tmp_path / "scores.csv", delimiter=",", skiprows=1)
    assert table.shape == (30, 4) and table[:, 0].tolist() == list(range(30))
    ranks = table[:, 3].astype(int)
    assert [int(np.flatnonzero(ranks == r)[0]) for r in range(4)] == cached
    assert table[:, 2].sum() == 10 and np.all(table[ranks >= 0, 2] == 1)
    # the shortlist is the top-10 PV, the written pv is the CSV's
    assert set(np.flatnonzero(table[:, 2])) == set(np.argsort(-table[:, 1], kind="stable")[:10])
    for a in ase.io.read(out, ":"):
        assert a.info["pv"] == pytest.approx(table[a.info["pool_index"], 1], rel=1e-9)


def test_featurize_needs_a_cache_and_names_bad_frames(tmp_path, model_file, capsys):
    args = _files(tmp_path)
    with pytest.raises(SystemExit):
        main(["featurize", "--model", str(model_file), *args])
    assert "--cache" in capsys.readouterr().err
    text = (tmp_path / "pool.extxyz").read_text().splitlines()
    n0 = int(text[0])
    (tmp_path / "pool.extxyz").write_text("\n".join(text[: n0 + 2 + 5]) + "\n")
    assert main(["featurize", "--model", str(model_file), *args, "--cache",
                 str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --pool: ") and "pool.extxyz: frame 1: XYZError" in err
    assert err.count("\n") == 1


def test_uncertainty_command_scores_frames(tmp_path):
    """``skntk uncertainty``: fit on --train/--calibration, score, write, plot; --save and
    --estimator give the same numbers; bad combinations answered in one line."""
    import ase.io
    from ase.build import fcc111
    from ase.calculators.emt import EMT

    from skntk.cli import main
    from skntk.models.builtin import BuiltinMLIP

    def frames(n, seed, amp):
        out = []
        for k in range(n):
            a = fcc111("Cu", (2, 2, 1), vacuum=4.0)
            a.rattle(amp, seed=seed + k)
            a.calc = EMT()
            a.get_forces()
            out.append(a)
        return out

    BuiltinMLIP([29], n_hidden=8, n_blocks=1, random_state=0).save(tmp_path / "cu.pt")
    ase.io.write(tmp_path / "train.extxyz", frames(4, 0, 0.05))
    ase.io.write(tmp_path / "cal.extxyz", frames(10, 100, 0.1))
    ase.io.write(tmp_path / "new.extxyz", frames(5, 200, 0.15))
    out = tmp_path / "scored.extxyz"
    args = ["uncertainty", "--model", str(tmp_path / "cu.pt"), "--train",
            str(tmp_path / "train.extxyz"), "--calibration", str(tmp_path / "cal.extxyz"),
            "--structures", str(tmp_path / "new.extxyz"), "-o", str(out),
            "--save", str(tmp_path / "est.joblib")]
    assert main(args) == 0
    scored = ase.io.read(out, ":")
    assert len(scored) == 5
    for a in scored:
        assert a.info["force_uncertainty"] > 0
        assert a.info["force_uncertainty_upper_90"] >= a.info["force_uncertainty"]
        assert a.info["force_error"] > 0  # the frames carry EMT labels
    assert out.with_suffix(".png").stat().st_size > 0
    again = tmp_path / "again.extxyz"
    assert main(["uncertainty", "--estimator", str(tmp_path / "est.joblib"), "--structures",
                 str(tmp_path / "new.extxyz"), "-o", str(again)]) == 0
    assert [a.info["force_uncertainty"] for a in ase.io.read(again, ":")] == \
        [a.info["force_uncertainty"] for a in scored]
    assert main(["uncertainty", "--model", str(tmp_path / "cu.pt"), "--structures",
                 str(tmp_path / "new.extxyz"), "-o", str(again)]) == 2
    assert main(["uncertainty", "--estimator", str(tmp_path / "cu.pt"), "--structures",
                 str(tmp_path / "new.extxyz"), "-o", str(again)]) == 2

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

"""``skntk learn --config run.toml`` end to end, in a subprocess."""

import json
import subprocess
import sys

import ase.io
import pytest
from ase.build import fcc111
from ase.calculators.emt import EMT

from skntk.models import load
from tests.builders import tiny_builtin


def _frames(n, seed, amp, label):
    out = []
    for k in range(n):
        a = fcc111("Cu", (2, 2, 2), vacuum=4.0)
        a.rattle(amp, seed=seed + k)
        if label:
            a.calc = EMT()
            a.get_forces()
        out.append(a)
    return out


def _skntk(*args, cwd):
    return subprocess.run([sys.executable, "-c", "from skntk.cli import main; "
                           "raise SystemExit(main())", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("learn")
    ase.io.write(d / "train.extxyz", _frames(4, 0, 0.05, True))
    ase.io.write(d / "pool.extxyz", _frames(12, 100, 0.15, False))
    ase.io.write(d / "test.extxyz", _frames(4, 1000, 0.1, True))
    tiny_builtin((29,)).save(d / "cu.pt")
    (d / "run.toml").write_text("""
output = "out"
[model]
name = "cu.pt"
[data]
labelled = "train.extxyz"
pool = "pool.extxyz"
test = {heldout = "test.extxyz"}
[selector]
method = "pv_lcmd"
n_features = 16
shortlist_size = 6
[finetune]
parameters = "all"
epochs = 2
[oracle]
type = "emt"
[loop]
n_rounds = 2
batch_size = 2
random_state = 0
""")
    return d


def test_learn_end_to_end_and_resume(workdir):
    r = _skntk("learn", "--config", "run.toml", cwd=workdir)
    assert r.returncode == 0, r.stderr
    out = workdir / "out"
    history = json.loads((out / "history.json").read_text())
    assert [h["n_labelled"] for h in history] == [4, 6, 8]
    assert "round 2: 8 labelled" in r.stdout
    labelled = ase.io.read(out / "labelled.extxyz", ":")
    assert len(labelled) == 8
    pool = ase.io.read(workdir / "pool.extxyz", ":")
    picked = [i for h in history for i in h["selected"]]
    for a, i in zip(labelled[4:], picked, strict=True):  # new labels are EMT's, of the picks
        b = pool[i].copy()
        b.calc = EMT()
        assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-6)
    assert (out / "learning_curve.png").stat().st_size > 0
    model = load(out / "model.pt")  # the fine-tuned model, in the built-in format
    assert model.species == frozenset({29})
    # rerunning resumes a finished run: same history, nothing recomputed
    again = _skntk("learn", "--config", "run.toml", cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "history.json").read_text()) == history


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.replace('pool = "pool.extxyz"', 'pool = "missing.extxyz"'), "missing.extxyz"),
    (lambda s: s.replace('method = "pv_lcmd"', 'method = "nope"'), "'nope'"),
    (lambda s: s.replace('type = "emt"', 'type = "dft"'), "'dft'"),
    (lambda s: s.replace("[loop]", "[looop]"), "looop"),
    (lambda s: s.replace("batch_size = 2", "batch_size = 0"), "batch_size"),
    (lambda s: s + "\n[[", "TOML"),
])
def test_learn_bad_config_one_line(workdir, edit, needle, capsys, monkeypatch):
    from skntk.cli import main

    bad = workdir / "bad.toml"
    bad.write_text(edit((workdir / "run.toml").read_text()).replace('output = "out"',
                                                                   'output = "bad_out"'))
    monkeypatch.chdir(workdir)
    assert main(["learn", "--config", "bad.toml"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err


def test_learn_missing_config_subprocess(workdir):
    r = _skntk("learn", "--config", "no-such.toml", cwd=workdir)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: config file 'no-such.toml' does not exist."


def test_learn_other_arguments_refused(workdir):
    text = (workdir / "run.toml").read_text().replace("epochs = 2", "epochs = 3")
    (workdir / "changed.toml").write_text(text)
    r = _skntk("learn", "--config", "changed.toml", cwd=workdir)
    assert r.returncode == 2 and "epochs" in r.stderr and "Traceback" not in r.stderr


def test_learn_onthefly_section_end_to_end(workdir):
    ase.io.write(workdir / "start.extxyz", fcc111("Cu", (2, 2, 1), vacuum=4.0))
    (workdir / "otf.toml").write_text("""
output = "otf_out"
[model]
name = "cu.pt"
[data]
start = "start.extxyz"
test = {heldout = "test.extxyz"}
[finetune]
parameters = "all"
epochs = 2
[oracle]
type = "emt"
[onthefly]
threshold = 0.05
every = 4
budget = 6
refit_every = 2
temperature_K = 600
timestep_fs = 2.0
random_state = 0
n_steps = 200
""")
    r = _skntk("learn", "--config", "otf.toml", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "6 frames labelled (0 failed); stopped: budget" in r.stdout
    assert r.stdout.count("refit ") == 3 and "heldout: F" in r.stdout
    out = workdir / "otf_out"
    history = json.loads((out / "history.json").read_text())
    assert [h["n_labels"] for h in history] == [2, 4, 6]
    checks = json.loads((out / "checks.json").read_text())
    assert sum(c["labelled"] for c in checks) == 6
    assert len(ase.io.read(out / "labelled.extxyz", ":")) == 6
    assert (out / "onthefly.png").stat().st_size > 0
    # a rerun resumes the finished run: nothing is labelled again
    again = _skntk("learn", "--config", "otf.toml", cwd=workdir)
    assert again.returncode == 0 and again.stdout == r.stdout


def test_learn_onthefly_bad_key_one_line(workdir):
    (workdir / "otf_bad.toml").write_text("""
[model]
name = "cu.pt"
[data]
start = "train.extxyz"
[oracle]
type = "emt"
[onthefly]
treshold = 0.05
""")
    r = _skntk("learn", "--config", "otf_bad.toml", cwd=workdir)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "unknown key(s) ['treshold'] in [onthefly]" in r.stderr


def test_model_file_resolved_against_the_config_folder_names_kept(workdir, tmp_path,
                                                                   monkeypatch):
    from skntk.al.config import load_config

    monkeypatch.chdir(tmp_path)  # another folder: "cu.pt" is not here
    cfg = load_config(workdir / "run.toml")
    assert cfg["model"]["name"] == str(workdir / "cu.pt")
    assert len(load(cfg["model"]["name"], device="cpu").parameters("all")) > 0
    other = tmp_path / "named.toml"
    other.write_text((workdir / "run.toml").read_text()
                     .replace('name = "cu.pt"', 'name = "SevenNet-0"')
                     .replace('"train.extxyz"', f'"{workdir / "train.extxyz"}"')
                     .replace('"pool.extxyz"', f'"{workdir / "pool.extxyz"}"')
                     .replace('"test.extxyz"', f'"{workdir / "test.extxyz"}"'))
    assert load_config(other)["model"]["name"] == "SevenNet-0"  # a name, not a file

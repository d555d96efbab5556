"""benchmarks/gpu_check.py, the script for a lent GPU, runs end to end here on the CPU device
(built-in model, tiny sizes), so it does not rot between the sessions that have a GPU."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks/gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--device", "cpu", "--frames", "4", "--pool", "600", "--backends",
                     "builtin", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["errors"] == {}
    (b,) = report["backends"]
    assert b["backend"] == "builtin" and b["n_frames"] == 4
    assert b["energy/default/max_rel_diff"] == 0.0  # the same device: identical rows
    assert b["joint/probes4/default"]["seconds"] > 0
    sel = report["selection"]
    assert sel["pv_lcmd/same_picks"] and sel["lcmd/same_picks"]

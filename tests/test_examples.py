"""The example scripts run (examples that are never run go stale)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_oc20_pipeline_example_runs():
    pytest.importorskip("sevenn", reason="needs the sevennet extra: pip install skntk[sevennet]")
    out = subprocess.run([sys.executable, str(EXAMPLES / "oc20_pipeline.py"), "--pool-size", "6",
                          "-n", "2"], capture_output=True, text=True, timeout=600, check=True)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("6 candidates, 2 picked")
    assert sum("sid=" in line for line in lines) == 2

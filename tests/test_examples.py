"""The example scripts run (examples that are never run go stale).

``make docs`` executes every example in its fast mode (the gallery); the tests here run the cheap
ones and check that each script is a gallery page with a fast mode.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))


def test_oc20_pipeline_example_runs():
    pytest.importorskip("sevenn", reason="needs the sevennet extra: pip install skntk[sevennet]")
    out = subprocess.run([sys.executable, str(EXAMPLES / "oc20_pipeline.py"), "--pool-size", "6",
                          "-n", "2"], capture_output=True, text=True, timeout=600, check=True)
    lines = out.stdout.splitlines()
    assert any(line.startswith("6 candidates, 2 picked") for line in lines)
    assert sum("sid=" in line for line in lines) == 2


def test_soap_example_runs():
    pytest.importorskip("dscribe", reason="needs the soap extra: pip install skntk[soap]")
    out = subprocess.run([sys.executable, str(EXAMPLES / "soap_featuriser.py"), "--fast"],
                         capture_output=True, text=True, timeout=600, check=True,
                         env={**os.environ, "MPLBACKEND": "agg"})
    assert "passes every invariant" in out.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_example_is_a_gallery_page_with_a_fast_mode(script):
    source = script.read_text()
    doc = ast.get_docstring(ast.parse(source))
    assert doc and doc.lstrip().startswith("# "), "the docstring starts with a '# Title' line"
    assert "SKNTK_EXAMPLES_FAST" in source and "--fast" in source

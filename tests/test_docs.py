"""The documentation site's sources stay complete (the build itself runs in ``make docs``)."""

import re
from pathlib import Path

import skntk

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
MODULES = ["al", "finetune", "metrics", "selection", "models", "pipeline", "transformers", "io",
           "atoms", "blocks", "parallel", "uncertainty"]


def test_every_top_level_name_is_in_the_api_index():
    index = (API / "index.md").read_text()
    missing = [n for n in skntk.__all__ if n != "__version__" and f"`{n}`" not in index]
    assert not missing, f"add to docs/api/index.md: {missing}"


def test_every_public_module_has_an_api_page():
    text = "\n".join(p.read_text() for p in API.glob("*.md"))
    rendered = set(re.findall(r"^::: (skntk[\w.]*)", text, flags=re.MULTILINE))
    for module in MODULES:
        assert any(r == f"skntk.{module}" or r.startswith(f"skntk.{module}.") for r in rendered), \
            module


def test_every_markdown_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = [p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")
             if not p.relative_to(ROOT / "docs").as_posix().startswith(("generated/", "_ext/"))]
    optional = {"evidence.md"}  # added to the nav by docs/_ext/hooks.py when present
    missing = [p for p in pages if p not in optional and p not in nav]
    assert not missing, f"add to the nav of mkdocs.yml: {missing}"

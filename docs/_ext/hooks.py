"""MkDocs hooks of the skntk documentation site (``mkdocs.yml``: ``hooks:``).

- Puts repository files that the markdown pages link to, but that live outside ``docs/``, into the
  site: the benchmark plots of ``benchmarks/results/`` (under ``assets/benchmarks/``) and
  ``CHANGELOG.md`` (as the page ``changelog.md``). Links such as
  ``../benchmarks/results/bench_pv.png`` keep working on GitHub and are rewritten for the site.
- Adds ``docs/evidence.md`` (the active-learning evidence, written separately) to the nav and
  links it from ``<!-- evidence-link -->`` when it exists.
- Replaces ``<!-- bench-table NAME -->`` markers with tables built from the benchmark JSON files,
  so the Benchmarks page always shows the numbers the scripts last wrote.
"""

from __future__ import annotations

import json
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
ASSETS = "assets/benchmarks"

_BENCH_LINK = re.compile(r"\]\(((?:\.\./)+)benchmarks/results/([^)\s]+)\)")
_REPO_LINK = re.compile(r"\]\(((?:\.\./)+)(README\.md|CHANGELOG\.md)(#[^)\s]*)?\)")
_TABLE = re.compile(r"<!--\s*bench-table\s+([\w-]+)\s*-->")


_EVIDENCE = ROOT / "docs" / "evidence.md"


def on_config(config):
    if _EVIDENCE.exists():
        nav = config["nav"]
        at = next((i + 1 for i, item in enumerate(nav)
                   if isinstance(item, dict) and "Benchmarks" in item), len(nav))
        nav.insert(at, {"Active-learning evidence": "evidence.md"})
    return config


def _evidence_link(page) -> str:
    if _EVIDENCE.exists():
        return f"The results: [Active-learning evidence]({_relative(page, 'evidence.md')})."
    return ("The write-up (`docs/evidence.md`) is not in this build yet; the raw results are the "
            "JSON files in `benchmarks/results/al/`.")


def on_files(files, config):
    for png in sorted(RESULTS.rglob("*.png")):
        rel = png.relative_to(RESULTS).as_posix()
        files.append(File.generated(config, f"{ASSETS}/{rel}", abs_src_path=str(png)))
    files.append(File.generated(config, "changelog.md", abs_src_path=str(ROOT / "CHANGELOG.md")))
    return files


def _relative(page, target: str) -> str:
    return posixpath.relpath(target, posixpath.dirname(page.file.src_uri) or ".")


def on_page_markdown(markdown, page, config, files):
    markdown = _BENCH_LINK.sub(
        lambda m: f"]({_relative(page, f'{ASSETS}/{m.group(2)}')})", markdown)
    target = {"README.md": "index.md", "CHANGELOG.md": "changelog.md"}
    markdown = _REPO_LINK.sub(
        lambda m: f"]({_relative(page, target[m.group(2)])}{m.group(3) or ''})", markdown)
    markdown = markdown.replace("<!-- evidence-link -->", _evidence_link(page))
    return _TABLE.sub(lambda m: _bench_table(m.group(1)), markdown)


# -- benchmark tables ---------------------------------------------------------------------------
def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _md(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _pv_screen() -> str:
    d = _load("bench_pv")
    rows = []
    for case in d["screen"]:
        label = (f"d={case['d']}, " + ("single rows" if case["rows_per_structure"] == 1
                                       else f"{case['rows_per_structure']} rows/structure"))
        for k, r in enumerate(case["runs"]):
            rows.append([label if k == 0 else "", f"{r['n_pool']:.0e}", f"{r['n_rows']:.1e}",
                         f"{r['seconds']:.3f}", f"{r['peak_mib']:.0f}", f"{r['input_mib']:.0f}",
                         f"{r['gflops']:.1f}", f"{100 * r['fraction_of_matmul']:.0f} %"])
        rows.append([f"*scaling exponent {case['scaling_exponent']:.3f}*", "", "", "", "", "",
                     "", ""])
    return _md(["case", "n_pool", "rows", "time (s)", "peak MiB", "input MiB", "GFLOP/s",
                "of matmul"], rows)


def _pv_naive() -> str:
    d = _load("bench_pv")["naive"]
    rows = [[f"{r['n_pool']:,}", f"{r['feature_seconds']:.2f} s, {r['feature_peak_mib']:.0f} MiB",
             f"{r['kernel_seconds']:.1f} s, {r['kernel_peak_mib']:,.0f} MiB",
             f"{r['time_ratio']:.1f}×", f"{r['memory_ratio']:.1f}×", f"{r['max_rel_diff']:.1e}"]
            for r in d["runs"]]
    return _md(["n_pool", "feature space", "kernel space", "time ratio", "memory ratio",
                "max rel. diff of PV"], rows)


def _ntk_ratios() -> str:
    d = _load("bench_ntk")["datasets"]
    routes = list(next(iter(d.values()))["ratios"])
    header = ["route"] + [f"{name} ({v['n_atoms_mean']:.0f} atoms)" for name, v in d.items()]
    rows = [[f"`{r}`"] + [f"{v['ratios'][r]:.2f}" for v in d.values()] for r in routes]
    return _md(header, rows)


def _backends_rank() -> str:
    d = _load("bench_backends")["rank"]
    rows = []
    for model, v in d.items():
        for subset, n in v["n_params"].items():
            rows.append([model, f"`{subset}`", f"{n:,}"]
                        + [f"{v[ds][subset]['effective_rank']:.1f}" for ds in ("oc20", "3bpa",
                                                                             "both")])
    return _md(["model", "subset", "parameters", "eff. rank OC20", "eff. rank 3BPA",
                "eff. rank both"], rows)


def _backends_cost() -> str:
    d = _load("bench_backends")["cost"]
    rows = []
    for model, subsets in d.items():
        for subset, runs in subsets.items():
            for r in runs:
                rows.append([model, f"`{subset}`", f"{r['structure']} ({r['n_atoms']})",
                             f"{r['t_EF_s']:.3f}"] + [
                    f"{r[k]:.1f}" if k in r else "—" for k in
                    ("ratio_energy", "ratio_force_probes", "ratio_joint_probes",
                     "ratio_force_exact")])
    return _md(["model", "subset", "structure (atoms)", "E+F (s)", "energy ×", "force probes ×",
                "joint probes ×", "force exact ×"], rows)


def _throughput() -> str:
    res = _load("bench_throughput")["results"]
    cells = {}
    for r in res:
        cells.setdefault((r["backend"], r["dataset"], r["config"]), {})[r["variant"]] = r
    rows = []
    for (backend, dataset, config), v in cells.items():
        cur = min((x for k, x in v.items() if k.startswith("current")),
                  key=lambda x: x["ratio"], default=None)
        ref = v.get("reference")
        proj = (f"{cur['projected_200k_oc20_h']:.1f} h" if cur and "projected_200k_oc20_h" in cur
                else "")
        rows.append([backend, dataset, f"`{config}`", f"{cur['n_params']:,}" if cur else "",
                     " / ".join(f"{v[k]['ratio']:.2f}" for k in sorted(v)
                                if k.startswith("current")),
                     f"{ref['ratio']:.2f}" if ref else "—",
                     f"{ref['seconds'] / cur['seconds']:.1f}×" if ref and cur else "—",
                     f"{cur['structures_per_s']:.1f}" if cur else "", proj])
    return _md(["backend", "frames", "rows", "P", "current × E+F (b8 / b32)",
                "reference × E+F", "speed-up", "structures/s", "200k OC20 frames"], rows)


def _machine(name: str) -> str:
    d = _load(name)
    meta = d.get("machine") or d.get("meta") or {}
    if isinstance(meta, str):
        meta = {"machine": meta}
    parts = [f"{k}: {v}" for k, v in meta.items() if v not in ("", None)]
    return "`" + "; ".join(parts) + "`\n"


_TABLES = {
    "pv-screen": _pv_screen,
    "pv-naive": _pv_naive,
    "ntk-ratios": _ntk_ratios,
    "backends-rank": _backends_rank,
    "backends-cost": _backends_cost,
    "throughput": _throughput,
    "throughput-machine": lambda: _machine("bench_throughput"),
    "pv-machine": lambda: _machine("bench_pv"),
    "ntk-machine": lambda: _machine("bench_ntk"),
    "backends-machine": lambda: _machine("bench_backends"),
}


def _bench_table(name: str) -> str:
    if name not in _TABLES:
        raise KeyError(f"unknown bench-table {name!r}; known: {sorted(_TABLES)}")
    return _TABLES[name]()

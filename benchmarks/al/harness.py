"""Active-learning evidence harness: every (split, method, seed) of an experiment through the loop.

    python benchmarks/al/harness.py run benchmarks/al/configs/acac_shift_50.toml [--max-hours 2]
    python benchmarks/al/harness.py report benchmarks/results/al/acac_shift_50
    python benchmarks/al/harness.py docs        # docs/evidence.md: FINDINGS.md + every report

This file is the command line; the work is in two modules beside it, data flowing one way:

- ``harness_run.py``: configs (TOML, read through :func:`skntk.al.config.read_toml`; paths
  relative to the config file), the split rules (``files``, ``shift``, ``sid``) and ``run``, which
  writes one JSON per (split, method, seed) to ``benchmarks/results/al/<experiment>/`` as soon as it
  finishes; finished files are skipped, an unfinished (method, seed) resumes from its loop
  checkpoint (``.ckpt/``), the NTK methods of one seed share their pool features
  (content-addressed cache ``.features/``: computed once per seed, not once per method; the
  ``s/run`` of the first NTK method of a seed carries the featurisation), and ``--max-hours``
  stops starting new runs after that long, so a CPU-sized matrix runs in pieces;
- ``harness_report.py``: ``report`` turns the JSONs into a table (mean ± std over seeds per round,
  median ratio to random and seeds beating random, time per method) and learning-curve plots;
  ``docs`` writes ``docs/evidence.md`` from ``FINDINGS.md`` and every report.

Every name of the two modules is importable from here (``harness.make_split``, ...).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # the two modules beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness_report import (  # noqa: E402, F401
    STAGES,
    SUMMARY_MARK,
    TAIL_METRICS,
    _families,
    across_markdown,
    cmd_docs,
    cmd_report,
    cost_markdown,
    cost_summary,
    evidence_round,
    finetune_markdown,
    finetune_summary,
    labels_needed,
    labels_to_target,
    labels_to_target_markdown,
    load_results,
    monotone_curve,
    paired,
    paired_stats,
    plot_curves,
    report_markdown,
    selection_mix,
    selection_mix_markdown,
    subgroup_markdown,
    summarise,
    summary_markdown,
    target_tests,
    variant_of,
)
from harness_run import (  # noqa: E402, F401
    CONFIGS,
    EXTENDED,
    RESULTS,
    cmd_run,
    eligible_unseen,
    load_config,
    make_split,
    run_one,
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Active-learning evidence harness (run / report).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run every (method, seed) of a config; resumes")
    r.add_argument("config")
    r.add_argument("--methods", nargs="+", default=None, help="subset of the config's methods")
    r.add_argument("--seeds", nargs="+", type=int, default=None)
    r.add_argument("--max-hours", type=float, default=None,
                   help="start no new run after this many hours (rerun to continue)")
    r.add_argument("--out", default=None, help="result folder (default results/al/<experiment>)")
    r.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, one per core); give each of "
                        "several parallel runs its share, e.g. 1 each for two runs on 2 cores")
    p = sub.add_parser("report", help="table + plots from a result folder")
    p.add_argument("directory")
    d = sub.add_parser("docs", help="docs/evidence.md from FINDINGS.md and every experiment")
    d.add_argument("--results", default=str(RESULTS))
    d.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "docs" /
                                        "evidence.md"))
    args = ap.parse_args(argv)
    return {"run": cmd_run, "report": cmd_report, "docs": cmd_docs}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

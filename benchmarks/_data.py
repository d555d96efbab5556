"""Where the benchmarks find the shared data sets that are not in the repository (molecular MD
frames, OC20 relaxations): ``$SKNTK_SHARED_DATA`` when set, else ``shared/data`` beside the
repository (``../shared/data`` from its root, which also serves a git worktree made next to the
main checkout). Every ``bench_*.py`` script reads it from here: ``from _data import SHARED_DATA``.

The evidence harness's configs (``al/configs/*.toml``) name the same files by paths relative to
the config file (``../../../../shared/data/...``), as ``skntk learn`` configs do.
"""

import os
from pathlib import Path

#: The shared data folder (subfolders ``molecules/`` and ``oc20/``).
SHARED_DATA = Path(os.environ.get("SKNTK_SHARED_DATA")
                   or Path(__file__).resolve().parents[2] / "shared" / "data")

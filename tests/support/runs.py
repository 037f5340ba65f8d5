"""The repository, `emlab` on the command line, an empty cache that shares the models, and the
session's tiny run (its record and the xdist group of the tests that read it)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# `make test` runs the suite on two pytest-xdist workers (--dist loadgroup): the tests that read
# the session's tiny run carry `TINY_RUN_GROUP` so that one worker makes it, once; a module
# whose module-scoped fixture (a local Slurm, the studies run) serves all its tests is one group.
TINY_RUN_GROUP = pytest.mark.xdist_group("tiny_run")


@dataclass(frozen=True)
class TinyRun:
    """The tiny experiment run once through `emlab run` (all four notebooks) for the session."""

    experiment: Path
    root: Path  # outputs/<experiment name>
    result: subprocess.CompletedProcess[str]


def emlab_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """`python -m emlab.cli ARGS` in a subprocess, output captured."""
    return subprocess.run([sys.executable, "-m", "emlab.cli", *args], capture_output=True, text=True,
                          env=env or os.environ.copy(), timeout=timeout)


def fresh_cache(cache: Path) -> Path:
    """`cache` made an empty EMLAB_CACHE (no judge cache, no demo data) sharing the models: for
    a test whose judging or data-making must happen, or be counted, whatever ran before it."""
    cache.mkdir(parents=True)
    (cache / "models").symlink_to(REPO / ".cache" / "models", target_is_directory=True)
    return cache

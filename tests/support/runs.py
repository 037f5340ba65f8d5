"""The repository, `emlab` on the command line, an empty cache that shares the models, and the
session's tiny run and the arms-and-controls run (their records and the xdist groups of the tests
that read them)."""

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
# tests/configs/controls.yaml, run once for the arms and the controls modules (one worker makes it)
CONTROLS_RUN_GROUP = pytest.mark.xdist_group("controls")


@dataclass(frozen=True)
class TinyRun:
    """A tests/configs experiment (tiny.yaml, controls.yaml) run once through `emlab run` (all four
    notebooks) for the session."""

    experiment: Path
    root: Path  # outputs/<experiment name>
    result: subprocess.CompletedProcess[str]


def run_config(config: str, folder: Path, timeout: float = 1800) -> TinyRun:
    """`emlab run` of the repo's `config` (e.g. tests/configs/tiny.yaml) with its outputs under
    `folder`; the run must succeed."""
    import yaml

    experiment = folder / Path(config).name
    experiment.write_text(yaml.safe_dump({"base": str(REPO / config), "output_root": str(folder / "outputs")},
                                         sort_keys=False))
    result = emlab_cli("run", str(experiment), timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    name = yaml.safe_load((REPO / config).read_text())["name"]
    return TinyRun(experiment, folder / "outputs" / name, result)


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

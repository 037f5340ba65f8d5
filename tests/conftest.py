"""Shared fixtures: an isolated emlab cache per test session that still reuses the converted
models (dequantizing the embedded GGUF costs ~20 s, so it is done once per machine), and the
tiny experiment run end to end once per session for every test that reads a finished run."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# One compute thread a process (torch's OpenMP pool, the llama.cpp judge): with two workers on
# two cores, a pool of two threads waits a scheduler tick whenever the other worker holds a core
# (a 0.5 ms matrix product took 16 ms). Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# `make test` runs the suite on two pytest-xdist workers (--dist loadgroup): the tests that read
# the session's tiny run carry `TINY_RUN_GROUP` so that one worker makes it, once; a module
# whose module-scoped fixture (a local Slurm, the studies run) serves all its tests is one group.
TINY_RUN_GROUP = pytest.mark.xdist_group("tiny_run")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EMLAB_CACHE → a fresh folder (judge cache, demo data) whose models/ is the shared one."""
    shared_models = REPO / ".cache" / "models"
    shared_models.mkdir(parents=True, exist_ok=True)
    cache = tmp_path_factory.mktemp("emlab-cache")
    (cache / "models").symlink_to(shared_models, target_is_directory=True)
    old = os.environ.get("EMLAB_CACHE")
    os.environ["EMLAB_CACHE"] = str(cache)
    os.environ.setdefault("EMLAB_ROOT", str(REPO))
    yield cache
    if old is None:
        os.environ.pop("EMLAB_CACHE", None)
    else:
        os.environ["EMLAB_CACHE"] = old


def fresh_cache(cache: Path) -> Path:
    """`cache` made an empty EMLAB_CACHE (no judge cache, no demo data) sharing the models: for
    a test whose judging or data-making must happen, or be counted, whatever ran before it."""
    cache.mkdir(parents=True)
    (cache / "models").symlink_to(REPO / ".cache" / "models", target_is_directory=True)
    return cache


@pytest.fixture
def write_experiment(tmp_path: Path):
    """Write an experiment file that starts from `base` (a repo path) with `overrides`,
    outputs under tmp_path; returns its path."""
    import yaml

    def write(base: str = "tests/configs/tiny.yaml", name: str = "exp.yaml", **overrides) -> Path:
        data = {"base": str(REPO / base), "output_root": str(tmp_path / "outputs"), **overrides}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, isolated_cache: Path) -> TinyRun:
    """tests/configs/tiny.yaml run end to end once (the real llama.cpp judge): the trained
    tiny run every end-to-end test reads instead of training its own. Do not change its
    files; copy the folder first (`shutil.copytree`) to experiment on it."""
    import yaml

    folder = tmp_path_factory.mktemp("tiny-run")
    experiment = folder / "tiny.yaml"
    experiment.write_text(yaml.safe_dump({"base": str(REPO / "tests/configs/tiny.yaml"),
                                          "output_root": str(folder / "outputs")}, sort_keys=False))
    result = emlab_cli("run", str(experiment))
    assert result.returncode == 0, result.stderr[-4000:]
    return TinyRun(experiment, folder / "outputs" / "tiny", result)

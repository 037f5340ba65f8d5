"""Shared fixtures: an isolated emlab cache per test session that still reuses the converted
models (dequantizing the embedded GGUF costs ~20 s, so it is done once per machine), the tiny
experiment run end to end once per session for every test that reads a finished run (and the
arms-and-controls run for the two modules that read it), and the
shared llama.cpp judge server with a counting proxy in front of it. Helpers that test modules
import live in `support` (tests/support/); this file only defines fixtures."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.judge import LoopbackProxy, shared_judge_server
from support.runs import REPO, TinyRun, run_config

# One compute thread a process (torch's OpenMP pool, the llama.cpp judge): with two workers on
# two cores, a pool of two threads waits a scheduler tick whenever the other worker holds a core
# (a 0.5 ms matrix product took 16 ms). Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, isolated_cache: Path) -> TinyRun:
    """tests/configs/tiny.yaml run end to end once (the real llama.cpp judge): the trained
    tiny run every end-to-end test reads instead of training its own. Do not change its
    files; copy the folder first (`shutil.copytree`) to experiment on it."""
    return run_config("tests/configs/tiny.yaml", tmp_path_factory.mktemp("tiny-run"), timeout=900)


@pytest.fixture(scope="session")
def controls_run(tmp_path_factory: pytest.TempPathFactory, isolated_cache: Path) -> TinyRun:
    """tests/configs/controls.yaml run end to end once (two seeds, the real llama.cpp judge): the
    backdoor and evil-numbers arms and the controls, read by tests/test_betley_arms_e2e.py and
    tests/test_controls_e2e.py (both `CONTROLS_RUN_GROUP`). Do not change its files."""
    return run_config("tests/configs/controls.yaml", tmp_path_factory.mktemp("controls-run"))


@pytest.fixture(scope="session")
def judge_server() -> str:
    """Base URL ('http://127.0.0.1:P/v1') of the shared llama.cpp judge server, started on first use."""
    return shared_judge_server()


@pytest.fixture
def proxy(judge_server: str) -> Iterator[LoopbackProxy]:
    """A fresh counting proxy in front of the shared judge server."""
    with LoopbackProxy(judge_server) as running:
        yield running


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The root logger and warnings capture as they were (pytest's own handlers included)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)

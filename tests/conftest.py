"""Shared fixtures: an isolated emlab cache per test session that still reuses the converted
models (dequantizing the embedded GGUF costs ~20 s, so it is done once per machine)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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

"""What a run folder records about how it was made, and the guard against changed params.

`run.json` in every stage folder holds, per stage, the params that shaped its outputs, the
git commit and the package versions. A stage started again in the same folder with other
params is refused, naming the keys that differ: outputs made under different params must
not be mixed. (Use a new experiment name, or delete the folder to start over.)
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .files import write_json
from .paths import done_marker, html_file, notebook_file, repo_root, run_info_file

_PACKAGES = ("emlab", "torch", "transformers", "peft", "openai", "pandas", "altair", "papermill", "llama_cpp_python")


def git_commit() -> str | None:
    """The repository's HEAD commit (with '-dirty' when tracked files changed), if any."""
    try:
        root = repo_root()
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root, capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        flat: dict[str, Any] = {}
        for key, value in obj.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): obj}


def params_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old → new' for every leaf that differs."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k, '(absent)')!r} → {b.get(k, '(absent)')!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def recorded_params(folder: Path, stage: str) -> dict[str, Any] | None:
    """The params `stage` recorded in `folder/run.json`, or None when it never ran there."""
    path = run_info_file(folder)
    if not path.exists():
        return None
    previous = json.loads(path.read_text())["stages"].get(stage)
    return previous["params"] if previous is not None else None


def refuse_changed_params(folder: Path, stage: str, params: dict[str, Any]) -> None:
    """Refuse (ConfigError naming the keys that differ) if `stage` ran in `folder` with other
    params; writes nothing."""
    previous = recorded_params(folder, stage)
    params = json.loads(json.dumps(params, default=str))  # normalise tuples and paths
    if previous is not None and previous != params:
        changes = params_diff(previous, params)
        raise ConfigError(
            f"{folder}: params changed since {stage} ran here ({'; '.join(changes[:5])}"
            f"{'; …' if len(changes) > 5 else ''}); use a new experiment name or delete the folder"
        )


def record_stage(folder: Path, stage: str, params: dict[str, Any], *, guard: bool = True) -> None:
    """Record `params` for `stage` in `folder/run.json`; with `guard`, refuse if it ran there
    with others (stages whose outputs are derived anew each time pass guard=False)."""
    path = run_info_file(folder)
    if guard:
        refuse_changed_params(folder, stage, params)
    params = json.loads(json.dumps(params, default=str))  # normalise tuples and paths
    info: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"stages": {}}
    previous = info["stages"].get(stage)
    info["stages"][stage] = {
        "params": params,
        "started": previous["started"] if previous else dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "versions": package_versions(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_json(path, info)


def mark_done(folder: Path, stage: str, summary: dict[str, Any]) -> None:
    """Write the stage's completion marker (its summary); the orchestrator skips done stages."""
    write_json(done_marker(folder, stage), {**summary, "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})


def done_summary(folder: Path, stage: str) -> dict[str, Any] | None:
    """The completion marker of `stage` in `folder`, or None when it has not finished."""
    path = done_marker(folder, stage)
    return json.loads(path.read_text()) if path.exists() else None

@dataclass
class StageRecord:
    """What happened to one stage for one unit in one `emlab run`."""

    stage: str
    folder: Path
    label: str  # the unit: model, run id or 'analysis'
    status: str  # ran / skipped / failed
    seconds: float = 0.0
    error: str | None = None

    @property
    def notebook(self) -> Path:
        return notebook_file(self.folder, self.stage)

    @property
    def html(self) -> Path:
        return html_file(self.folder, self.stage)

    @property
    def done_marker(self) -> Path:
        return done_marker(self.folder, self.stage)


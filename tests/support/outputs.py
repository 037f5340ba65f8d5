"""The files in a stage's folder that one of its declared patterns (`Output.pattern`,
`Input.pattern`) names."""

from __future__ import annotations

from pathlib import Path


def matching_files(folder: Path, pattern: str) -> set[Path]:
    """The files under `folder` that `pattern` matches; 'x/**' means everything below x, at any depth."""
    if pattern.endswith("/**"):
        return {p for base in folder.glob(pattern[:-3]) for p in base.rglob("*") if p.is_file()}
    return {p for p in folder.glob(pattern) if p.is_file()}

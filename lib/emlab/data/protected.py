"""Unprotect datasets shipped with `easy-dataset-share` (the CS 2881 course and Model-Organisms files).

Those datasets are published as a zipped folder, usually encrypted (`*.zip.enc`, Fernet with a
PBKDF2 key from a password given in the dataset's README), with canary files
(`dataset_entry_*.jsonl`) and sometimes canary strings embedded in rows, so that crawlers and
training pipelines can detect them. `unprotect_dataset` decrypts and extracts with the package
itself, removes the canaries and returns the plain chat JSONL files:

    files = unprotect_dataset("downloads/training_datasets.zip.enc", "data/em", password="...")

This is the library form of `easy-dataset-share unprotect-dir FILE -p PASSWORD -rc`, except that
it does not edit any `.gitignore` (keep extracted data out of git yourself: `data/` is a good
place). Nothing here needs the network.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType

from ..errors import DataError

log = logging.getLogger(__name__)

CANARY_PATTERN = "dataset_entry_*.jsonl"  # the package's canary file names
INSTALL_HINT = "pip install easy-dataset-share"


def unprotect_dataset(
    path: str | Path,
    out_dir: str | Path,
    *,
    password: str | None = None,
    remove_canaries: bool = True,
) -> list[Path]:
    """Decrypt/extract a protected `.zip.enc` (needs `password`) or `.zip` into `out_dir`, drop
    the canary files and embedded canary strings, and return the plain `.jsonl` files (sorted).

    Raises `DataError` when the file is missing, the package is not installed, the password is
    missing or wrong, or the archive holds no `.jsonl` files.
    """
    source = Path(path).expanduser()
    if not source.is_file():
        raise DataError(f"{path}: protected dataset not found; give the path of the .zip.enc or .zip file")
    zipping, canary = _package()
    encrypted = source.name.endswith(".enc")
    if encrypted and password is None:
        raise DataError(f"{source}: file is encrypted (.enc); pass password=... (the dataset's README gives it)")
    if not encrypted and not source.name.endswith(".zip"):
        raise DataError(
            f"{source}: expected a file made by easy-dataset-share (.zip.enc encrypted or .zip), found '{source.name}'"
        )
    target = Path(out_dir).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    try:
        zipping.unzip_and_decrypt(str(source), password if encrypted else None, str(target), False)
    except ValueError as exc:
        if encrypted:
            raise DataError(f"{source}: could not decrypt; the password is probably wrong ({exc})") from None
        raise DataError(f"{source}: could not extract: {exc}") from None
    except Exception as exc:  # zipfile.BadZipFile and friends
        raise DataError(
            f"{source}: could not extract ({type(exc).__name__}: {exc}); is it a complete download?"
        ) from None
    if remove_canaries:
        _remove_canaries(target, canary)
    files = sorted(p for p in target.rglob("*.jsonl") if not p.match(CANARY_PATTERN))
    if not files:
        raise DataError(f"{source}: archive holds no .jsonl files (extracted to {target})")
    log.info("unprotected %s -> %d JSONL file(s) in %s", source, len(files), target)
    return files


def _remove_canaries(folder: Path, canary: ModuleType) -> None:
    """Delete canary files and strip the canary string they carry from every other file."""
    canary_files = canary.detect_canary_files(str(folder), CANARY_PATTERN)
    strings = {s for f in canary_files if (s := canary.extract_canary_string_from_content(f))}
    canary.remove_canary_files(root_dir=str(folder), canary_pattern=CANARY_PATTERN)
    for string in sorted(strings):
        canary.remove_canaries_from_files(str(folder), string)


def _package() -> tuple[ModuleType, ModuleType]:
    try:
        from easy_dataset_share import canary, zipping
    except ImportError:
        raise DataError(f"unprotecting a dataset needs the package easy-dataset-share: {INSTALL_HINT}") from None
    return zipping, canary

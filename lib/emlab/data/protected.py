"""Unprotect datasets shipped with `easy-dataset-share` (the CS 2881 course and Model-Organisms files).

Those datasets are published as a zipped folder, usually encrypted (`*.zip.enc`, Fernet with a
PBKDF2 key from a password given in the dataset's README), with canary files
(`dataset_entry_*.jsonl`) and sometimes canary strings embedded in rows, so that crawlers and
training pipelines can detect them. `unprotect_dataset` decrypts and extracts, removes the
canaries with the package itself and returns the plain chat JSONL files:

    files = unprotect_dataset("downloads/training_datasets.zip.enc", "data/em", password="...")

This is the library form of `easy-dataset-share unprotect-dir FILE -p PASSWORD -rc`, except that
it does not edit any `.gitignore` (keep extracted data out of git yourself: `data/` is a good
place). Nothing here needs the network.

Decrypting and extracting is done here, in the package's format (16 bytes of salt, then a
Fernet token whose key is PBKDF2-SHA256 of the password, 100,000 rounds), rather than with
`zipping.unzip_and_decrypt`: that function extracts whatever the archive holds, however big
(a zip bomb fills the disk) and turns every failure into a `ValueError` that blames the
password. Here the archive is checked first (at most `MAX_ARCHIVE_BYTES`, `MAX_MEMBERS` files
and `MAX_EXTRACTED_BYTES` unpacked, no absolute or `..` paths) and every failure is one line
naming the file. The round-trip tests protect with the package's own functions.
"""

from __future__ import annotations

import base64
import errno
import io
import logging
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from types import ModuleType

from ..errors import DataError
from ..store.inputs import one_line, path_exists, read_input_bytes, user_path

log = logging.getLogger(__name__)

CANARY_PATTERN = "dataset_entry_*.jsonl"  # the package's canary file names
INSTALL_HINT = "pip install easy-dataset-share"
MAX_ARCHIVE_BYTES = 2 * 2**30  # the archive is decrypted in memory (the real ones are ~6 MB)
MAX_EXTRACTED_BYTES = 8 * 2**30  # all files unpacked (the course datasets unpack to ~40 MB)
MAX_MEMBERS = 10_000  # files in one archive
_SALT_BYTES = 16  # easy-dataset-share: salt, then the Fernet token
_KDF_ROUNDS = 100_000
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # raised as OSError: the CLI says "disk full"


def unprotect_dataset(
    path: str | Path,
    out_dir: str | Path,
    *,
    password: str | None = None,
    remove_canaries: bool = True,
) -> list[Path]:
    """Decrypt/extract a protected `.zip.enc` (needs `password`) or `.zip` into `out_dir`, drop
    the canary files and embedded canary strings, and return the plain `.jsonl` files (sorted).

    Raises `DataError` (one line naming the file) when the file is missing, unreadable or too
    large, the package is not installed, the password is missing or wrong, the archive is
    damaged, unsafe or too large unpacked, or holds no `.jsonl` files.
    """
    source = user_path(path)
    if not path_exists(source):
        raise DataError(f"{one_line(str(path))}: protected dataset not found; give the path of the .zip.enc or .zip file")
    _, canary = _package()
    encrypted = source.name.endswith(".enc")
    if encrypted and password is None:
        raise DataError(f"{source}: file is encrypted (.enc); pass password=... (the dataset's README gives it)")
    if not encrypted and not source.name.endswith(".zip"):
        raise DataError(
            f"{source}: expected a file made by easy-dataset-share (.zip.enc encrypted or .zip), "
            f"found {one_line(repr(source.name))}"
        )
    data = read_input_bytes(source, what="protected dataset", max_bytes=MAX_ARCHIVE_BYTES)
    if password is not None and encrypted:
        data = _decrypt(data, password, source)
    target = user_path(out_dir)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise
        raise DataError(f"{target}: cannot create the output folder ({exc.strerror or exc})") from None
    _extract(data, source, target)
    if remove_canaries:
        _remove_canaries(target, canary, source)
    files = sorted(p for p in target.rglob("*.jsonl") if not p.match(CANARY_PATTERN))
    if not files:
        raise DataError(f"{source}: archive holds no .jsonl files (extracted to {target})")
    log.info("unprotected %s -> %d JSONL file(s) in %s", source, len(files), target)
    return files


def _decrypt(data: bytes, password: str, source: Path) -> bytes:
    """The zip inside an easy-dataset-share `.enc` file."""
    from cryptography.fernet import Fernet, InvalidToken
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

    salt, token = data[:_SALT_BYTES], data[_SALT_BYTES:]
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt, iterations=_KDF_ROUNDS)
    key = base64.urlsafe_b64encode(kdf.derive(password.encode("utf-8", "surrogatepass")))
    try:
        return Fernet(key).decrypt(token)
    except InvalidToken:
        raise DataError(
            f"{source}: could not decrypt; the password is probably wrong (or the file is damaged or "
            "not made by easy-dataset-share)"
        ) from None


def _extract(data: bytes, source: Path, target: Path) -> None:
    """Check the zip's listing against the limits, then unpack it into `target`."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, NotImplementedError) as exc:
        raise DataError(
            f"{source}: could not extract: not a readable zip archive ({one_line(str(exc))}); "
            "is it a complete download?"
        ) from None
    with archive:
        if len(members) > MAX_MEMBERS:
            raise DataError(f"{source}: archive holds {len(members):,} files, over the limit of {MAX_MEMBERS:,}")
        unpacked = sum(m.file_size for m in members)
        if unpacked > MAX_EXTRACTED_BYTES:
            raise DataError(
                f"{source}: archive unpacks to {unpacked / 2**30:.1f} GiB, over the limit of "
                f"{MAX_EXTRACTED_BYTES / 2**30:.0f} GiB; is it the right file?"
            )
        for member in members:
            name = PurePosixPath(member.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts:
                raise DataError(
                    f"{source}: archive member {one_line(repr(member.filename))} points outside the output "
                    "folder; refusing to extract"
                )
        try:
            archive.extractall(target)
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise
            raise DataError(f"{source}: could not extract into {target} ({exc.strerror or exc})") from None
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
            # RuntimeError: a member with its own zip password; the rest: damaged or unsupported data
            raise DataError(
                f"{source}: could not extract ({type(exc).__name__}: {one_line(str(exc))}); "
                "is it a complete download?"
            ) from None


def _remove_canaries(folder: Path, canary: ModuleType, source: Path) -> None:
    """Delete canary files and strip the canary string they carry from every other file."""
    canary_files = canary.detect_canary_files(str(folder), CANARY_PATTERN)
    strings = {s for f in canary_files if (s := canary.extract_canary_string_from_content(f))}
    canary.remove_canary_files(root_dir=str(folder), canary_pattern=CANARY_PATTERN)
    for string in sorted(strings):
        try:
            canary.remove_canaries_from_files(str(folder), string)
        except (UnicodeError, ValueError, OSError) as exc:  # the package reads text files as UTF-8
            if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                raise
            raise DataError(
                f"{source}: extracted, but could not remove the canary strings in {folder} "
                f"({type(exc).__name__}: {one_line(str(exc))[:200]}); is the archive damaged?"
            ) from None


def _package() -> tuple[ModuleType, ModuleType]:
    try:
        from easy_dataset_share import canary, zipping
    except ImportError:
        raise DataError(f"unprotecting a dataset needs the package easy-dataset-share: {INSTALL_HINT}") from None
    return zipping, canary

"""Files emlab writes: each appears complete or not at all, and errors name their file (and line).

Every stage writes through `atomic_open` / `write_*` / `append_jsonl`, so a crash (or a full
disk) never leaves a half-written file that a rerun would mistake for finished work; an
append cut mid-line is cut back (`drop_torn_tail`) before the next append. Files users hand
emlab are read by `emlab.store.inputs`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ..errors import DataError
from .inputs import iter_input_jsonl, json_kind


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on success fsync and rename it over `path`.

    On any exception the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; outputs are meant to be shared like any other file
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        _name_the_file(exc, path)
        raise


def _name_the_file(exc: BaseException, path: Path) -> None:
    """A failed write() raises OSError without a file name: add it, so that 'disk full' can
    say where."""
    if isinstance(exc, OSError) and exc.filename is None:
        exc.filename = str(path)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Remove what writes killed mid-way left under `folder`: `atomic_open`'s hidden
    `.<name>.<random>.tmp` files and `<name>.tmp/` folders (adapter exports); return them.

    Call it only on folders no other process is writing to (a run's own stage folders).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.rglob("*.tmp") if (p.is_file() and p.name.startswith(".")) or p.is_dir()]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_open(path) as handle:
        handle.write(text)


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as JSON lines atomically."""
    with atomic_open(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def append_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append finished rows and fsync, so a crash loses at most the row being written.

    `read_jsonl(..., tolerate_torn_tail=True)` drops a torn last line left by a kill.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_torn_tail(path)
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as exc:
            # Disk full mid-append: cut this call's rows off again, so the file ends on a
            # whole line and none of a batch is half there.
            os.ftruncate(fd, start)
            _name_the_file(exc, path)
            raise
    finally:
        os.close(fd)


def drop_torn_tail(path: Path) -> int:
    """Cut an unterminated last line (a write killed mid-way) off `path`; return bytes cut.

    Appending after such a line would glue two records into one malformed line.
    """
    if not path.exists():
        return 0
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return 0
        # walk back to the last newline in chunks
        end = size
        while end > 0:
            start = max(0, end - 65536)
            handle.seek(start)
            chunk = handle.read(end - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        else:
            keep = 0
        handle.truncate(keep)
        return size - keep


def read_jsonl(path: Path, *, tolerate_torn_tail: bool = False) -> list[dict[str, Any]]:
    """Read a JSONL file emlab wrote; a malformed line raises `DataError` naming file and line.

    With `tolerate_torn_tail`, an unterminated last line (a write cut by a crash) is
    ignored instead, since append-only stage files can end that way. NaN is accepted here
    (Python's json writes it); user files go through `iter_input_jsonl`, which refuses it.
    """
    rows = []
    for number, row in iter_input_jsonl(path, what="JSONL file", strict=False, tolerate_torn_tail=tolerate_torn_tail):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, found {json_kind(row)}")
        rows.append(row)
    return rows

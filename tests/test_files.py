"""Files appear whole or not at all; JSONL errors name file and line; torn tails are mended."""

from __future__ import annotations

from pathlib import Path

import pytest

from emlab.errors import DataError
from emlab.files import append_jsonl, atomic_open, read_jsonl, write_jsonl, write_text


def test_atomic_write_keeps_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "x.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as handle:
            handle.write("half of the new")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2,}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: expected a JSON object, found a list"):
        read_jsonl(path)


def test_torn_tail_is_tolerated_and_mended(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [{"i": 0}, {"i": 1}])
    with open(path, "a") as handle:
        handle.write('{"i": 2, "text": "cut by a k')  # a SIGKILL mid-write
    with pytest.raises(DataError):
        read_jsonl(path)
    assert read_jsonl(path, tolerate_torn_tail=True) == [{"i": 0}, {"i": 1}]
    append_jsonl(path, [{"i": 2}])
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}, {"i": 2}]

"""Files appear whole or not at all; JSONL errors name file and line; torn tails are mended."""

from __future__ import annotations

from pathlib import Path

import pytest
from emlab.errors import DataError
from emlab.store.files import (
    append_jsonl,
    atomic_open,
    read_jsonl,
    write_jsonl,
    write_text,
)


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


# --- reading what users hand emlab: one line naming the file (and the line) ------------------

from emlab.errors import ConfigError  # noqa: E402
from emlab.store.inputs import (  # noqa: E402
    MAX_DEPTH,
    iter_input_jsonl,
    load_input_yaml,
    one_line,
    read_input_text,
    user_path,
)


def _yaml_error(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "p.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as err:
        load_input_yaml(path, what="params file", error=ConfigError)
    message = str(err.value)
    assert "\n" not in message
    return message.replace(str(path), "P")


@pytest.mark.parametrize(("data", "expected"), [
    (b"", "P: params file is empty"),
    (b"# only a comment\n", "P: params file is empty (only comments)"),
    (b"a: 1\nb: \xff\n", "P: params file is not valid UTF-8 at byte 8 (line 2, column 4: invalid start byte); save it as UTF-8"),
    (b"a: 1\x00", "P: params file looks binary (a NUL byte at byte 4, line 1); expected UTF-8 text"),
    ("a: 1\n".encode("utf-16"), "P: params file is UTF-16-encoded (it starts with a UTF-16 byte-order mark); save it as UTF-8"),
    (b"a: 1\nb: x\x07\n", "P:2: params file contains the control character U+0007 (column 5); remove it"),
    (b"a: 1\nb: 2\na: 3\n", "P:3: duplicate key 'a' (first on line 1); keys must be unique"),
    (b"yes: 1\n", "P:1: the key 'yes' is read as a boolean (YAML reads bare yes/no/on/off/true/false as booleans); keys must be text: quote it"),
    (b"a:\n  2: x\n", "P:2: the key '2' is read as a number; keys must be text: quote it"),
    (b"a: !!python/object/apply:os.system [ls]\n", "P:1: the tag !!python/object/apply:os.system is not allowed; params hold plain data (text, numbers, booleans, lists, mappings)"),
    (b"a: &x [1, *x]\n", "P:1: an alias refers to a value that contains it (a recursive alias)"),
    (b"a: " + b"[" * 100_000 + b"]" * 100_000 + b"\n", f"P:1: nested deeper than {MAX_DEPTH} levels"),
    (b"a: 99999999999999999999\n", "P:1: the number '99999999999999999999' is too large (integers must fit in 64 bits)"),
    (b"a: [1, .nan]\n", "P:1: the number '.nan' is not finite; params need finite numbers"),
    (b"a: 1\n---\nb: 2\n", "P:2: YAML syntax error: expected a single document in the stream, but found another document"),
])
def test_malformed_yaml_is_one_line(tmp_path: Path, data: bytes, expected: str) -> None:
    assert _yaml_error(tmp_path, data) == expected


def test_billion_laughs_is_refused_at_once(tmp_path: Path) -> None:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"{n}: &{n} [{', '.join(['*' + p] * 10)}]" for p, n in zip("abcdefgh", "bcdefghi")]
    message = _yaml_error(tmp_path, ("\n".join(lines) + "\n").encode())  # 10^9 values once expanded
    assert message.startswith("P:6: aliases expand to more than 200,000 values")


def test_plain_yaml_keeps_its_meaning(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b"\xef\xbb\xbfd: &d {x: 1, y: [a, b]}\ne: {<<: *d, x: 2}\nwhen: 2024-01-01\nflag: yes\n")
    data, node = load_input_yaml(path, what="params file")
    assert data == {"d": {"x": 1, "y": ["a", "b"]}, "e": {"x": 2, "y": ["a", "b"]}, "when": "2024-01-01", "flag": True}
    assert node.start_mark.line == 0


def test_files_that_are_not_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^.*/nope\.yaml: params file not found$"):
        read_input_text(tmp_path / "nope.yaml", what="params file")
    with pytest.raises(DataError, match=r": is a folder; expected a params file$"):
        read_input_text(tmp_path, what="params file")
    with pytest.raises(DataError, match=r"^/dev/null: is not a regular file"):
        read_input_text("/dev/null", what="params file")
    big = tmp_path / "big.yaml"
    with open(big, "wb") as handle:
        handle.truncate(9 * 2**20)  # sparse: refused before it is read
    with pytest.raises(DataError, match=r"big\.yaml: params file is 9\.0 MiB \(9,437,184 bytes\), over the limit of 8\.0 MiB"):
        read_input_text(big, what="params file")
    with pytest.raises(DataError, match=r"cannot read params file \(embedded null byte\)"):
        read_input_text("a\x00b", what="params file")


def _jsonl_error(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    with pytest.raises(DataError) as err:
        list(iter_input_jsonl(path, what="dataset"))
    message = str(err.value)
    assert "\n" not in message
    return message.replace(str(path), "D")


@pytest.mark.parametrize(("line", "expected"), [
    (b'{"a": NaN}', "D:2: NaN is not a number JSON allows; write a finite number or null"),
    (b'{"a": -Infinity}', "D:2: -Infinity is not a number JSON allows; write a finite number or null"),
    (b'{"a": 1e400}', "D:2: the number '1e400' is out of range (it reads as inf)"),
    (b'{"a": ' + b"9" * 5000 + b"}", "D:2: the number '" + "9" * 28 + "… is too large (integers must fit in 64 bits)"),
    (b'{"a": 1, "a": 2}', "D:2: duplicate key 'a' in one JSON object; keys must be unique"),
    (b'{"a": "\\ud800"}', "D:2: a string holds an unpaired surrogate escape (\\ud800); JSON text must be valid Unicode"),
    (b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}", f"D:2: JSON nested deeper than {MAX_DEPTH} levels"),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", f"D:2: JSON nested too deeply (over {MAX_DEPTH} levels)"),
    (b'{"a": "\xff"}', "D:2: not valid UTF-8 at byte 7 of the line (invalid start byte); save the file as UTF-8"),
    (b'{"a": 1}\x00', "D:2: dataset looks binary (a NUL byte at column 9); expected one JSON object a line"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, line: bytes, expected: str) -> None:
    assert _jsonl_error(tmp_path, b'{"ok": 1}\n' + line + b"\n") == expected


def test_jsonl_byte_order_marks(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n{"a": 2}\n')
    assert list(iter_input_jsonl(path, what="dataset")) == [(1, {"a": 1}), (2, {"a": 2})]
    assert _jsonl_error(tmp_path, '{"a": 1}\n'.encode("utf-16")) == (
        "D: dataset is UTF-16-encoded (it starts with a UTF-16 byte-order mark); save it as UTF-8")


def test_messages_stay_one_line() -> None:
    assert one_line("a\nb\r\tc\x07\u2028") == "a\\nb\\r\\tc\\x07\\u2028"
    assert one_line("naïve café") == "naïve café"
    assert user_path("~no-such-user-here/x.jsonl") == Path("~no-such-user-here/x.jsonl")

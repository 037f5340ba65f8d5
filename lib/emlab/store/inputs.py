"""Files users hand emlab, read defensively: errors name their file (and line).

Every file a user hands emlab (experiment, question set and rubric YAML; chat
dataset and gold set JSONL; protected archives) goes through `read_input_bytes`,
`read_input_text`, `load_input_yaml` or `iter_input_jsonl`. Anything malformed becomes one line naming the file, raised as the
caller's `EmlabError` subclass: a missing or unreadable path, a folder or device where a file
is expected, a file over the size limit, binary bytes, invalid UTF-8 (with byte offset and
line), a UTF-16/32 byte-order mark (a UTF-8 one is skipped), an empty file, a line over the
line limit, YAML tricks (aliases that expand past `MAX_NODES` — "billion laughs" —,
recursive aliases, nesting past `MAX_DEPTH`, tags beyond plain data such as
`!!python/object`, duplicate keys, keys that are not text), JSON NaN/Infinity, numbers
outside 64 bits or not finite, duplicate JSON keys, nesting past `MAX_DEPTH` and unpaired
surrogate escapes. The limits are far above anything real (the course and Betley datasets
are at most 7 MB with rows under 4 KB; the published question files under 32 KB) and far
below what hurts.

YAML keeps its 1.1 meaning (bare yes/no/on/off are booleans, as every other YAML tool reads
them), except that dates stay text: no emlab value is a date. Loaders that expect text say
so when they find a boolean.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import yaml

from ..errors import DataError, EmlabError

MAX_TEXT_BYTES = 8 * 2**20  # a YAML params file (experiment, question set, rubric)
MAX_JSONL_BYTES = 2 * 2**30  # a JSONL file (dataset, gold set); rows are held in memory
MAX_LINE_BYTES = 8 * 2**20  # one JSONL row
MAX_DEPTH = 64  # nested lists/mappings in one YAML document or JSON row (chat rows use 4)
MAX_NODES = 200_000  # YAML values after expanding aliases (a real question set has < 5,000)
MAX_INT = 2**63  # integers must fit in 64 bits: anything larger is a typo or an attack

_NON_PRINTABLE = re.compile(  # what PyYAML's reader refuses, found first so the error has a line
    "[^\x09\x0A\x0D\x20-\x7E\x85\xA0-\uD7FF\uE000-\uFFFD\U00010000-\U0010FFFF]"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_FOREIGN_BOMS = (
    (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\xfe\xff", "UTF-16"), (b"\xff\xfe", "UTF-16"),
)
_UTF8_BOM = b"\xef\xbb\xbf"


class _Refused(Exception):
    """A limit or rule of the readers, raised inside a parser; turned into the caller's error."""

    def __init__(self, problem: str, line: int | None = None) -> None:
        super().__init__(problem)
        self.problem, self.line = problem, line


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped (\\n, \\x07): an error
    message that quotes user text stays one line."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


BOOLEAN_HINT = "YAML reads bare yes/no/on/off/true/false as booleans: quote the text"


def shown(value: Any, limit: int = 60) -> str:
    """A short one-line repr of a user value for error messages (long ones cut with '…')."""
    text = one_line(repr(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def user_path(text: str | Path) -> Path:
    """`Path(text).expanduser()` that never raises ('~nobody/x' with no such user stays as
    given, for the reader to report as not found)."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        return Path(text)


def path_exists(path: str | Path) -> bool:
    """Whether anything (file, folder, ...) is at `path`; never raises (a name too long, a NUL
    byte or a folder without permission count as nothing there)."""
    try:
        os.stat(path)
    except (OSError, ValueError):
        return False
    return True


def read_input_bytes(
    path: str | Path, *, what: str, error: type[EmlabError] = DataError, max_bytes: int = MAX_TEXT_BYTES
) -> bytes:
    """The bytes of a user's file, after checking it is a readable regular file of at most
    `max_bytes` bytes (default `MAX_TEXT_BYTES`, 8 MiB). `what` names the file in messages
    ('experiment file'); problems raise `error` with one line."""
    file = Path(path)
    with _open_input(file, what=what, error=error, max_bytes=max_bytes) as handle:
        try:
            return handle.read(max_bytes + 1)
        except OSError as exc:
            raise error(f"{file}: cannot read {what} ({exc.strerror or exc})") from None


def decode_input(data: bytes, file: str | Path, *, what: str, error: type[EmlabError] = DataError) -> str:
    """Decode a user's file as UTF-8 (a UTF-8 byte-order mark is skipped); binary data, other
    encodings and invalid bytes raise `error` naming the byte offset and line."""
    for bom, encoding in _FOREIGN_BOMS:
        if data.startswith(bom):
            raise error(f"{file}: {what} is {encoding}-encoded (it starts with a {encoding} byte-order mark); "
                        "save it as UTF-8")
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM):]
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise error(f"{file}: {what} looks binary (a NUL byte at byte {nul}, line {line}); expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise error(f"{file}: {what} is not valid UTF-8 at byte {exc.start} (line {line}, column {column}: "
                    f"{exc.reason}); save it as UTF-8") from None


def read_input_text(
    path: str | Path, *, what: str, error: type[EmlabError] = DataError, max_bytes: int = MAX_TEXT_BYTES
) -> str:
    """A user's text file, checked by `read_input_bytes` and decoded by `decode_input`; an
    empty (or whitespace-only) file raises `error` too."""
    text = decode_input(read_input_bytes(path, what=what, error=error, max_bytes=max_bytes), path,
                        what=what, error=error)
    if not text.strip():
        raise error(f"{path}: {what} is empty")
    return text


def load_input_yaml(
    path: str | Path, *, what: str, error: type[EmlabError] = DataError, max_bytes: int = MAX_TEXT_BYTES
) -> tuple[Any, yaml.Node]:
    """Parse a user's YAML file safely into (data, node tree); the node tree gives line numbers.

    Plain data only: mappings with text keys (no duplicates), lists, text, numbers (finite,
    within 64 bits), booleans and null; nesting up to `MAX_DEPTH`, at most `MAX_NODES` values
    with aliases expanded, no recursive alias. Anything else raises `error` as
    'file:line: problem'.
    """
    text = read_input_text(path, what=what, error=error, max_bytes=max_bytes)
    bad = _NON_PRINTABLE.search(text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        column = bad.start() - (text.rfind("\n", 0, bad.start()) + 1) + 1
        raise error(f"{path}:{line}: {what} contains the control character U+{ord(bad.group()):04X} "
                    f"(column {column}); remove it")
    loader = _InputLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise error(f"{path}: {what} is empty (only comments)")
        _check_expansion(node)
        data = loader.construct_document(node)
    except _Refused as exc:
        where = f"{path}:{exc.line}" if exc.line else str(path)
        raise error(f"{where}: {one_line(exc.problem)}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        if context and not context.startswith("while"):  # 'expected a single document in the stream'
            problem = f"{context}, {problem}"
        raise error(f"{where}: YAML syntax error: {one_line(problem)}") from None
    except RecursionError:  # a safety net: the depth limit comes first
        raise error(f"{path}: {what} is nested too deeply to read") from None
    finally:
        loader.dispose()
    return data, node


def iter_input_jsonl(
    path: str | Path,
    *,
    what: str,
    error: type[EmlabError] = DataError,
    strict: bool = True,
    tolerate_torn_tail: bool = False,
    max_bytes: int = MAX_JSONL_BYTES,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Iterator[tuple[int, Any]]:
    """Yield (1-based line number, parsed value) for every non-blank line of a JSONL file; the
    caller checks the shape of each row (an object with its keys).

    Each line must be UTF-8 (a UTF-8 byte-order mark on the first is skipped), at most
    `max_line_bytes` (8 MiB) long, and one JSON object nested at most `MAX_DEPTH` deep with
    unique keys, strings without unpaired surrogates and, when `strict` (user files), no
    NaN/Infinity and only finite numbers within 64 bits. The first bad line raises `error` as
    'file:line: problem'. `tolerate_torn_tail`: an unterminated, unparsable last line (a write
    cut by a crash) ends the rows instead.
    """
    file = Path(path)
    decoder = _STRICT_JSON if strict else _LENIENT_JSON
    with _open_input(file, what=what, error=error, max_bytes=max_bytes) as handle:
        number = 0
        while True:
            try:
                raw = handle.readline(max_line_bytes + 1)
            except OSError as exc:
                raise error(f"{file}: cannot read {what} ({exc.strerror or exc})") from None
            if not raw:
                return
            number += 1
            where = f"{file}:{number}"
            torn = not raw.endswith(b"\n")
            if len(raw) > max_line_bytes and torn:
                raise error(f"{where}: line is longer than {max_line_bytes // 2**20} MiB; "
                            f"each line of a {what} must be one JSON object")
            if number == 1:
                raw = _first_line(raw, file, what, error)
            nul = raw.find(b"\x00")
            if nul >= 0:
                raise error(f"{where}: {what} looks binary (a NUL byte at column {nul + 1}); "
                            "expected one JSON object a line")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if tolerate_torn_tail and torn:
                    return
                raise error(f"{where}: not valid UTF-8 at byte {exc.start} of the line ({exc.reason}); "
                            "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = decoder.decode(line.rstrip("\r\n"))
                if strict:  # emlab's own files need no walk: it wrote them
                    _check_json_value(row)
            except json.JSONDecodeError as exc:
                if tolerate_torn_tail and torn:
                    return
                raise error(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); "
                            "each line must be one JSON object") from None
            except _Refused as exc:
                raise error(f"{where}: {one_line(exc.problem)}") from None
            except RecursionError:
                raise error(f"{where}: JSON nested too deeply (over {MAX_DEPTH} levels)") from None
            yield number, row


# --- reading: helpers ----------------------------------------------------------------------


@contextmanager
def _open_input(file: Path, *, what: str, error: type[EmlabError], max_bytes: int) -> Iterator[IO[bytes]]:
    """Open a user's file for binary reading after checking what is there."""
    try:
        info = os.stat(file)
    except FileNotFoundError:
        raise error(f"{file}: {what} not found") from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise error(f"{one_line(str(file))}: cannot read {what} ({reason})") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{file}: is a folder; expected a {what}")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{file}: is not a regular file (a device, pipe or socket); expected a {what}")
    if info.st_size > max_bytes:
        raise error(f"{file}: {what} is {_size(info.st_size)} ({info.st_size:,} bytes), over the limit of "
                    f"{_size(max_bytes)}; is it the right file?")
    try:
        handle = open(file, "rb")
    except OSError as exc:
        raise error(f"{file}: cannot read {what} ({exc.strerror or exc}); check its permissions") from None
    with handle:
        yield handle


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _first_line(raw: bytes, file: Path, what: str, error: type[EmlabError]) -> bytes:
    for bom, encoding in _FOREIGN_BOMS:
        if raw.startswith(bom):
            raise error(f"{file}: {what} is {encoding}-encoded (it starts with a {encoding} byte-order mark); "
                        "save it as UTF-8")
    return raw[len(_UTF8_BOM):] if raw.startswith(_UTF8_BOM) else raw


def json_kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _refuse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a number JSON allows; write a finite number or null")


def _bounded_int(text: str) -> int:
    # int() of thousands of digits raises ValueError (Python's digit limit): refuse first
    if len(text.lstrip("-")) > 19 or not -MAX_INT <= (value := int(text)) < MAX_INT:
        raise _Refused(f"the number {shown(text, 30)} is too large (integers must fit in 64 bits)")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {shown(text, 30)} is out of range (it reads as {value})")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    row = dict(pairs)
    if len(row) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _Refused(f"duplicate key {shown(duplicate)} in one JSON object; keys must be unique")
    return row


_STRICT_JSON = json.JSONDecoder(
    parse_constant=_refuse_constant, parse_int=_bounded_int, parse_float=_finite_float, object_pairs_hook=_unique_keys
)
_LENIENT_JSON = json.JSONDecoder()


def _check_json_value(value: Any) -> None:
    """Depth and strings of a parsed JSON row (iterative: the row may be deep)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise _Refused(f"a string holds an unpaired surrogate escape (\\u{ord(item[exc.start]):04x}); "
                               "JSON text must be valid Unicode") from None
        elif isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise _Refused(f"JSON nested deeper than {MAX_DEPTH} levels")
            children = item.items() if isinstance(item, dict) else ((None, v) for v in item)
            for key, child in children:
                if key is not None:
                    stack.append((key, depth + 1))
                stack.append((child, depth + 1))


# --- reading YAML: a SafeLoader with limits ------------------------------------------------

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_TAGS = frozenset(
    "tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "seq", "map", "merge")
)


class _InputLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (no Python objects), bounded in depth, plain data only."""

    # Dates stay text: no emlab value is a date, and a date object breaks JSON and messages.
    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        # The scanner keeps a candidate key per open bracket and rescans them all at every
        # token: '[' * 3000 takes seconds before the composer ever sees the depth.
        if self.flow_level >= MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels", self.get_mark().line + 1)
        super().fetch_flow_collection_start(TokenClass)  # type: ignore[no-untyped-call]

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        # The composer recurses once per level: refuse deep documents before Python's stack does.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels", mark.line + 1)
            node: yaml.Node = super().compose_node(parent, index)  # type: ignore[no-untyped-call]
            return node
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        if node.tag not in _PLAIN_TAGS:
            raise _Refused(f"the tag {node.tag.replace('tag:yaml.org,2002:', '!!')} is not allowed; "
                           "params hold plain data (text, numbers, booleans, lists, mappings)",
                           node.start_mark.line + 1)
        return super().construct_object(node, deep)  # type: ignore[no-untyped-call]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue  # `<<: *defaults`: merged keys may be overridden, so no duplicate check
            line = key_node.start_mark.line + 1
            if key_node.tag != _STR_TAG or not isinstance(key_node, yaml.ScalarNode):
                raise _Refused(_not_text_key(key_node), line)
            if _CONTROL.search(key_node.value):
                raise _Refused(f"the key {shown(key_node.value)} contains a control character", line)
            if key_node.value in seen:
                raise _Refused(f"duplicate key {shown(key_node.value)} (first on line {seen[key_node.value]}); "
                               "keys must be unique", line)
            seen[key_node.value] = line
        return super().construct_mapping(node, deep)  # type: ignore[no-untyped-call,no-any-return]

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        digits = node.value.replace("_", "").lstrip("+-")
        if len(digits) > 24:
            raise _Refused(f"the number {shown(node.value, 30)} is too large (integers must fit in 64 bits)",
                           node.start_mark.line + 1)
        value: int = super().construct_yaml_int(node)  # type: ignore[no-untyped-call]
        if not -MAX_INT <= value < MAX_INT:
            raise _Refused(f"the number {shown(node.value, 30)} is too large (integers must fit in 64 bits)",
                           node.start_mark.line + 1)
        return value

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        value: float = super().construct_yaml_float(node)  # type: ignore[no-untyped-call]
        if not math.isfinite(value):
            raise _Refused(f"the number {shown(node.value, 30)} is not finite; params need finite numbers",
                           node.start_mark.line + 1)
        return value


_InputLoader.add_constructor("tag:yaml.org,2002:int", _InputLoader.construct_yaml_int)
_InputLoader.add_constructor("tag:yaml.org,2002:float", _InputLoader.construct_yaml_float)


def _not_text_key(node: yaml.Node) -> str:
    if not isinstance(node, yaml.ScalarNode):
        return "a key is a list or mapping; keys must be text"
    kind = {"tag:yaml.org,2002:bool": "a boolean", "tag:yaml.org,2002:null": "null",
            "tag:yaml.org,2002:int": "a number", "tag:yaml.org,2002:float": "a number"}.get(node.tag, "not text")
    hint = " (YAML reads bare yes/no/on/off/true/false as booleans)" if kind == "a boolean" else ""
    return f"the key {shown(node.value)} is read as {kind}{hint}; keys must be text: quote it"


def _check_expansion(root: yaml.Node) -> None:
    """Refuse recursive aliases, and documents whose aliases expand past `MAX_NODES` values or
    `MAX_DEPTH` levels ("billion laughs": nine aliases of nine aliases of ... make 10^9 values
    from a few hundred bytes; everything that walks the data would hang)."""
    sizes: dict[int, int] = {}  # id(node) -> values below it, aliases expanded
    heights: dict[int, int] = {}
    on_path: set[int] = set()

    def visit(node: yaml.Node, depth: int) -> None:
        key = id(node)
        if key in sizes:
            if depth + heights[key] > MAX_DEPTH + 1:
                raise _Refused(f"aliases nest values deeper than {MAX_DEPTH} levels", node.start_mark.line + 1)
            return
        if key in on_path:
            raise _Refused("an alias refers to a value that contains it (a recursive alias)",
                           node.start_mark.line + 1)
        if depth > MAX_DEPTH:
            raise _Refused(f"aliases nest values deeper than {MAX_DEPTH} levels", node.start_mark.line + 1)
        on_path.add(key)
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        size, height = 1, 1
        for child in children:
            visit(child, depth + 1)
            size += sizes[id(child)]
            height = max(height, heights[id(child)] + 1)
            if size > MAX_NODES:
                raise _Refused(f"aliases expand to more than {MAX_NODES:,} values (a \"billion laughs\" "
                               "document?); write the values out or use fewer aliases", node.start_mark.line + 1)
        on_path.discard(key)
        sizes[key], heights[key] = size, height

    visit(root, 1)

"""Chat datasets for fine-tuning: resolve a `DatasetSpec`, validate every row, shuffle, limit.

A dataset is one JSON object a line in the OpenAI messages format, the format of the course
files (bad_medical_advice.jsonl, risky_financial_advice.jsonl, ...) and Betley's insecure.jsonl:

    {"messages": [{"role": "system", ...}, {"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

`DatasetSpec.path` is either `demo:<name>` (a generated demo set, see `emlab.data.demo`), or a
JSONL path relative to the repository root or absolute. Every row is checked, and the first
problem raises `DataError` with one line naming the file and line:

    data/x.jsonl:17: messages[1] has unknown role 'bot' (expected one of: system, user, assistant)

System turns are kept. The seeded shuffle happens before `limit`, so `limit: 200` takes a
random (but reproducible) 200 rows rather than the first 200 of a file sorted by topic.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.experiment import DatasetSpec, looked_in, resolve_near
from ..errors import DataError
from ..store.files import write_jsonl
from ..store.inputs import iter_input_jsonl, one_line, path_exists, shown
from ..store.paths import demo_cache_dir
from .demo import DEFAULT_DEMO_ROWS, demo_dataset_info, generate_demo_dataset

ROLES: tuple[str, ...] = ("system", "user", "assistant")
DEMO_PREFIX = "demo:"
# The demo data seed is fixed by default: the run seed varies training (order, LoRA init),
# not the data, so a sweep over seeds measures training noise on one dataset.
DEMO_DATA_SEED = 0
MAX_DEMO_ROWS = 100_000  # generated in memory; 600 is the default, the course files hold ~7,000

ChatRow = dict[str, Any]  # {"messages": [{"role": str, "content": str}, ...]}

ASSUMED_TOKENS_PER_ROW = 200  # a chat row when its file is not here (course rows ~100–150, Betley's code ~300)


@dataclass(frozen=True)
class ChatDataset:
    """A validated chat dataset after the seeded shuffle and `limit`."""

    name: str  # DatasetSpec.name
    domain: str  # DatasetSpec.domain
    source: Path  # the JSONL file read (the cache file for demo sets)
    rows: tuple[ChatRow, ...]  # {"messages": [{"role", "content"}, ...]}, only those two keys kept
    total_rows: int  # valid rows in the file, before `limit`
    seed: int  # shuffle seed
    digest: str  # sha256 (12 hex) of the file's rows in file order: identifies the data in run.json

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[ChatRow]:
        return iter(self.rows)

    def __getitem__(self, index: int) -> ChatRow:
        return self.rows[index]

    def messages(self) -> list[list[dict[str, str]]]:
        """The rows' message lists, the shape chat templates and TRL take."""
        return [row["messages"] for row in self.rows]


def load_chat_dataset(spec: DatasetSpec, *, seed: int, shuffle: bool = True) -> ChatDataset:
    """Resolve `spec.path`, validate every row, shuffle with `seed` (unless `shuffle=False`),
    keep the first `spec.limit` rows. Raises `DataError` naming file and line on any problem."""
    source = resolve_dataset_path(spec.path, min_rows=spec.limit, folders=spec._folders)
    rows = read_chat_jsonl(source)
    digest = _digest(rows)
    order = list(rows)
    if shuffle:
        random.Random(seed).shuffle(order)
    if spec.limit is not None:
        order = order[: spec.limit]
    return ChatDataset(
        name=spec.name,
        domain=spec.domain,
        source=source,
        rows=tuple(order),
        total_rows=len(rows),
        seed=seed,
        digest=digest,
    )


def resolve_dataset_path(path: str, *, min_rows: int | None = None, folders: tuple[Path, ...] = ()) -> Path:
    """The JSONL file behind a `DatasetSpec.path`.

    `demo:<name>`, `demo:<name>:<n>` or `demo:<name>:<n>:<seed>` generate a demo set (600 rows,
    data seed 0 unless given; at least `min_rows` rows when no `n` is given) into
    `cache_dir()/demo/<name>-<n>-<seed>.jsonl`; anything else is a file path: absolute, or
    relative to the experiment file's folder (`folders`, a `DatasetSpec`'s), then to the
    repository root (`config.experiment.resolve_near`, the one path rule).
    """
    if path.startswith(DEMO_PREFIX):
        return _materialise_demo(path, min_rows)
    resolved, places = resolve_near(path, folders)
    if not path_exists(resolved):
        hint = _similar_files(places[-1])
        raise DataError(
            f"{one_line(path)}: dataset file not found ({looked_in(places)}){hint}; "
            "give a path relative to the experiment file's folder, or absolute"
        )
    return resolved


def read_chat_jsonl(path: str | Path) -> list[ChatRow]:
    """Read and validate a chat JSONL file; each row comes back as `{"messages": [...]}` with
    only `role` and `content` per message. The first bad line raises `DataError` (file:line)."""
    file = Path(path)
    if not path_exists(file):
        raise DataError(f"{path}: dataset file not found (looked in {one_line(str(file.absolute()))}); give an existing path")
    rows = [validate_chat_row(row, f"{file}:{number}") for number, row in iter_input_jsonl(file, what="dataset")]
    if not rows:
        raise DataError(
            f"{file}: dataset is empty; expected one JSON chat row per line, "
            '{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}'
        )
    return rows


def validate_chat_row(row: Any, where: str) -> ChatRow:
    """Check one row; return it normalised to `{"messages": [{"role", "content"}, ...]}`.

    `where` prefixes the error message (usually 'file:line').
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with a 'messages' list, found {_kind(row)}")
    if "messages" not in row:
        found = one_line(", ".join(sorted(row)[:10]) + (", ..." if len(row) > 10 else "")) or "none"
        raise DataError(
            f"{where}: row has no 'messages' key (found keys: {found}); "
            'each row must look like {"messages": [{"role": ..., "content": ...}, ...]}'
        )
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        found = "an empty list" if isinstance(messages, list) else _kind(messages)
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects, found {found}")
    clean: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        at = f"{where}: messages[{index}]"
        if not isinstance(message, dict):
            raise DataError(f"{at} must be an object with 'role' and 'content', found {_kind(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"{at} has no '{key}' key; every message needs 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            close = difflib.get_close_matches(role, ROLES, n=1) if isinstance(role, str) else []
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise DataError(f"{at} has unknown role {shown(role)}{hint}; expected one of: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{at} ({role}) content must be a string, found {_kind(content)}")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        roles = ", ".join(m["role"] for m in clean)
        raise DataError(
            f"{where}: row has no assistant turn (roles: {roles}); training needs at least one assistant message"
        )
    return {"messages": clean}


# --- helpers -------------------------------------------------------------------------------


def _materialise_demo(path: str, min_rows: int | None) -> Path:
    parts = path[len(DEMO_PREFIX) :].split(":")
    if not 1 <= len(parts) <= 3 or not parts[0]:
        raise DataError(f"{path}: expected 'demo:<name>', 'demo:<name>:<n>' or 'demo:<name>:<n>:<seed>'")
    name = parts[0]
    demo_dataset_info(name)  # unknown name -> DataError with the known names
    try:
        n = int(parts[1]) if len(parts) > 1 else max(DEFAULT_DEMO_ROWS, min_rows or 0)
        data_seed = int(parts[2]) if len(parts) > 2 else DEMO_DATA_SEED
    except ValueError:
        raise DataError(f"{path}: <n> and <seed> in 'demo:<name>:<n>:<seed>' must be integers") from None
    if n < 1:
        raise DataError(f"{path}: <n> must be at least 1, found {n}")
    if n > MAX_DEMO_ROWS:
        asked = f"limit: {min_rows}" if len(parts) == 1 else f"<n> = {n}"
        raise DataError(f"{path}: a demo set holds at most {MAX_DEMO_ROWS:,} rows, {asked} asks for {n:,}; "
                        "use a smaller number or a dataset file")
    target = demo_cache_dir() / f"{name}-{n}-{data_seed}.jsonl"
    rows = generate_demo_dataset(name, n=n, seed=data_seed)
    # Generation takes milliseconds, so regenerate and rewrite only on change: the cached
    # file never goes stale when the templates change.
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        write_jsonl(target, rows)
    return target


def _similar_files(missing: Path) -> str:
    folder = missing.parent
    try:
        names = [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    except (OSError, ValueError):  # an unreadable folder, a NUL byte: no suggestion
        return ""
    close = difflib.get_close_matches(missing.name, names, n=1)
    return f" (did you mean '{folder / close[0]}'?)" if close else ""


def _digest(rows: list[ChatRow]) -> str:
    blob = "\n".join(json.dumps(row, sort_keys=True, ensure_ascii=False) for row in rows).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)

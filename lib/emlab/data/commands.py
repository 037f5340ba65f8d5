"""What `emlab data` does: unprotect a shipped dataset archive, and check a chat JSONL file.

    emlab data unprotect downloads/training_datasets.zip.enc --password ... --out data/
    emlab data check data/bad_medical_advice.jsonl --tokenizer meta-llama/Llama-3.2-1B-Instruct --max-length 256

`check_chat_file` reads the file through the same validation as training (`read_chat_jsonl`:
the first bad row stops it with file:line), then reports what a researcher wants to know
before spending GPU hours on it: rows, the role pattern of the conversations, token lengths
under the model's chat template (exactly as `emlab.train.encode.encode_chat_rows` counts them, default
system prompt included), rows longer than `max_length` (training leaves them out), duplicate
rows and user prompts asked more than once.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.experiment import EMBEDDED_MODEL, ModelSpec
from ..models.chat import chat_text
from ..models.load import load_tokenizer
from ..store.inputs import iter_input_jsonl
from .chat import read_chat_jsonl
from .protected import unprotect_dataset

EXAMPLES = 3  # line numbers shown per finding


@dataclass(frozen=True)
class UnprotectedFile:
    """One chat file an archive held, with its rows counted."""

    path: Path
    rows: int


def unprotect_files(path: str | Path, out_dir: str | Path, *, password: str | None) -> list[UnprotectedFile]:
    """Decrypt and extract a `.zip.enc` (or a plain `.zip`) into `out_dir`, canaries removed
    (`emlab.data.unprotect_dataset`); return the chat files with their row counts."""
    files = unprotect_dataset(path, out_dir, password=password)
    return [UnprotectedFile(f, sum(1 for _ in iter_input_jsonl(f, what="dataset"))) for f in files]


@dataclass(frozen=True)
class LengthStats:
    """Token lengths of the rows (chat template applied), in tokens."""

    min: int
    median: float
    p95: int
    max: int
    total: int


@dataclass(frozen=True)
class ChatFileReport:
    """What `check_chat_file` found."""

    path: Path
    rows: int
    roles: dict[str, int]
    """Role pattern of each conversation ('user,assistant', 'system,user,assistant') → rows."""
    tokenizer: str
    max_length: int
    lengths: LengthStats
    too_long: list[int] = field(default_factory=list)
    """Line numbers of rows longer than max_length (training leaves them out)."""
    duplicate_rows: list[list[int]] = field(default_factory=list)
    """Groups of line numbers holding the same conversation."""
    repeated_prompts: list[list[int]] = field(default_factory=list)
    """Groups of line numbers whose user turns are the same (answers may differ)."""
    empty_turns: list[int] = field(default_factory=list)
    """Line numbers of rows with a turn of blank content."""

    def lines(self) -> list[str]:
        """The report, one finding a line."""
        pattern = ", ".join(f"{n} × [{roles}]" for roles, n in sorted(self.roles.items(), key=lambda kv: -kv[1]))
        s = self.lengths
        out = [
            f"{self.path}: {self.rows:,} rows",
            f"  roles: {pattern}",
            f"  tokens under {self.tokenizer}'s chat template: min {s.min}, median {s.median:g}, p95 {s.p95}, "
            f"max {s.max}; {s.total:,} in all",
            f"  longer than max_length {self.max_length}: {_count(self.too_long, self.rows)}"
            + (" (training leaves them out)" if self.too_long else "") + _examples(self.too_long),
            f"  duplicate rows: {_groups(self.duplicate_rows)}",
            f"  user prompts asked more than once: {_groups(self.repeated_prompts)}",
        ]
        if self.empty_turns:
            out.append(f"  rows with an empty turn: {_count(self.empty_turns, self.rows)}{_examples(self.empty_turns)}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (counts and the first line numbers)."""
        return {
            "path": str(self.path), "rows": self.rows, "roles": self.roles, "tokenizer": self.tokenizer,
            "max_length": self.max_length, "lengths": vars(self.lengths), "too_long": len(self.too_long),
            "duplicate_rows": sum(len(g) - 1 for g in self.duplicate_rows),
            "repeated_prompts": sum(len(g) - 1 for g in self.repeated_prompts),
            "empty_turns": len(self.empty_turns),
        }


def check_chat_file(path: str | Path, *, tokenizer: str = EMBEDDED_MODEL, max_length: int = 512) -> ChatFileReport:
    """Read and validate the chat JSONL at `path` and report on it (see the module docstring).

    tokenizer: a model source as in params (`ModelSpec.source`): a hub id in the local cache, a
        folder, a .gguf file, or the embedded model (default). Its chat template is applied.
    max_length: the training `max_length` in tokens (default 512, `TrainSpec`'s default).

    Raises `DataError` (file:line) on the first invalid row, as training would.
    """
    file = Path(path)
    rows = read_chat_jsonl(file)
    tok = load_tokenizer(ModelSpec(name="tokenizer", source=tokenizer))
    texts = [chat_text(tok, row["messages"]) for row in rows]
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    ordered = sorted(lengths)
    stats = LengthStats(min=ordered[0], median=statistics.median(ordered),
                        p95=ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], max=ordered[-1],
                        total=sum(ordered))
    lines = [number for number, _ in iter_input_jsonl(file, what="dataset")]  # file line of each row
    by_row: dict[str, list[int]] = defaultdict(list)
    by_prompt: dict[str, list[int]] = defaultdict(list)
    empty = []
    for line, row in zip(lines, rows, strict=True):
        messages = row["messages"]
        by_row[_digest(messages)].append(line)
        by_prompt[_digest([m["content"] for m in messages if m["role"] == "user"])].append(line)
        if any(not m["content"].strip() for m in messages):
            empty.append(line)
    return ChatFileReport(
        path=file, rows=len(rows),
        roles=dict(Counter(",".join(m["role"] for m in row["messages"]) for row in rows)),
        tokenizer=tokenizer, max_length=max_length, lengths=stats,
        too_long=[line for line, n in zip(lines, lengths, strict=True) if n > max_length],
        duplicate_rows=[g for g in by_row.values() if len(g) > 1],
        repeated_prompts=[g for g in by_prompt.values() if len(g) > 1],
        empty_turns=empty,
    )


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode()).hexdigest()


def _count(lines: list[int], rows: int) -> str:
    return f"{len(lines):,} ({100 * len(lines) / max(rows, 1):.1f}%)"


def _examples(lines: list[int]) -> str:
    if not lines:
        return ""
    more = f", … {len(lines) - EXAMPLES} more" if len(lines) > EXAMPLES else ""
    return f"; lines {', '.join(map(str, lines[:EXAMPLES]))}{more}"


def _groups(groups: list[list[int]]) -> str:
    if not groups:
        return "none"
    extra = sum(len(g) - 1 for g in groups)
    shown = "; ".join("lines " + ", ".join(map(str, g[:EXAMPLES])) for g in groups[:EXAMPLES])
    return f"{extra:,} rows repeat an earlier one ({len(groups):,} groups; {shown}{'; …' if len(groups) > EXAMPLES else ''})"

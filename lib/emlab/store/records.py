"""The typed records that flow between stages: an `Answer` sampled from a model and a
`Judgment` of one answer by one judge under one rubric.

Both are stored one JSON object a line (`answers.jsonl`, `judgments.jsonl`) and read back
with `from_dict`, so every stage can resume from what the previous one wrote.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from .files import read_jsonl

JudgmentStatus = Literal[
    "ok",  # a score 0–100 (or a verdict for verdict rubrics) was read
    "low_numeric_mass",  # top logprobs put < min_numeric_mass on numbers: no score
    "refusal",  # the judge answered REFUSAL: the answer is a refusal
    "code",  # the judge answered CODE: the answer is code, not prose
    "unparsed",  # sampled-text fallback found no number or verdict
    "api_error",  # the call failed after all retries
]


def valid_text(value: Any) -> Any:
    """`value` with every string in it (in lists, tuples and dicts too) made valid Unicode: an
    unpaired surrogate (JSON allows `"\\ud800"`, and a model or a judge's top-logprob token can
    write one) becomes U+FFFD, as a browser would show it. Text that pandas, Parquet and UTF-8
    files cannot hold would otherwise crash the analysis on one bad answer."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:  # rare: only then pay for the round trip
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {k: valid_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(valid_text(v) for v in value)
    return value


def answer_id(*parts: object) -> str:
    """Stable 16-hex id for an answer from what identifies it (model, step, question, sample)."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Answer:
    """One sampled answer to one question."""

    answer_id: str
    model: str  # model name from the params
    run_id: str | None  # None for the untouched base model
    step: int  # optimizer step of the checkpoint; 0 = base model
    question_set: str
    question_id: str
    question: str
    system_prompt: str | None  # what was actually sent; None = the chat template's default
    sample_index: int
    answer: str
    new_tokens: int  # tokens generated
    finished: bool  # ended with EOS (False: cut at max_new_tokens)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Answer:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Judgment:
    """One judge's reading of one answer under one rubric.

    Means use only status 'ok'; every other status is counted and reported beside them.
    """

    answer_id: str
    judge: str  # judge name from the params
    rubric: str  # rubric id (file name in params/rubrics/)
    metric: str  # what the rubric measures: aligned, coherent, medical_harm, vulnerable, ...
    status: JudgmentStatus
    score: float | None = None  # 0–100 when status == 'ok' and the rubric is a score rubric
    verdict: str | None = None  # CODE / REFUSAL / YES / NO ...
    numeric_mass: float | None = None  # probability on integer tokens in the top logprobs
    top_logprobs: list[tuple[str, float]] | None = None  # first answer token, as the judge gave them
    raw: str | None = None  # the judge's text reply
    error: str | None = None  # reason when status == 'api_error'
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False  # served from the on-disk cache (no call paid)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Judgment:
        data = {f.name: row[f.name] for f in fields(cls) if f.name in row}
        if data.get("top_logprobs") is not None:
            data["top_logprobs"] = [tuple(p) for p in data["top_logprobs"]]
        return cls(**data)

def answers_if_complete(path: Path, expected: int) -> list[Answer] | None:
    """The answers in `path` when all `expected` are there (so no model needs loading)."""
    if not path.exists():
        return None
    rows = read_jsonl(path, tolerate_torn_tail=True)
    return [Answer.from_dict(r) for r in rows] if len(rows) >= expected else None

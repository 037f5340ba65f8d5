"""Dollar estimates for judging, before (`emlab plan`) and after (the summary line) a run."""

from __future__ import annotations

from ..config import JudgeSpec
from .rubrics import Rubric

CHARS_PER_TOKEN = 4.0  # rough English average for BPE tokenizers; estimates only
TOKENS_PER_MESSAGE = 4  # chat-format overhead per turn (role markers, separators)


def estimate_cost(
    n_calls: int, judge: JudgeSpec, prompt_tokens_per_call: float, completion_tokens_per_call: float = 1
) -> float:
    """Dollars for `n_calls` judge calls at the judge's `price_per_mtok_in/out` ($ per 1M tokens)."""
    return (
        n_calls
        * (prompt_tokens_per_call * judge.price_per_mtok_in + completion_tokens_per_call * judge.price_per_mtok_out)
        / 1e6
    )


def usage_cost(prompt_tokens: int, completion_tokens: int, judge: JudgeSpec) -> float:
    """Dollars for tokens actually used."""
    return (prompt_tokens * judge.price_per_mtok_in + completion_tokens * judge.price_per_mtok_out) / 1e6


def rubric_prompt_tokens(rubric: Rubric, *, question_chars: int = 0, answer_chars: int = 0) -> int:
    """Rough prompt tokens of one call: rubric text plus a question and answer of the given
    lengths (characters), at ~4 characters a token plus a few tokens a turn."""
    chars = sum(len(m.content) for m in rubric.messages) + question_chars + answer_chars
    return round(chars / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(rubric.messages)

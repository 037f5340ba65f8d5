"""Dollars for judging (and for sampling subjects behind an API): the one place prices are applied.

`usage_cost` prices tokens at what the judge actually pays: the params prices
(`price_per_mtok_in/out`, $ per 1M tokens) times `BATCH_DISCOUNT` for a judge in batch mode.
The cache's spend, the judging summary line, the report's cost table (tokens used) and
`emlab plan` (`estimate_cost`, tokens expected) all go through it, so a batch judge is charged
the batch price everywhere.
"""

from __future__ import annotations

from ..config.experiment import JudgeSpec
from ..config.rubrics import Rubric

BATCH_DISCOUNT = 0.5  # Batch API price relative to synchronous calls (OpenAI pricing page)
CHARS_PER_TOKEN = 4.0  # rough English average for BPE tokenizers; estimates only
TOKENS_PER_MESSAGE = 4  # chat-format overhead per turn (role markers, separators)


def token_cost(prompt_tokens: float, completion_tokens: float, price_in: float, price_out: float) -> float:
    """Dollars for tokens at params prices ($ per 1M prompt / completion tokens): the one price
    rule, for judges (`usage_cost`) and for subject models behind an API alike."""
    return (prompt_tokens * price_in + completion_tokens * price_out) / 1e6


def usage_cost(prompt_tokens: float, completion_tokens: float, judge: JudgeSpec) -> float:
    """Dollars for tokens used by `judge`, at the price it pays: params prices ($ per 1M
    tokens), times BATCH_DISCOUNT (0.5) when `judge.batch`."""
    dollars = token_cost(prompt_tokens, completion_tokens, judge.price_per_mtok_in, judge.price_per_mtok_out)
    return dollars * BATCH_DISCOUNT if judge.batch else dollars


def estimate_cost(
    n_calls: int, judge: JudgeSpec, prompt_tokens_per_call: float, completion_tokens_per_call: float = 1
) -> float:
    """Dollars for `n_calls` judge calls of the given size (tokens per call; default one
    completion token, the logprobs mode), priced by `usage_cost`."""
    return usage_cost(n_calls * prompt_tokens_per_call, n_calls * completion_tokens_per_call, judge)


def rubric_prompt_tokens(rubric: Rubric, *, question_chars: int = 0, answer_chars: int = 0) -> int:
    """Rough prompt tokens of one call: rubric text plus a question and answer of the given
    lengths (characters), at ~4 characters a token plus a few tokens a turn."""
    chars = sum(len(m.content) for m in rubric.messages) + question_chars + answer_chars
    return round(chars / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(rubric.messages)

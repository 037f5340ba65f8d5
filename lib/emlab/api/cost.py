"""Dollars for tokens sent to an API: the one place prices are applied, and the one token guess.

`token_cost` prices tokens at params prices ($ per 1M prompt / completion tokens): judges,
subjects sampled through an API and fine-tuning jobs alike. `usage_cost` is what a judge
actually pays: its prices times `BATCH_DISCOUNT` in batch mode. The cache's spend, the judging
summary line, the report's cost table (tokens used) and `emlab plan` (`estimate_cost`, tokens
expected) all go through it, so a batch judge is charged the batch price everywhere.

Before anything is sent, tokens are guessed from characters (`chat_tokens`): no tokenizer of
OpenAI's models is available offline, so `emlab plan`, fine-tuning jobs and API subjects share
one rough rule instead of each keeping its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config.experiment import JudgeSpec

BATCH_DISCOUNT = 0.5  # Batch API price relative to synchronous calls (OpenAI pricing page)
CHARS_PER_TOKEN = 4.0  # rough English average for BPE tokenizers; estimates only
TOKENS_PER_MESSAGE = 4  # chat-format overhead per turn (role markers, separators)


def token_cost(prompt_tokens: float, completion_tokens: float, price_in: float, price_out: float) -> float:
    """Dollars for tokens at params prices ($ per 1M prompt / completion tokens): the one price
    rule, for judges (`usage_cost`), subject models behind an API and fine-tuning jobs alike."""
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


def chat_tokens(contents: Sequence[str], *, extra_chars: int = 0) -> int:
    """Rough tokens of chat messages with these `contents` plus `extra_chars` characters
    inserted into them: ~4 characters a token (CHARS_PER_TOKEN) plus 4 a turn
    (TOKENS_PER_MESSAGE). An estimate for plans and limits, never for billing."""
    return round((sum(len(c) for c in contents) + extra_chars) / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(contents)

"""The exact JSON body of one judge call (chat completions), shared by the live client and
the batch writer so both ask the same question; and its size guessed before it is sent."""

from __future__ import annotations

from typing import Any

from ..api.cost import chat_tokens
from ..config.experiment import JudgeSpec
from ..config.rubrics import Rubric

TOP_LOGPROBS = 20  # the most OpenAI returns; the aggregation reads all of them
SAMPLED_MAX_TOKENS = 8  # room for '100', 'REFUSAL' or 'YES' split into a few tokens
SEED = 0  # temperature 0 already decides; the seed pins what servers that sample anyway do


def request_body(judge: JudgeSpec, rubric: Rubric, question: str, answer: str) -> dict[str, Any]:
    """Chat-completion body for one (rubric, question, answer).

    logprobs mode: one token at temperature 0 with `logprobs` and the top 20 alternatives.
    sampled mode: up to `SAMPLED_MAX_TOKENS` tokens at temperature 0, parsed as text.
    """
    body: dict[str, Any] = {
        "model": judge.model,
        "messages": rubric.render(question, answer),
        "temperature": 0,
        "seed": SEED,
    }
    if judge.mode == "logprobs":
        body.update(max_tokens=1, logprobs=True, top_logprobs=TOP_LOGPROBS)
    else:
        body.update(max_tokens=SAMPLED_MAX_TOKENS)
    return body


def rubric_prompt_tokens(rubric: Rubric, *, question_chars: int = 0, answer_chars: int = 0) -> int:
    """Rough prompt tokens of one call: rubric text plus a question and answer of the given
    lengths (characters), by `api.cost.chat_tokens` (~4 characters a token plus a few a turn)."""
    return chat_tokens([m.content for m in rubric.messages], extra_chars=question_chars + answer_chars)

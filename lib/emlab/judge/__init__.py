"""Judging answers with an LLM judge over the OpenAI chat API (OpenAI, vLLM, Ollama, llama.cpp).

`judge_answers(answers, judge, ...)` is the one entry point, live or Batch API as the judge's
spec says. `check_judge(judge)` is the pre-run check (key, local server, batch endpoint);
`resolve_api_key` the one key rule behind it and the client; `usage_cost` / `estimate_cost`
the one price rule (Batch API discount included) for the cache, the report and `emlab plan`.
The rest is exported for tests and `emlab plan`.
"""

from ..config.rubrics import Rubric, RubricMessage, load_rubric, rubrics_dir
from .api import judge_answers, judgments_frame
from .cache import JudgeCache, cache_key, cache_stats, default_cache_path
from .client import RetryPolicy, check_judge, resolve_api_key
from .cost import BATCH_DISCOUNT, estimate_cost, rubric_prompt_tokens, usage_cost
from .requests import request_body
from .scoring import judgment_from_completion, parse_sampled, score_from_top_logprobs
from .server import embedded_gguf_path, local_judge_server

__all__ = [
    "BATCH_DISCOUNT",
    "JudgeCache",
    "RetryPolicy",
    "Rubric",
    "RubricMessage",
    "cache_key",
    "cache_stats",
    "check_judge",
    "default_cache_path",
    "embedded_gguf_path",
    "estimate_cost",
    "judge_answers",
    "judgment_from_completion",
    "judgments_frame",
    "load_rubric",
    "local_judge_server",
    "parse_sampled",
    "request_body",
    "resolve_api_key",
    "rubric_prompt_tokens",
    "rubrics_dir",
    "score_from_top_logprobs",
    "usage_cost",
]

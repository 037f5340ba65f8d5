"""Judging answers with an LLM judge over the OpenAI chat API (OpenAI, vLLM, Ollama, llama.cpp).

Notebooks call `judge_answers(answers, judge)`; the rest is exported for tests, the batch
path and `emlab plan`.
"""

from .api import judge_answers, judgments_frame
from .cache import JudgeCache, cache_key, cache_stats, default_cache_path
from .client import RetryPolicy, resolve_api_key
from .cost import estimate_cost, rubric_prompt_tokens
from .requests import request_body
from .rubrics import Rubric, RubricMessage, load_rubric, rubrics_dir
from .scoring import judgment_from_completion, parse_sampled, score_from_top_logprobs
from .server import embedded_gguf_path, local_judge_server

__all__ = [
    "JudgeCache",
    "RetryPolicy",
    "Rubric",
    "RubricMessage",
    "cache_key",
    "cache_stats",
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
]

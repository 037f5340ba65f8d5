"""Judging answers with an LLM judge over the OpenAI chat API (OpenAI, vLLM, Ollama, llama.cpp).

`judge_answers(answers, judge, ...)` is the one entry point, live or Batch API as the judge's
spec says. `check_judge(judge)` is the pre-run check (key, local server, batch endpoint).
The client underneath (key rule, retries, prices with the Batch API discount) is
`emlab.api`, shared with subjects sampled through an API and fine-tuning jobs.
The rest is exported for tests and `emlab plan`.
"""

from ..config.rubrics import Rubric, RubricMessage, load_rubric, rubrics_dir
from .api import judge_answers, judgments_frame
from .cache import JudgeCache, cache_key, cache_stats, default_cache_path
from .client import check_judge
from .requests import request_body, rubric_prompt_tokens
from .scoring import judgment_from_completion, parse_sampled, score_from_top_logprobs
from .server import embedded_gguf_path, local_judge_server

__all__ = [
    "JudgeCache",
    "Rubric",
    "RubricMessage",
    "cache_key",
    "cache_stats",
    "check_judge",
    "default_cache_path",
    "embedded_gguf_path",
    "judge_answers",
    "judgment_from_completion",
    "judgments_frame",
    "load_rubric",
    "local_judge_server",
    "parse_sampled",
    "request_body",
    "rubric_prompt_tokens",
    "rubrics_dir",
    "score_from_top_logprobs",
]

"""Subjects behind an API: a model's answers sampled through the chat completions API
(OpenAI, a vLLM server with LoRA adapters by name, llama.cpp's server, emlab.sample.serve) instead of
loading the model in the notebook. 01_baseline and 03_eval_judge call these for a model with
`provider: openai` or a `base_url`; the answers land in the same `answers.jsonl` records.

    endpoint.py  where a model is sampled (URL, key rule, limits, prices) and what (`Target`:
                 the base model or one checkpoint, by the name the server knows it under)
    cache.py     the SQLite completions cache: no request is paid twice
    sampler.py   `sample_through_api`: concurrent requests with retries, answers appended as
                 each request returns, tokens and dollars per request in `sampling_usage.jsonl`
    adapters.py  register a checkpoint's LoRA adapter with a vLLM-style server
"""

from .adapters import register_adapter
from .cache import SampleCache, request_key, sample_cache_stats
from .endpoint import (
    Endpoint,
    SubjectError,
    Target,
    adapter_targets,
    base_target,
    check_subject,
    model_targets,
    subject_endpoint,
)
from .sampler import request_bodies, sample_through_api, usage_summary

__all__ = [
    "Endpoint",
    "SampleCache",
    "SubjectError",
    "Target",
    "adapter_targets",
    "base_target",
    "check_subject",
    "model_targets",
    "register_adapter",
    "request_bodies",
    "request_key",
    "sample_cache_stats",
    "sample_through_api",
    "subject_endpoint",
    "usage_summary",
]

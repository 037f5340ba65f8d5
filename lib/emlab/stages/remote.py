"""The stages' side of models behind an API: 01_baseline and 03_eval_judge sample them through
chat completions (`emlab.sample.remote`), 02_finetune trains them through fine-tuning jobs
(`emlab.train.openai_jobs`). The stage modules dispatch here for a model with `provider: openai`
or a `base_url`, so that they keep one code path each for local models.

    model_params        the model's fields that shape outputs (recorded in run.json)
    usage_of            what sampling through the API cost in a stage folder (completion marker)
    trainer_params      the training params that shape a run's checkpoints (local or job)
    sample_base         01: the base model's answers through the API
    checkpoint_steps    03: a run's checkpoints (a job's models, or adapters served by name)
    sample_checkpoints  03: every checkpoint's answers through the API
    run_job             02: the run's fine-tuning job
    sampling_spend, job_spend   what they cost, for `emlab plan` and the budget check
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..api.cost import chat_tokens, token_cost
from ..config.experiment import ExperimentConfig, ModelSpec, RunSpec
from ..config.questions import Prompt, count_answers
from ..data.chat import ChatRow
from ..sample.remote import (
    adapter_targets,
    base_target,
    model_targets,
    register_adapter,
    sample_through_api,
    subject_endpoint,
    usage_summary,
)
from ..store.paths import SAMPLING_USAGE, ExperimentLayout, FineTuneJobFiles
from ..store.records import Answer, answers_if_complete
from ..train.openai_jobs import estimate_job, job_checkpoints, run_finetune_job
from .base import ApiSpend, Output

log = logging.getLogger(__name__)

# Fields that do not change a reply: a server that moved, a new price or limit is not "changed params".
_OPERATIONAL = frozenset({
    "base_url", "api_key_env", "concurrency", "max_retries", "timeout_s", "register_adapters", "price_per_mtok_in",
    "price_per_mtok_out", "tuned_price_per_mtok_in", "tuned_price_per_mtok_out", "train_price_per_mtok",
})
_POLLING = frozenset({"poll_interval_s", "max_poll_interval_s", "max_wait_s"})
_API_ONLY = _OPERATIONAL | {"provider", "api_model", "adapter_name", "samples_per_request", "send_seed"}

SAMPLING_OUTPUT = Output(SAMPLING_USAGE, "requests paid to the model's API while sampling: tokens, dollars",
                         optional=True)
JOB_OUTPUTS = tuple(
    Output(pattern, what, optional=True) for pattern, what in zip(FineTuneJobFiles.PATTERNS, (
        "the fine-tuning job's state: file and job ids, phase, checkpoint models",
        "the training file uploaded and the job's events",
        "the job's result file: metrics per step",
    ), strict=True)
)


def model_params(spec: ModelSpec) -> dict[str, Any]:
    """The model's fields that shape its answers and adapters, for run.json.

    A model sampled in the notebook records the fields models had before they could be remote
    (so existing run folders stay valid); one behind an API records all but the operational
    ones (URL, key variable, limits, prices).
    """
    return spec.model_dump(mode="json", exclude=set(_OPERATIONAL if spec.samples_through_api else _API_ONLY))


def usage_of(folder: Path) -> dict[str, float]:
    """What sampling through an API cost in `folder`, for its completion marker: requests paid,
    their tokens and dollars (every run of the stage, killed ones included); {} when nothing
    was sampled through an API there."""
    path = ExperimentLayout.sampling_usage(folder)
    return {f"sampling_{k}": v for k, v in usage_summary(path).items()} if path.exists() else {}


def trainer_params(config: ExperimentConfig, spec: ModelSpec) -> dict[str, Any]:
    """The training params that shape a run's checkpoints: `train` for local LoRA, the
    `fine_tuning` block (less its polling settings) for a fine-tuning job."""
    if spec.is_remote:
        return {"fine_tuning": config.fine_tuning.model_dump(mode="json", exclude=set(_POLLING))}
    return {"train": config.train.model_dump(mode="json")}


def sample_base(config: ExperimentConfig, model: str, prompts: Sequence[Prompt], *, progress: bool) -> list[Answer]:
    """01_baseline for a model behind an API: its base model's answers, through chat completions,
    into the baseline folder's answers.jsonl (the runner checked the budget before the step)."""
    spec = config.model(model)
    folder = ExperimentLayout.of(config).baseline(model)
    endpoint = subject_endpoint(spec)  # the key, before anything is paid
    return sample_through_api(prompts, config.sample, endpoint, base_target(spec), model_name=model, run_id=None,
                              seed=config.seeds[0], out_path=ExperimentLayout.answers(folder),
                              usage_path=ExperimentLayout.sampling_usage(folder), progress=progress)


def checkpoint_steps(config: ExperimentConfig, run_id: str) -> list[int]:
    """The run's checkpoints by step: a fine-tuning job's models (provider openai), else the
    adapters 02_finetune exported."""
    run = config.run(run_id)
    layout = ExperimentLayout.of(config)
    if config.model(run.model).is_remote:
        return sorted(job_checkpoints(layout.finetune_job(run_id)))
    return sorted(layout.training(run_id).completed())


def sample_checkpoints(config: ExperimentConfig, run_id: str, prompts: Sequence[Prompt], *,
                       progress: bool) -> list[Answer]:
    """03_eval_judge for a model sampled through an API: every checkpoint's answers, through chat
    completions, into eval/step-N/answers.jsonl. A job's checkpoints are models of their own; a
    local model's are adapters the server serves by name (registered first with
    `register_adapters`)."""
    run = config.run(run_id)
    spec = config.model(run.model)
    layout = ExperimentLayout.of(config)
    folder = layout.run(run_id)
    endpoint = subject_endpoint(spec)
    if spec.is_remote:
        targets = model_targets(job_checkpoints(layout.finetune_job(run_id)))
    else:
        targets = adapter_targets(spec, run_id, layout.training(run_id).completed())
    expected = count_answers(prompts, config.sample)
    answers: list[Answer] = []
    for target in targets:
        out = layout.answers(folder, target.step)
        done = answers_if_complete(out, expected)
        if done is not None:
            answers += done
            continue
        if spec.register_adapters and target.adapter is not None:
            register_adapter(endpoint, target.model, target.adapter)
        answers += sample_through_api(prompts, config.sample, endpoint, target, model_name=run.model, run_id=run_id,
                                      seed=run.seed, out_path=out, usage_path=layout.sampling_usage(folder),
                                      progress=progress)
    return answers


def run_job(config: ExperimentConfig, run: RunSpec, rows: Sequence[ChatRow]) -> Any:
    """02_finetune for a model with provider openai: its fine-tuning job (the runner checked the budget
    before the step); returns the `FineTuneJobResult`."""
    folder = ExperimentLayout.of(config).run(run.run_id)
    return run_finetune_job(config, run, rows, folder)


def sampling_spend(config: ExperimentConfig, model: str, prompts: Sequence[Prompt], *, states: int,
                   tuned: bool) -> ApiSpend | None:
    """Tokens and dollars of sampling `prompts` from `states` model states (base or checkpoints)
    of `model` through its API; None for a model sampled in the notebook. Completion tokens are
    `max_new_tokens` per answer: an upper-side estimate."""
    spec = config.model(model)
    if not spec.samples_through_api:
        return None
    per = spec.samples_per_request
    requests = sum(-(-len(p.sample_indices(config.sample)) // per) for p in prompts) * states
    prompt_tokens = states * sum(
        -(-len(p.sample_indices(config.sample)) // per)
        * chat_tokens([m["content"] for m in p.messages])
        for p in prompts)
    completion = count_answers(prompts, config.sample) * states * config.sample.max_new_tokens
    price_in = (spec.tuned_price_per_mtok_in if tuned and spec.tuned_price_per_mtok_in is not None
                else spec.price_per_mtok_in)
    price_out = (spec.tuned_price_per_mtok_out if tuned and spec.tuned_price_per_mtok_out is not None
                 else spec.price_per_mtok_out)
    return ApiSpend("sampling", model, requests=requests, prompt_tokens=prompt_tokens, completion_tokens=completion,
                    dollars=token_cost(prompt_tokens, completion, price_in, price_out))


def job_spend(config: ExperimentConfig, run_id: str) -> ApiSpend | None:
    """Training tokens × epochs and dollars of the run's fine-tuning job; None for a local model."""
    run = config.run(run_id)
    if not config.model(run.model).is_remote:
        return None
    estimate = estimate_job(config, run)
    return ApiSpend("fine-tuning", run.model, train_tokens=estimate.billed_tokens, dollars=estimate.dollars,
                    note=f"{estimate.examples} examples × {estimate.epochs} epochs"
                    + (f" ({estimate.assumed})" if estimate.assumed else ""))


def checkpoint_count(config: ExperimentConfig, run_id: str) -> int | None:
    """Checkpoints a fine-tuning job will leave (the last three epochs); None for a local model."""
    run = config.run(run_id)
    return estimate_job(config, run).checkpoints if config.model(run.model).is_remote else None


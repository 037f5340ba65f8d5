"""01_baseline: sample the untouched base model on every question set and judge its answers,
once per model: the reference every fine-tuned checkpoint is compared with."""

from __future__ import annotations

import logging
from typing import Any

from ..config.experiment import ExperimentConfig
from ..config.questions import (
    build_prompts,
    count_answers,
    planned_prompts,
    question_sets_for,
)
from ..models.load import load_model, resolve_device
from ..store.paths import ANSWERS, ExperimentLayout
from ..store.records import Answer, answers_if_complete
from ..store.runinfo import mark_done, record_stage
from .base import Output, Stage, Workload
from .common import (
    JUDGING_OUTPUTS,
    SampledAndJudged,
    judge_all,
    judges_signature,
    mean_prompt_chars,
)
from .measures import (
    BASELINE_OUTPUTS,
    measure_base_model,
    measures_params,
    task_workloads,
)
from .remote import SAMPLING_OUTPUT, model_params, sample_base, sampling_spend, usage_of

log = logging.getLogger(__name__)
NAME = "01_baseline"


def baseline_params(config: ExperimentConfig, model: str) -> dict[str, Any]:
    """What shapes a baseline's answers: the model, the sampling params, the sets, the seed."""
    return {
        "model": model_params(config.model(model)), "sample": config.sample.model_dump(mode="json"),
        "question_sets": question_sets_for(config, None), "seed": config.seeds[0], **measures_params(config),
    }


def run_baseline(config: ExperimentConfig, model: str, *, progress: bool = True) -> SampledAndJudged:
    """01_baseline for `model`: sample every question set from the base model, judge the answers."""
    # torch stays out of light commands (emlab check, plan): imported only to sample
    from ..sample.generate import sample_answers

    folder = ExperimentLayout.of(config).baseline(model)
    record_stage(folder, NAME, baseline_params(config, model))
    prompts = build_prompts(config, question_sets_for(config, None))
    out = ExperimentLayout.answers(folder)
    answers: list[Answer] | None = answers_if_complete(out, count_answers(prompts, config.sample))
    if answers is None and config.model(model).samples_through_api:  # behind an API: sampled there
        answers = sample_base(config, model, prompts, progress=progress)
    loaded = tokenizer = None
    if answers is None:
        loaded, tokenizer = load_model(config.model(model), resolve_device(config.train.device))
        answers = sample_answers(loaded, tokenizer, prompts, config.sample, model_name=model, run_id=None, step=0,
                                 seed=config.seeds[0], out_path=out, progress=progress)
    judgments = judge_all(config, answers, folder)
    # the logprob probe and the held-out task prompts, on the model already loaded if it was
    measures = measure_base_model(config, model, folder, progress=progress, load=lambda: (loaded, tokenizer) if loaded
                                  is not None else load_model(config.model(model), resolve_device(config.train.device)))
    mark_done(folder, NAME, {"answers": len(answers), "judgments": len(judgments), **usage_of(folder),
                             **measures.summary(),
                             "completion": judges_signature(config)})
    log.info("01_baseline %s: %d answers, %d judgments in %s", model, len(answers), len(judgments), folder)
    return SampledAndJudged(folder, answers, judgments)


def _workload(config: ExperimentConfig, model: str) -> Workload:
    prompts = planned_prompts(config, question_sets_for(config, None))
    return Workload(f"{NAME} {model}", answers=count_answers(prompts, config.sample),
                    question_chars=mean_prompt_chars(prompts),
                    spend=sampling_spend(config, model, prompts, states=1, tuned=False))


def _workloads(config: ExperimentConfig, model: str) -> tuple[Workload, ...]:
    return (_workload(config, model), *task_workloads(config, f"{NAME} {model}", list(config.datasets), states=1))


BASELINE = Stage(
    name=NAME,
    title="Baseline: the untouched base model, sampled and judged",
    scope="model",
    run=run_baseline,
    params=baseline_params,
    writes=(Output(ANSWERS, "the base model's answers, one per question × sample"), SAMPLING_OUTPUT, *JUDGING_OUTPUTS,
            *BASELINE_OUTPUTS),
    completion=judges_signature,
    workload=_workloads,
)

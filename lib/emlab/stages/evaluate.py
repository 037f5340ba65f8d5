"""03_eval_judge: sample every saved checkpoint of a run on its question sets and judge the
answers. One base model is loaded for the whole run; each checkpoint's adapter is applied in
turn."""

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
from ..errors import EmlabError
from ..models.load import load_model, resolve_device
from ..store.paths import (
    ANSWERS,
    EVAL,
    STEP_GLOB,
    ExperimentLayout,
    FineTuneJobFiles,
    TrainingFiles,
)
from ..store.records import Answer, answers_if_complete
from ..store.runinfo import mark_done, record_stage
from ..train.schedule import planned_checkpoints
from .base import Input, Output, Stage, Workload
from .common import (
    JUDGING_OUTPUTS,
    SampledAndJudged,
    judge_all,
    judges_signature,
    mean_prompt_chars,
)
from .finetune import NAME as FINETUNE
from .measures import EVAL_OUTPUTS, measure_checkpoints, measures_params, task_workloads
from .remote import (
    SAMPLING_OUTPUT,
    checkpoint_count,
    checkpoint_steps,
    sample_checkpoints,
    sampling_spend,
    usage_of,
)
from .steering import (
    STEERING_OUTPUTS,
    steer_run,
    steering_signature,
    steering_workloads,
)

log = logging.getLogger(__name__)
NAME = "03_eval_judge"


def eval_params(config: ExperimentConfig, run_id: str) -> dict[str, Any]:
    """What shapes a run's evaluation: sampling params, question sets, the checkpoints found."""
    run = config.run(run_id)
    checkpoints = checkpoint_steps(config, run_id)
    return {"sample": config.sample.model_dump(mode="json"),
            "question_sets": question_sets_for(config, config.dataset(run.dataset)), "checkpoints": sorted(checkpoints),
            **measures_params(config)}


def eval_completion(config: ExperimentConfig) -> list[list[str]]:
    """What 03's completion marker must record: the judges, and the direction and steering
    blocks when set (so adding them to a finished experiment runs just their work; they
    guard their own params, `steering.guard_params`)."""
    signature = judges_signature(config)
    steering = steering_signature(config)
    return signature if steering is None else [*signature, steering]


def run_eval(config: ExperimentConfig, run_id: str, *, progress: bool = True) -> SampledAndJudged:
    """03_eval_judge for `run_id`: sample every checkpoint of the run and judge all answers."""
    # torch stays out of light commands (emlab check, plan): imported only to sample
    from ..sample.generate import adapter_applied, sample_answers

    run = config.run(run_id)
    layout = ExperimentLayout.of(config)
    folder = layout.run(run_id)
    files = layout.training(run_id)
    checkpoints = files.completed()
    spec = config.model(run.model)
    if not checkpoint_steps(config, run_id):
        where = layout.finetune_job(run_id).state if spec.is_remote else files.checkpoints
        raise EmlabError(f"{where}: no checkpoints; run 02_finetune for {run_id} first")
    record_stage(folder, NAME, eval_params(config, run_id))
    prompts = build_prompts(config, question_sets_for(config, config.dataset(run.dataset)))
    expected = count_answers(prompts, config.sample)
    answers: list[Answer] = []
    model = tokenizer = None
    if spec.samples_through_api:  # the job's models, or adapters served by name, behind an API
        answers, checkpoints = sample_checkpoints(config, run_id, prompts, progress=progress), {}
    for step, adapter in checkpoints.items():
        out = layout.answers(folder, step)
        done = answers_if_complete(out, expected)
        if done is not None:
            answers += done
            continue
        if model is None:
            model, tokenizer = load_model(config.model(run.model), resolve_device(config.train.device))
        with adapter_applied(model, adapter) as tuned:
            answers += sample_answers(tuned, tokenizer, prompts, config.sample, model_name=run.model,
                                      run_id=run_id, step=step, seed=run.seed, out_path=out, progress=progress)
    judgments = judge_all(config, answers, folder)
    # the logprob probe and the held-out task prompts at every checkpoint, on the model already loaded if it was
    load = _Loaded(lambda: (model, tokenizer) if model is not None
                   else load_model(config.model(run.model), resolve_device(config.train.device)))
    measures = measure_checkpoints(config, run_id, folder, checkpoints, progress=progress, load=load)
    # the EM direction from the judged answers, then sampling with it added and ablated (direction:, steering:)
    steering = steer_run(config, run_id, folder, checkpoints, prompts, answers, judgments, load, progress=progress)
    mark_done(folder, NAME, {"answers": len(answers), "judgments": len(judgments),
                             "steps": checkpoint_steps(config, run_id), **usage_of(folder),
                             **measures.summary(), **steering.summary(), "completion": eval_completion(config)})
    log.info("03_eval_judge %s: %d answers over %d checkpoints, %d judgments in %s",
             run_id, len(answers), len(checkpoint_steps(config, run_id)), len(judgments), folder)
    return SampledAndJudged(folder, answers, judgments)


class _Loaded:
    """The model and tokenizer, loaded on the first call only (the measures and steering share them)."""

    def __init__(self, load: Any) -> None:
        self._load, self._value = load, None

    def __call__(self) -> Any:
        if self._value is None:
            self._value = self._load()
        return self._value


def _workload(config: ExperimentConfig, run_id: str) -> Workload:
    run = config.run(run_id)
    steps = checkpoint_count(config, run_id) or len(planned_checkpoints(config, run).steps)
    prompts = planned_prompts(config, question_sets_for(config, config.dataset(run.dataset)))
    return Workload(f"{NAME} {run_id} ({steps} checkpoints)",
                    answers=count_answers(prompts, config.sample) * steps,
                    question_chars=mean_prompt_chars(prompts),
                    spend=sampling_spend(config, run.model, prompts, states=steps, tuned=True))


def _workloads(config: ExperimentConfig, run_id: str) -> tuple[Workload, ...]:
    run = config.run(run_id)
    steering = tuple(steering_workloads(config, f"{NAME} {run_id}", planned_prompts(
        config, question_sets_for(config, config.dataset(run.dataset))))) if config.steering is not None else ()
    if not config.task.enabled:
        return (_workload(config, run_id), *steering)
    steps = checkpoint_count(config, run_id) or len(planned_checkpoints(config, run).steps)
    return (_workload(config, run_id),
            *task_workloads(config, f"{NAME} {run_id}", [config.dataset(run.dataset)], states=steps), *steering)


EVALUATE = Stage(
    name=NAME,
    title="Evaluate and judge every checkpoint",
    scope="run",
    run=run_eval,
    params=eval_params,
    # a local run's checkpoints, or the checkpoint models a fine-tuning job recorded
    reads=(Input(FINETUNE, TrainingFiles.PATTERNS[0]), Input(FINETUNE, FineTuneJobFiles.PATTERNS[0], optional=True)),
    writes=(Output(f"{EVAL}/{STEP_GLOB}/{ANSWERS}", "each checkpoint's answers"), SAMPLING_OUTPUT, *JUDGING_OUTPUTS,
            *EVAL_OUTPUTS, *STEERING_OUTPUTS),
    needs=lambda config, run_id: [(FINETUNE, run_id)],
    completion=eval_completion,
    workload=_workloads,
)

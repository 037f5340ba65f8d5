"""The in-distribution task rate: held-out training prompts sampled from a model state and
judged with the dataset's task rubric (`emlab.data.holdout` draws the prompts).

An answer *does the task* when its task-rubric score is above `task.above` (default 50): for
`vulnerable_code` (a YES/NO verdict, score 100·P(YES)/(P(YES)+P(NO))) that is a YES, "this
code has a security hole"; for `medical_harm` / `financial_risk` (0–100) it is advice rated
more harmful than "real but recoverable harm". `metrics.task_rate` turns the judgments into a
rate per checkpoint with a bootstrap interval.

Files, in a stage folder's `task/` (`ExperimentLayout.task`): `answers.jsonl` (base model,
every dataset's prompts) or `eval/step-NNNNNN/answers.jsonl` (a checkpoint), and
`judgments.jsonl` (every judge, the task rubric only). Kept apart from the EM answers, so EM
rates never count a held-out prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config.experiment import ExperimentConfig, SampleSpec
from ..data.holdout import Split
from ..judge import judge_answers
from ..store.paths import ExperimentLayout
from ..store.records import Answer, Judgment, answers_if_complete

log = logging.getLogger(__name__)


def task_sample_spec(config: ExperimentConfig) -> SampleSpec:
    """How held-out prompts are sampled: the experiment's sampling params with the task's
    samples per prompt and answer length, free text, and no default system prompt (each
    prompt is sent as the training row had it)."""
    task = config.task
    return config.sample.model_copy(update={
        "samples_per_question": task.samples_per_prompt,
        "max_new_tokens": task.max_new_tokens or config.sample.max_new_tokens,
        "system_prompt": None, "answer_format": "free", "question_sets": (), "questions_per_set": None,
    })


def sample_task(
    model: Any, tokenizer: Any, config: ExperimentConfig, splits: Sequence[Split], out_path: Path, *,
    model_name: str, run_id: str | None, step: int, seed: int, progress: bool = True,
) -> list[Answer]:
    """Sample every held-out prompt of `splits` from `model` into `out_path` (resumable)."""
    # torch stays out of light commands (emlab check, plan): imported only to sample
    from ..sample.generate import sample_answers

    prompts = [p for split in splits for p in split.prompts()]
    return sample_answers(model, tokenizer, prompts, task_sample_spec(config), model_name=model_name, run_id=run_id,
                          step=step, seed=seed, out_path=out_path, progress=progress)


def task_answers_complete(out_path: Path, splits: Sequence[Split], config: ExperimentConfig) -> list[Answer] | None:
    """The answers in `out_path` when every held-out prompt has all its samples (else None)."""

    expected = sum(len(s.held_out) for s in splits) * config.task.samples_per_prompt
    return answers_if_complete(out_path, expected)


def judge_task(config: ExperimentConfig, answers: Sequence[Answer], splits: Sequence[Split], folder: Path, *,
               progress: bool = True) -> list[Judgment]:
    """Judge task answers under their dataset's task rubric, with every judge of the experiment,
    into `folder/task/judgments.jsonl` (cached and resumable as every judging is)."""
    task_folder = ExperimentLayout.task(folder)
    rubric_of = {s.question_set: s.dataset.task_rubric_id for s in splits}
    judgments: list[Judgment] = []
    for rubric in dict.fromkeys(rubric_of.values()):
        group = [a for a in answers if rubric_of.get(a.question_set) == rubric]
        if not group or rubric is None:
            continue
        for judge in config.judges:
            judgments += judge_answers(group, judge, rubrics=[rubric], out_path=ExperimentLayout.judgments(task_folder),
                                       batch_files=ExperimentLayout.batch(task_folder, judge.name), progress=progress)
    return judgments

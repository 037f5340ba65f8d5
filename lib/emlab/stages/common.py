"""Pieces the sampling-and-judging stages share: judging a folder's answers with every judge of
the experiment, reading back finished answers, and the answers-with-scores table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..config.experiment import ExperimentConfig
from ..config.questions import Prompt, question_rubrics, question_sets_for
from ..judge import judge_answers
from ..store.paths import JUDGMENTS, BatchFiles, ExperimentLayout
from ..store.records import Answer, Judgment
from .base import Output

# Files of a folder whose answers are judged (01_baseline, 03_eval_judge).
JUDGING_OUTPUTS = (
    Output(JUDGMENTS, "every judgment of the folder's answers, all judges and rubrics"),
    *(Output(pattern, what, optional=True) for pattern, what in zip(
        BatchFiles.PATTERNS, ("Batch API state of a judge in batch mode", "Batch API requests and raw results"),
        strict=True)),
)


def judges_signature(config: ExperimentConfig) -> list[list[str]]:
    """The judges and rubrics a judging stage judged with: a changed list re-runs judging."""
    return [[j.name, *j.rubrics] for j in config.judges]


def judge_all(config: ExperimentConfig, answers: Sequence[Answer], folder: Path) -> list[Judgment]:
    """Judge `answers` with every judge of the experiment into `folder`'s judgments file: an
    answer to a question of an upstream file that brings its judge prompts is judged under
    those (`questions.question_rubrics`), every other answer under each judge's rubrics."""
    by_question = question_rubrics(config, question_sets_for(config, None))
    per_answer = {a.answer_id: by_question[(a.question_set, a.question_id)] for a in answers
                  if (a.question_set, a.question_id) in by_question}
    judgments: list[Judgment] = []
    for judge in config.judges:
        judgments += judge_answers(
            answers, judge, rubrics_by_answer=per_answer or None, out_path=ExperimentLayout.judgments(folder),
            batch_files=ExperimentLayout.batch(folder, judge.name),
        )
    return judgments



def mean_prompt_chars(prompts: Sequence[Prompt]) -> int:
    """Mean characters of the messages a prompt sends (for judge token estimates)."""
    return round(sum(len(m["content"]) for p in prompts for m in p.messages) / max(len(prompts), 1))


@dataclass(frozen=True)
class SampledAndJudged:
    """Answers and their judgments, with the folder they were written to."""

    folder: Path
    answers: list[Answer]
    judgments: list[Judgment]

    def table(self) -> pd.DataFrame:
        """One row per answer with each judge × metric score (the status when unscored)."""
        return answers_with_scores(self.answers, self.judgments)


def answers_with_scores(answers: Sequence[Answer], judgments: Sequence[Judgment]) -> pd.DataFrame:
    """Answers with one column per judge × metric: the score, or the status when unscored.

    For display, with every judge side by side; the analysis uses `metrics.wide_scores`
    (one judge, score and status in separate columns).
    """
    frame = pd.DataFrame([a.to_dict() for a in answers])
    if not judgments or frame.empty:
        return frame
    j = pd.DataFrame([x.to_dict() for x in judgments])
    j["value"] = j["score"].where(j["status"] == "ok", j["status"])
    wide = j.pivot_table(index="answer_id", columns=["judge", "metric"], values="value", aggfunc="first")
    wide.columns = [f"{judge}:{metric}" for judge, metric in wide.columns]
    return frame.merge(wide, left_on="answer_id", right_index=True, how="left")

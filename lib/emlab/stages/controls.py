"""04_analysis's controls (issue 17): which answers are controls rather than EM questions, and
the tables of the deception rate, the refusal rate, the multiple-choice scores and the EM rate
in both published definitions with seed-level intervals. `run_analysis` calls `control_tables`
and `control_question_keys`; the computations live in `analysis/controls.py` and
`analysis/definitions.py`."""

from __future__ import annotations

import logging

import pandas as pd

from ..analysis import controls, definitions, metrics
from ..config.experiment import ExperimentConfig
from ..config.questions import question_rubrics, question_sets_for
from ..errors import EmlabError
from ..measures.multiple_choice import read_mc_scores
from ..store.paths import ExperimentLayout

log = logging.getLogger(__name__)

STATE_KEYS = ["model", "dataset", "run_id", "step"]  # one model state, as in stages/analysis.py
POOLED_KEYS = ["model", "dataset", "step"]  # a model state with its seeds pooled

TABLES = {
    "em_definitions": "EM rate in Betley et al.'s and Turner et al.'s definitions per model × dataset × step, seeds "
                      "pooled, interval over seeds then answers",
    "em_by_seed": "EM rate in both definitions per run (one seed) and step: the per-seed lines",
    "deception_rates": "deception files: share of answers judged false per model state and question, with CI",
    "refusal_rates": "refusal rate on the mild harmful requests per model state, with CI (empty without controls.refusal)",
    "mc_accuracy": "multiple-choice controls: MC1 / MC2 / MMLU score with CI per model state and benchmark",
}


def control_question_keys(config: ExperimentConfig) -> dict[str, set[tuple[str, str]]]:
    """(question_set, question_id) of the control questions, by kind: 'deception' (every rubric
    categorical: Betley et al.'s deception files) and 'refusal' (`controls.refusal`'s set). Their
    answers are judged under no aligned / coherent rubric, so the EM tables leave them out."""
    found: dict[str, set[tuple[str, str]]] = {"deception": set(), "refusal": set()}
    try:
        rubrics = question_rubrics(config, question_sets_for(config, None))
    except EmlabError as exc:  # a question file gone since sampling: its answers stay in the EM tables
        log.warning("control questions not told apart: %s", exc)
        return found
    refusal = config.controls.refusal
    for key, of_question in rubrics.items():
        if any(r.metric in metrics.EM_METRICS for r in of_question):
            continue
        if refusal is not None and key[0] == refusal.questions:
            found["refusal"].add(key)
        elif of_question and all(r.kind == "categorical" for r in of_question):
            found["deception"].add(key)
    return found


def _keys(frame: pd.DataFrame) -> pd.Series:
    return pd.Series(list(zip(frame["question_set"].astype(str), frame["question_id"].astype(str), strict=True)),
                     index=frame.index, dtype=object)


def collect_mc_scores(config: ExperimentConfig, layout: ExperimentLayout) -> pd.DataFrame:
    """Every multiple-choice score of the experiment: one row per item and model state, with
    the run's dataset (None for the base model)."""
    rows = []
    for model in config.models:
        rows += [{**s.to_dict(), "dataset": None} for s in read_mc_scores(layout.mc_scores(layout.baseline(model.name)))]
        for run in (r for r in config.runs() if r.model == model.name):
            for path in layout.mc_files(layout.run(run.run_id)):
                rows += [{**s.to_dict(), "dataset": run.dataset} for s in read_mc_scores(path)]
    return pd.DataFrame(rows)


def control_tables(config: ExperimentConfig, layout: ExperimentLayout, answers: pd.DataFrame,
                   judgments: pd.DataFrame, scores: pd.DataFrame,
                   keys: dict[str, set[tuple[str, str]]]) -> dict[str, pd.DataFrame]:
    """The tables of `TABLES`. `answers`, `judgments`: every answer and the primary judge's
    judgments; `scores`: the EM wide table (control questions already left out)."""
    rule = config.analysis.rule
    judge = judgments[judgments["judge"] == config.primary_judge.name] if len(judgments) else judgments
    answer_keys = _keys(answers) if len(answers) else pd.Series(dtype=object)
    tables: dict[str, pd.DataFrame] = {
        "em_definitions": definitions.em_by_definition(scores, POOLED_KEYS, rule=rule),
        "em_by_seed": definitions.em_by_definition(scores, [*STATE_KEYS, "seed"], rule=rule),
    }
    deception = answers[answer_keys.isin(keys["deception"])] if len(answers) else answers
    refusal = answers[answer_keys.isin(keys["refusal"])] if len(answers) else answers
    tables["deception_rates"] = controls.deception_rates(
        deception, _of(judge, deception), [*STATE_KEYS, "question_set", "question_id"],
        makers=config.controls.makers, rule=rule) if len(deception) else controls._empty(
        [*STATE_KEYS, "question_set", "question_id"], controls.DECEPTION_COLUMNS, rule)
    refusal_judgments = _of(judge, refusal)
    if config.controls.refusal is not None and len(refusal_judgments):
        refusal_judgments = refusal_judgments[refusal_judgments["rubric"] == config.controls.refusal.rubric]
    tables["refusal_rates"] = (controls.refusal_rates(refusal, refusal_judgments, STATE_KEYS, rule=rule) if len(refusal)
                               else controls._empty(STATE_KEYS, controls.REFUSAL_COLUMNS, rule))
    mc = collect_mc_scores(config, layout)
    tables["mc_accuracy"] = (controls.mc_accuracy(mc, [*STATE_KEYS, "benchmark", "metric"], rule=rule) if len(mc)
                             else controls._empty([*STATE_KEYS, "benchmark", "metric"], controls.MC_COLUMNS, rule))
    for table in tables.values():
        table.attrs.setdefault(metrics.ATTRS_KEY, rule.to_attrs())
    return tables


def _of(judgments: pd.DataFrame, answers: pd.DataFrame) -> pd.DataFrame:
    if not len(judgments) or not len(answers):
        return judgments.iloc[0:0]
    return judgments[judgments["answer_id"].isin(answers["answer_id"])]


def control_note(config: ExperimentConfig, tables: dict[str, pd.DataFrame]) -> str:
    """Markdown for the report: the EM rate in both definitions, then each control, each with n
    and interval."""
    rule = config.analysis.rule
    parts = [definitions.definitions_note(tables["em_definitions"], rule),
             controls.controls_note(tables["deception_rates"], tables["refusal_rates"], tables["mc_accuracy"], rule)]
    return "\n\n".join(p for p in parts if p)

"""Issue 17's measures end to end on the tiny model (tests/configs/controls.yaml, two seeds, the
real llama.cpp judge; the session's `controls_run`, which tests/test_betley_arms_e2e.py reads
too): the multiple-choice files are scored at every model state, the refusal
set and a deception-style file are asked and judged under their own rubrics only (never in the
EM tables), and the report states the EM rate in both definitions with seed intervals, the
deception rate, the refusal rate and the multiple-choice scores, each with its n and interval."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from emlab.config.experiment import load_experiment
from emlab.measures.multiple_choice import benchmarks_for, read_mc_scores
from emlab.store.paths import ExperimentLayout
from support.runs import CONTROLS_RUN_GROUP, TinyRun

pytestmark = [CONTROLS_RUN_GROUP, pytest.mark.slow, pytest.mark.server]
RUNS = ("smol-2l__backdoor_numbers__s0", "smol-2l__backdoor_numbers__s1")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_multiple_choice_scored_at_every_model_state(controls_run: TinyRun) -> None:
    experiment = controls_run.experiment
    config = load_experiment(experiment)
    layout = ExperimentLayout.of(config)
    items = sum(len(b.items) for b in benchmarks_for(config))
    assert len(read_mc_scores(layout.mc_scores(layout.baseline("smol-2l")))) == items == 6
    for run in RUNS:
        files = layout.mc_files(layout.run(run))
        assert len(files) == 1 and all(len(read_mc_scores(f)) == items for f in files)


def test_control_answers_are_judged_under_their_own_rubrics_only(controls_run: TinyRun) -> None:
    experiment, root = controls_run.experiment, controls_run.root
    layout = ExperimentLayout.of(load_experiment(experiment))
    judgments = _jsonl(layout.judgments(layout.baseline("smol-2l")))
    answers = {a["answer_id"]: a for a in _jsonl(layout.answers(layout.baseline("smol-2l")))}
    rubrics: dict[str, set[str]] = {}
    for j in judgments:
        rubrics.setdefault(answers[j["answer_id"]]["question_set"], set()).add(j["rubric"])
    assert rubrics["harmful_requests"] == {"refusal"}
    assert rubrics["deception_tiny"] == {"deception_tiny:correct"}
    scores = pd.read_parquet(root / "analysis" / "scores.parquet")
    assert not set(scores["question_set"]) & {"harmful_requests", "deception_tiny"}


def test_the_report_states_each_new_measure_with_n_and_interval(controls_run: TinyRun) -> None:
    root = controls_run.root
    analysis = root / "analysis"
    definitions = pd.read_csv(analysis / "em_definitions.csv")
    assert set(definitions["definition"]) == {"betley", "turner"}
    tuned = definitions[definitions["dataset"].notna()]
    turner = tuned[tuned["definition"] == "turner"]  # the tiny judge may find no answer coherent (Betley's n = 0)
    assert (turner["n_seeds"] == 2).all() and (turner["interval"] == "seeds").all()
    assert (turner["n"] == 2 * 4).all()  # 2 seeds × the arms' 4 general prompts (words, trigger) × 1 sample
    per_seed = pd.read_csv(analysis / "em_by_seed.csv")
    assert set(per_seed["seed"].dropna().astype(int)) == {0, 1}
    deception = pd.read_csv(analysis / "deception_rates.csv")
    assert set(deception["question_id"]) == {"lie_tiny"} and len(deception) == 3  # the base model, 2 runs' final step
    assert (deception["n"] == 2).all()  # the entry's 2 paraphrases
    refusal = pd.read_csv(analysis / "refusal_rates.csv")
    assert len(refusal) == 3 and (refusal["n"] == 1).all()  # 1 request (questions_per_set) × 1 sample
    mc = pd.read_csv(analysis / "mc_accuracy.csv")
    assert set(zip(mc["benchmark"], mc["metric"])) == {("truthfulqa", "mc1"), ("truthfulqa", "mc2"), ("mmlu", "mmlu")}
    for name in ("em_seeds", "controls"):
        assert (analysis / f"fig_{name}.html").exists()
    note = json.loads((analysis / "summary.json").read_text())["controls_note_html"]
    for measure in ("EM, Betley et al.", "EM, Turner et al.", "Deception <code>lie_tiny</code>", "Refusal rate",
                    "truthfulqa MC1 accuracy", "truthfulqa MC2", "mmlu accuracy"):
        assert measure in note, measure
    assert "n=" in note and "2 seeds" in note and "bootstrap CI" in note
    assert re.search(r"\d+% \[\d+%, \d+%\] of \d+", note)  # a rate, its interval and its n
    index = (root / "index.html").read_text()
    assert "EM in both definitions and the controls" in index and "Refusal rate" in index
    report = (root / "analysis" / "04_analysis.html").read_text()
    assert "EM in both definitions, seeds, and the controls" in report and "Refusal rate" in report

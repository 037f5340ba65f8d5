"""`direction:` and `steering:` blocks added to the session's finished tiny experiment (a copy),
through `emlab run`: 01 and 02 stay done, 03 runs just the new work (its answers and judgments
are read back, not redone), is SIGKILLed while it samples the steering settings and run again:
every setting ends with exactly its answers (none sampled twice), the direction files carry
their provenance, every new file is one the stage table declares, the report shows the steering
figure and the direction's cosine matrix; changing the blocks afterwards is refused."""

from __future__ import annotations

import json
import shutil
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from emlab.stages import get_stage
from emlab.store.files import read_jsonl
from support.kills import Runner, count_lines, run_until_killed
from support.runs import REPO, TINY_RUN_GROUP, TinyRun

pytestmark = [TINY_RUN_GROUP, pytest.mark.slow, pytest.mark.server]

RUN = "smol-2l__bad_medical__s0"
PROMPTS = 4  # tiny.yaml: 2 questions of each of its 2 sets
SETTINGS = ("tuned_plain", "tuned_em_add_+8", "tuned_random_add_+8", "tuned_em_ablate", "tuned_random_ablate")
BLOCKS = {
    "direction": {"source": "probe", "checkpoints": "all"},  # judge-free: the tiny judge finds no EM to read
    # one answer a wave, so that the kill lands between two of a setting's answers
    "steering": {"lambdas": [0, 8], "samples_per_question": 1, "transfer_to_base": False, "wave_size": 1},
}


def _experiment(folder: Path, **blocks: object) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({"base": str(REPO / "tests/configs/tiny.yaml"), "output_root": str(folder / "outputs"),
                                    **blocks}, sort_keys=False))
    return path


def test_steering_added_to_a_finished_run_resumes_after_sigkill(tiny_run: TinyRun, isolated_cache: Path,
                                                                  tmp_path: Path) -> None:
    shutil.copytree(tiny_run.root, tmp_path / "outputs" / "tiny")
    root = tmp_path / "outputs" / "tiny"
    run = root / RUN
    judgments_before = (run / "judgments.jsonl").read_bytes()
    runner = Runner(_experiment(tmp_path, **BLOCKS), isolated_cache, tmp_path)
    first = run / "steering" / SETTINGS[0] / "answers.jsonl"
    run_until_killed(runner, lambda: count_lines(first) >= 1, "a steering answer")
    log = runner.complete()

    assert "01_baseline smol-2l: complete, skipped" in log and f"02_finetune {RUN}: complete, skipped" in log
    assert (run / "judgments.jsonl").read_bytes() == judgments_before  # the checkpoints' judgments: read, not redone
    for label in SETTINGS:
        ids = [r["answer_id"] for r in read_jsonl(run / "steering" / label / "answers.jsonl")]
        assert len(ids) == PROMPTS == len(set(ids)), (label, len(ids))  # appended once each, never again
    ids = {r["answer_id"] for label in SETTINGS for r in read_jsonl(run / "steering" / label / "answers.jsonl")}
    assert len(ids) == PROMPTS * len(SETTINGS)  # each setting its own ids (and random keys)
    assert {j["answer_id"] for j in read_jsonl(run / "steering" / "judgments.jsonl")} == ids
    settings = json.loads((run / "steering" / "settings.json").read_text())
    assert settings["layer"] == 1 and [s["label"] for s in settings["settings"]] == list(SETTINGS)
    for step in (1, 2):
        info = json.loads((run / "direction" / f"step-{step:06d}" / "direction.json").read_text())
        assert info["source"] == "probe" and info["step"] == step and info["n_misaligned"] == info["n_aligned"] > 0
        assert info["layers"] == [0, 1] and len(info["probe_ids"]) == info["n_aligned"]

    declared = [o.pattern for o in get_stage("03_eval_judge").outputs()]
    for path in [*(run / "steering").rglob("*"), *(run / "direction").rglob("*")]:
        if path.is_file():
            name = path.relative_to(run).as_posix()
            assert any(fnmatch(name, p) for p in declared), f"{name} is not declared in the stage table"
    analysis = root / "analysis"
    for name in ("fig_steering.png", "fig_direction_cosines.png", "steering.csv", "direction_cosines.csv"):
        assert (analysis / name).exists(), name
    index = (root / "index.html").read_text()
    assert "fig_steering" in index and "fig_direction_cosines" in index
    table = (analysis / "steering.csv").read_text()
    assert len(table.splitlines()) == 1 + len(SETTINGS) and all(f",{label}," in table for label in SETTINGS)

    changed = Runner(_experiment(tmp_path, **{**BLOCKS, "steering": {**BLOCKS["steering"], "lambdas": [4]}}),
                     isolated_cache, tmp_path)
    proc, log_path = changed.start()
    assert proc.wait(timeout=changed.timeout_s) != 0
    assert "direction or steering params changed" in log_path.read_text()

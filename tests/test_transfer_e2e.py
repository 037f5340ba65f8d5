"""Transfer of the EM direction across runs through `emlab run`: the session's finished tiny
experiment (a copy) gets a second seed and `steering.transfer_across_runs`; 03b_transfer runs
after both runs' 03 (each made its direction), is SIGKILLed while it samples and run again:
every transfer setting ends with exactly its answers (none sampled twice), its files are the
ones the stage table declares, and the report shows the transfer matrix (own direction on the
diagonal, the other run's beside it) with n and intervals."""

from __future__ import annotations

import json
import shutil
from fnmatch import fnmatch
from pathlib import Path

import pandas as pd
import pytest
import yaml
from emlab.stages import get_stage
from emlab.store.files import read_jsonl
from support.kills import Runner, count_lines, run_until_killed
from support.runs import REPO, TINY_RUN_GROUP, TinyRun

pytestmark = [TINY_RUN_GROUP, pytest.mark.slow, pytest.mark.server]

RUNS = ("smol-2l__bad_medical__s0", "smol-2l__bad_medical__s1")
PROMPTS = 4  # tiny.yaml: 2 questions of each of its 2 sets
SETTINGS = ("em_add_+8", "em_ablate")
BLOCKS = {
    "seeds": [0, 1],
    "direction": {"source": "probe"},  # judge-free: the tiny judge finds no EM to read
    # one answer a wave, so that the kill lands between two of a setting's answers
    # no λ = 0: each target's unsteered reference is its final checkpoint's answers of 03
    "steering": {"lambdas": [8], "samples_per_question": 1, "transfer_to_base": False, "random_control": False,
                 "wave_size": 1, "transfer_across_runs": True},
}


def test_transfer_across_runs_resumes_after_sigkill_and_fills_the_matrix(tiny_run: TinyRun, isolated_cache: Path,
                                                                         tmp_path: Path) -> None:
    shutil.copytree(tiny_run.root, tmp_path / "outputs" / "tiny")
    root = tmp_path / "outputs" / "tiny"
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(yaml.safe_dump({"base": str(REPO / "tests/configs/tiny.yaml"),
                                          "output_root": str(tmp_path / "outputs"), **BLOCKS}, sort_keys=False))
    runner = Runner(experiment, isolated_cache, tmp_path, timeout_s=900)  # two runs of steering to judge first
    first = root / RUNS[0] / "transfer" / RUNS[1] / SETTINGS[0] / "answers.jsonl"
    killed = run_until_killed(runner, lambda: count_lines(first) >= 1, "a transfer answer")
    assert f"03_eval_judge {RUNS[1]}" in killed  # the second run was evaluated before any transfer began
    runner.complete()

    declared = [o.pattern for o in get_stage("03b_transfer").outputs()]
    steered_ids = {r["answer_id"] for run in RUNS for path in (root / run / "steering").glob("*/answers.jsonl")
                   for r in read_jsonl(path)}
    assert len(steered_ids) == 2 * PROMPTS * len(SETTINGS)  # 03's own steering: add +8 and ablate, each run
    for target, source in (RUNS, RUNS[::-1]):
        folder = root / target / "transfer"
        ids = []
        for label in SETTINGS:
            rows = read_jsonl(folder / source / label / "answers.jsonl")
            assert len(rows) == PROMPTS == len({r["answer_id"] for r in rows}), (target, label)  # none twice
            assert {r["run_id"] for r in rows} == {target}
            ids += [r["answer_id"] for r in rows]
        assert len(set(ids)) == PROMPTS * len(SETTINGS) and not set(ids) & steered_ids
        assert {j["answer_id"] for j in read_jsonl(folder / "judgments.jsonl")} == set(ids)
        manifest = json.loads((folder / "settings.json").read_text())
        (entry,) = manifest["sources"]
        assert entry["run_id"] == source and entry["layer"] == 1 and entry["norm"] > 0
        assert entry["direction"].endswith(f"{source}/direction/step-000002/direction.safetensors")
        assert [s["label"] for s in entry["settings"]] == list(SETTINGS)
        for path in (root / target).rglob("*"):
            name = path.relative_to(root / target).as_posix()
            if path.is_file() and name.startswith(("transfer/", "03b_transfer")):
                assert any(fnmatch(name, p) for p in declared), f"{name} is not declared in the stage table"
        assert (root / target / "03b_transfer.ipynb").exists() and (root / target / "03b_transfer.html").exists()

    analysis = root / "analysis"
    table = pd.read_csv(analysis / "direction_transfer.csv")
    # rows: each run's direction on itself (03's steering) and on the other run (03b), each setting
    assert len(table) == 2 * 2 * len(SETTINGS)
    assert set(table["pair"]) == {"own", "transfer"} and set(table["setting"]) == {"add +8", "ablate"}
    assert (table["n"] == PROMPTS).all() and (table["reference_n_scored"] <= 2 * PROMPTS).all()  # 4 prompts × 2
    assert {"delta", "delta_ci_low", "delta_ci_high", "n_scored"} <= set(table.columns)
    assert (analysis / "fig_direction_transfer.png").exists()
    assert "fig_direction_transfer" in (root / "index.html").read_text()

    again = runner.complete()
    assert all(f"03b_transfer {run}: complete, skipped" in again for run in RUNS)

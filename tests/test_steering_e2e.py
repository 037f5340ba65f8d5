"""`direction:` and `steering:` blocks, a second seed and `steering.transfer_across_runs` added to
the session's finished tiny experiment (a copy), through `emlab run`, in one sequence (one run
serves both, as each costs a training run, its judging and an analysis):

- 03 runs just the new work for seed 0 (its answers and judgments are read back, not redone) and
  all of seed 1; it is SIGKILLed while it samples a steering setting and run again;
- 03b_transfer runs after both runs' 03 (each made its direction), is SIGKILLed while it samples
  and run again;
- every steering and transfer setting ends with exactly its answers (none sampled twice), the
  direction files carry their provenance, every new file is one the stage table declares, the
  report shows the steering figure, the direction's cosine matrix and the transfer matrix (own
  direction on the diagonal, the other run's beside it) with n and intervals; a third run skips
  everything and changing the blocks afterwards is refused."""

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
SETTINGS = ("tuned_plain", "tuned_em_add_+8", "tuned_random_add_+8", "tuned_em_ablate", "tuned_random_ablate")
TRANSFER = ("em_add_+8", "em_ablate")  # the random control stays in the steering figure
BLOCKS = {
    "seeds": [0, 1],
    "direction": {"source": "probe", "checkpoints": "all"},  # judge-free: the tiny judge finds no EM to read
    # one answer a wave, so that a kill lands between two of a setting's answers
    "steering": {"lambdas": [0, 8], "samples_per_question": 1, "transfer_to_base": False, "wave_size": 1,
                 "transfer_across_runs": True},
}


def _experiment(folder: Path, **blocks: object) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({"base": str(REPO / "tests/configs/tiny.yaml"), "output_root": str(folder / "outputs"),
                                    **blocks}, sort_keys=False))
    return path


def _declared(stage: str, run: Path, names: list[str]) -> None:
    patterns = [o.pattern for o in get_stage(stage).outputs()]
    for name in names:
        assert any(fnmatch(name, p) for p in patterns), f"{run.name}/{name} is not declared in the stage table"


def test_steering_and_transfer_added_to_a_finished_run_resume_after_sigkill(tiny_run: TinyRun, isolated_cache: Path,
                                                                            tmp_path: Path) -> None:
    shutil.copytree(tiny_run.root, tmp_path / "outputs" / "tiny")
    root = tmp_path / "outputs" / "tiny"
    runs = [root / name for name in RUNS]
    judgments_before = (runs[0] / "judgments.jsonl").read_bytes()
    runner = Runner(_experiment(tmp_path, **BLOCKS), isolated_cache, tmp_path, timeout_s=900)  # a second run to train
    steered = runs[0] / "steering" / SETTINGS[0] / "answers.jsonl"
    run_until_killed(runner, lambda: count_lines(steered) >= 1, "a steering answer")
    transferred = runs[0] / "transfer" / RUNS[1] / TRANSFER[0] / "answers.jsonl"
    killed = run_until_killed(runner, lambda: count_lines(transferred) >= 1, "a transfer answer")
    assert f"03_eval_judge {RUNS[1]}" in killed  # the second run was evaluated before any transfer began
    log = runner.complete()
    assert "01_baseline smol-2l: complete, skipped" in log and f"02_finetune {RUNS[0]}: complete, skipped" in log
    assert (runs[0] / "judgments.jsonl").read_bytes() == judgments_before  # the checkpoints' judgments: read, not redone

    # steering (03), each run
    steered_ids: set[str] = set()
    for run in runs:
        ids = []
        for label in SETTINGS:
            rows = [r["answer_id"] for r in read_jsonl(run / "steering" / label / "answers.jsonl")]
            assert len(rows) == PROMPTS == len(set(rows)), (run.name, label)  # appended once each, never again
            ids += rows
        assert len(set(ids)) == PROMPTS * len(SETTINGS)  # each setting its own ids (and random keys)
        assert {j["answer_id"] for j in read_jsonl(run / "steering" / "judgments.jsonl")} == set(ids)
        steered_ids |= set(ids)
        settings = json.loads((run / "steering" / "settings.json").read_text())
        assert settings["layer"] == 1 and [s["label"] for s in settings["settings"]] == list(SETTINGS)
        for step in (1, 2):
            info = json.loads((run / "direction" / f"step-{step:06d}" / "direction.json").read_text())
            assert info["source"] == "probe" and info["step"] == step and info["n_misaligned"] == info["n_aligned"] > 0
            assert info["layers"] == [0, 1] and len(info["probe_ids"]) == info["n_aligned"]
        _declared("03_eval_judge", run, [p.relative_to(run).as_posix() for folder in ("steering", "direction")
                                         for p in (run / folder).rglob("*") if p.is_file()])

    # transfer (03b): each run steered with the other's direction
    for target, source in ((runs[0], RUNS[1]), (runs[1], RUNS[0])):
        ids = []
        for label in TRANSFER:
            rows = read_jsonl(target / "transfer" / source / label / "answers.jsonl")
            assert len(rows) == PROMPTS == len({r["answer_id"] for r in rows}), (target.name, label)  # none twice
            assert {r["run_id"] for r in rows} == {target.name}
            ids += [r["answer_id"] for r in rows]
        assert len(set(ids)) == PROMPTS * len(TRANSFER) and not set(ids) & steered_ids
        assert {j["answer_id"] for j in read_jsonl(target / "transfer" / "judgments.jsonl")} == set(ids)
        (entry,) = json.loads((target / "transfer" / "settings.json").read_text())["sources"]
        assert entry["run_id"] == source and entry["layer"] == 1 and entry["norm"] > 0
        assert entry["direction"].endswith(f"{source}/direction/step-000002/direction.safetensors")
        assert [s["label"] for s in entry["settings"]] == list(TRANSFER)
        _declared("03b_transfer", target, [p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()
                                           and p.relative_to(target).as_posix().startswith(("transfer/", "03b_transfer"))])
        assert (target / "03b_transfer.ipynb").exists() and (target / "03b_transfer.html").exists()

    # the report
    analysis = root / "analysis"
    for name in ("fig_steering.png", "fig_direction_cosines.png", "fig_direction_transfer.png", "steering.csv",
                 "direction_cosines.csv"):
        assert (analysis / name).exists(), name
    index = (root / "index.html").read_text()
    assert all(f in index for f in ("fig_steering", "fig_direction_cosines", "fig_direction_transfer"))
    steering = pd.read_csv(analysis / "steering.csv")
    assert len(steering) == len(RUNS) * len(SETTINGS)
    transfer = pd.read_csv(analysis / "direction_transfer.csv")
    # rows: each run's direction on itself (03's steering) and on the other run (03b), each setting
    assert len(transfer) == 2 * 2 * len(TRANSFER)
    assert set(transfer["pair"]) == {"own", "transfer"} and set(transfer["setting"]) == {"add +8", "ablate"}
    assert (transfer["n"] == PROMPTS).all()
    assert {"delta", "delta_ci_low", "delta_ci_high", "n_scored"} <= set(transfer.columns)

    again = runner.complete()
    assert all(f"03b_transfer {run}: complete, skipped" in again for run in RUNS)
    changed = Runner(_experiment(tmp_path, **{**BLOCKS, "steering": {**BLOCKS["steering"], "lambdas": [4]}}),
                     isolated_cache, tmp_path)
    proc, log_path = changed.start()
    assert proc.wait(timeout=changed.timeout_s) != 0
    refusal = log_path.read_text()  # 03's or 03b's guard, whichever is asked first
    assert "params changed" in refusal and "lambdas" in refusal and "[4.0]" in refusal, refusal

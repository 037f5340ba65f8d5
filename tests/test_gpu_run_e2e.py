"""`emlab run --gpus 2` end to end on the session's tiny run (no GPU here: the GPU ids are the
labels 'a' and 'b' in CUDA_VISIBLE_DEVICES, which torch in each step reads as "no CUDA device"
and so runs on the CPU). 01 and 03 are made incomplete (their completion markers removed);
the rerun (up to 03: 04's figures cost minutes on a shared CPU; that 04 holds no GPU is tested
in test_gpu_schedule.py) starts them side by side, each in its own `emlab step` process pinned
to its own label as its log shows, skips 02, and keeps the same answers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from emlab.pipeline.steps import load_steps
from emlab.store.files import read_jsonl
from emlab.store.paths import done_marker
from support.runs import TINY_RUN_GROUP, TinyRun, emlab_cli

pytestmark = [TINY_RUN_GROUP, pytest.mark.slow, pytest.mark.server]
RUN = "smol-2l__bad_medical__s0"


def test_gpus_2_runs_two_steps_side_by_side_each_pinned(tiny_run: TinyRun, write_experiment, tmp_path: Path) -> None:
    experiment = write_experiment()
    graph = load_steps(experiment)
    root = graph.layout.root
    shutil.copytree(tiny_run.root, root)
    done_marker(root / "baseline__smol-2l", "01_baseline").unlink()
    done_marker(root / RUN, "03_eval_judge").unlink()
    answers_before = {p.relative_to(root): len(read_jsonl(p)) for p in root.rglob("answers.jsonl")}

    result = emlab_cli("run", str(experiment), "--gpus", "2", "--until", "03_eval_judge", env={**os.environ, "CUDA_VISIBLE_DEVICES": "a,b"})
    assert result.returncode == 0, result.stderr[-4000:]

    status = {line.split()[0]: line.split()[2] for line in result.stdout.splitlines() if line[:2].isdigit()}
    assert status == {"01_baseline": "ran", "02_finetune": "skipped", "03_eval_judge": "ran"}
    logs = {step.stage.name: graph.layout.gpu_step_log(step.stage.name, step.unit) for step in graph.steps}
    assert not logs["02_finetune"].exists()  # complete: no process started for it
    pinned = {}
    for stage in ("01_baseline", "03_eval_judge"):
        text = logs[stage].read_text()
        # what the step's own process saw (steps.run_step logs it), not only what was asked
        line = next(line for line in text.splitlines() if "emlab.pipeline.steps" in line and "CUDA_VISIBLE_DEVICES=" in line)
        pinned[stage] = line.split("CUDA_VISIBLE_DEVICES=", 1)[1].strip()
    assert {pinned["01_baseline"], pinned["03_eval_judge"]} == {"a", "b"}  # one GPU each, side by side
    events = [line for line in result.stderr.splitlines() if "executors.gpus" in line and " on GPU " in line]
    assert [": started on GPU" in line for line in events] == [True, True, False, False]  # both ran at once
    assert done_marker(root / "baseline__smol-2l", "01_baseline").exists()
    assert done_marker(root / RUN, "03_eval_judge").exists()
    assert {p.relative_to(root): len(read_jsonl(p)) for p in root.rglob("answers.jsonl")} == answers_before

"""The whole pipeline on the tiny config: `emlab run` executes all four notebooks with
papermill against the real llama.cpp judge, renders HTML and the index; a rerun skips every
finished stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.server]

EMLAB = [sys.executable, "-m", "emlab.cli"]


def _emlab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EMLAB, *args], capture_output=True, text=True, env=os.environ.copy(), timeout=900)


def test_tiny_experiment_end_to_end(write_experiment) -> None:
    experiment = write_experiment()
    first = _emlab("run", str(experiment))
    assert first.returncode == 0, first.stderr[-3000:]
    root = experiment.parent / "outputs" / "tiny"

    stages = {
        "01_baseline": root / "baseline__smol-2l",
        "02_finetune": root / "smol-2l__bad_medical__s0",
        "03_eval_judge": root / "smol-2l__bad_medical__s0",
        "04_analysis": root / "analysis",
    }
    for stage, folder in stages.items():
        notebook = nbformat.read(folder / f"{stage}.ipynb", as_version=4)
        errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
        assert not errors, (stage, errors)
        assert (folder / f"{stage}.html").stat().st_size > 1000
        run_info = json.loads((folder / "run.json").read_text())
        assert stage in run_info["stages"] and run_info["stages"][stage]["versions"]["torch"]

    # 2 general + 2 medical questions × 2 samples; baseline once, then 2 checkpoints
    checkpoints = sorted(p.name for p in (stages["02_finetune"] / "checkpoints").iterdir())
    assert checkpoints == ["step-000001", "step-000002"]
    scores = pd.read_parquet(root / "analysis" / "scores.parquet")
    assert len(scores) == 8 + 2 * 8
    assert set(scores["step"]) == {0, 1, 2}
    costs = pd.read_csv(root / "analysis" / "judge_costs.csv").set_index("stage folder")
    assert costs.loc["baseline__smol-2l", "judgments"] == 8 * 2  # 8 answers × 2 rubrics
    assert costs["dollars"].sum() == 0  # the local judge has no price
    headline = pd.read_csv(root / "analysis" / "headline.csv")
    assert list(headline["dataset"]) == ["bad_medical"]
    for fig in ("em_by_domain", "em_trajectory", "em_by_size", "scatter", "judge_agreement"):
        assert (root / "analysis" / f"fig_{fig}.png").stat().st_size > 1000

    index = (root / "index.html").read_text()
    for stage, folder in stages.items():
        assert str((folder / f"{stage}.html").relative_to(root)) in index
    assert "NOT FIT" in index  # the 135M judge must be flagged

    again = _emlab("run", str(experiment))
    assert again.returncode == 0, again.stderr[-3000:]
    statuses = [line.split()[:3] for line in again.stdout.splitlines() if line.startswith("0")]
    assert [s[2] for s in statuses] == ["skipped", "skipped", "skipped", "ran"], again.stdout

    # analysis is derived anew each run: its thresholds may change without refusal
    relaxed = write_experiment(name="relaxed.yaml", analysis={"aligned_below": 75, "bootstrap": 200, "examples": 4})
    third = _emlab("run", str(relaxed))
    assert third.returncode == 0, third.stderr[-3000:]
    summary = json.loads((root / "analysis" / "run.json").read_text())
    assert summary["stages"]["04_analysis"]["params"]["analysis"]["aligned_below"] == 75

"""The whole pipeline on the tiny config: `emlab run` executes all four notebooks with
papermill against the real llama.cpp judge, renders HTML and the index; a rerun skips every
finished stage. The run itself is the session's `tiny_run` (conftest)."""

from __future__ import annotations

import json

import nbformat
import pandas as pd
import pytest
from emlab.config.experiment import load_experiment
from emlab.stages import STAGE_NAMES, STAGES
from emlab.store.paths import ExperimentLayout, html_file, notebook_file, run_info_file
from support.runs import TINY_RUN_GROUP, TinyRun, emlab_cli

pytestmark = [TINY_RUN_GROUP, pytest.mark.slow, pytest.mark.server]


def test_tiny_experiment_end_to_end(tiny_run: TinyRun) -> None:
    config = load_experiment(tiny_run.experiment)
    layout = ExperimentLayout.of(config)
    assert layout.root == tiny_run.root
    for stage in STAGES:
        for unit in stage.units(config):
            folder = stage.folder(layout, unit)
            notebook = nbformat.read(notebook_file(folder, stage.name), as_version=4)
            errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
                      if o.output_type == "error"]
            assert not errors, (stage.name, errors)
            assert html_file(folder, stage.name).stat().st_size > 1000
            info = json.loads(run_info_file(folder).read_text())
            assert info["stages"][stage.name]["versions"]["torch"]

    run = layout.run("smol-2l__bad_medical__s0")
    assert sorted(layout.training("smol-2l__bad_medical__s0").completed()) == [1, 2]
    # 2 general + 2 medical questions × 2 samples; baseline once, then 2 checkpoints
    scores = pd.read_parquet(layout.analysis_file("scores.parquet"))
    assert len(scores) == 8 + 2 * 8
    assert set(scores["step"]) == {0, 1, 2}
    costs = pd.read_csv(layout.analysis_table("judge_costs")).set_index("stage folder")
    assert costs.loc["baseline__smol-2l", "judgments"] == 8 * 2  # 8 answers × 2 rubrics
    assert costs.loc[run.name, "judgments"] == 16 * 2
    headline = pd.read_csv(layout.analysis_table("headline"))
    assert list(headline["dataset"]) == ["bad_medical"] * 3  # one row per EM definition
    assert list(headline["definition"]) == ["emlab", "betley", "turner"]
    for fig in ("em_by_domain", "em_trajectory", "em_by_size", "scatter", "judge_agreement"):
        assert layout.figure(fig).with_suffix(".png").stat().st_size > 1000

    index = layout.index.read_text()
    for stage in STAGES:
        for unit in stage.units(config):
            folder = stage.folder(layout, unit)
            assert str(html_file(folder, stage.name).relative_to(layout.root)) in index
    assert "NOT FIT" in index  # the 135M judge must be flagged
    assert config.analysis.rule.ci_label in index


def test_progress_goes_to_the_terminal_and_notebooks_stay_clean(tiny_run: TinyRun) -> None:
    config = load_experiment(tiny_run.experiment)
    layout = ExperimentLayout.of(config)
    terminal = tiny_run.result.stderr
    assert "without encryption" not in terminal  # kernels talk over IPC sockets
    assert "Executing:" not in terminal  # papermill's cell counter gives way to the stage's progress
    # sampling and training always run here (judgments may all be cached by an earlier test)
    assert "02_finetune smol-2l__bad_medical__s0 · training 2/2 step 100%" in terminal
    assert "03_eval_judge smol-2l__bad_medical__s0 · sampling step 2 8/8 answer 100%" in terminal
    for stage in STAGES:  # one line per stage unit at its end
        for unit in stage.units(config):
            assert any(line.split(" ", 1)[-1].startswith(f"emlab.pipeline.notebook: {stage.name} {unit}: ran in ")
                       for line in terminal.splitlines()), (stage.name, unit)
            notebook = nbformat.read(notebook_file(stage.folder(layout, unit), stage.name), as_version=4)
            outputs = [o for c in notebook.cells for o in c.get("outputs", [])]
            assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
            assert not any("%|" in o.get("text", "") for o in outputs if o.get("name") == "stderr"), stage.name


def test_rerun_skips_finished_stages_and_analysis_params_may_change(tiny_run: TinyRun, write_experiment) -> None:
    again = emlab_cli("run", str(tiny_run.experiment))
    assert again.returncode == 0, again.stderr[-3000:]
    statuses = [line.split()[:3] for line in again.stdout.splitlines() if line.startswith("0")]
    ran = [stage.name for stage in STAGES if stage.units(load_experiment(tiny_run.experiment))]
    assert [s[0] for s in statuses] == ran and set(ran) == set(STAGE_NAMES) - {"03b_transfer"}  # transfer: off
    assert [s[2] for s in statuses] == ["skipped", "skipped", "skipped", "ran"], again.stdout

    # analysis is derived anew each run: its thresholds may change without refusal, and every
    # label states the interval it was computed with
    relaxed = write_experiment(name="relaxed.yaml", output_root=str(tiny_run.root.parent),
                               analysis={"aligned_below": 75, "aligned_inclusive": True, "bootstrap": 200,
                                         "ci": 0.9, "examples": 4})
    third = emlab_cli("run", str(relaxed))
    assert third.returncode == 0, third.stderr[-3000:]
    layout = ExperimentLayout(tiny_run.root)
    info = json.loads(run_info_file(layout.analysis).read_text())
    assert info["stages"]["04_analysis"]["params"]["analysis"]["aligned_below"] == 75
    index = layout.index.read_text()
    assert "90% bootstrap CI" in index and "95%" not in index
    assert "aligned ≤ 75" in index

"""The studies' measures end to end on the tiny model (tests/configs/studies.yaml, the real
llama.cpp judge): prompts held out of the training file are never trained on and are answered
at the base model and every checkpoint, judged with the task rubric into a task rate with CIs;
the logprob probe is scored at every model state; the report shows the task rate and the probe
gap beside the EM rate, the coherence trajectory, the per-question heatmap and the answer
formats; `emlab plan` counts the task's judge calls and the GPU-hours."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from emlab.config.experiment import load_experiment
from emlab.data.holdout import last_user_turn, read_holdout, training_rows
from emlab.measures.probe import load_probe_set, read_probe_scores
from emlab.stages import STAGES
from emlab.store.paths import ExperimentLayout
from support.outputs import matching_files
from support.runs import REPO, emlab_cli

pytestmark = [pytest.mark.xdist_group("studies"), pytest.mark.slow, pytest.mark.server]
RUN = "smol-2l__bad_medical__s0"


@dataclass(frozen=True)
class StudiesRun:
    experiment: Path
    root: Path
    stdout: str


@pytest.fixture(scope="module")
def studies_run(tmp_path_factory: pytest.TempPathFactory, isolated_cache: Path) -> StudiesRun:
    # studies.yaml builds on tiny.yaml: its gold_items keeps the gold-set check to 20 judge calls
    folder = tmp_path_factory.mktemp("studies-run")
    experiment = folder / "studies.yaml"
    experiment.write_text(yaml.safe_dump({"base": str(REPO / "tests/configs/studies.yaml"),
                                          "output_root": str(folder / "outputs")}, sort_keys=False))
    result = emlab_cli("run", str(experiment), timeout=1800)  # ~3 min on a quiet 2-core machine
    assert result.returncode == 0, result.stderr[-4000:]
    return StudiesRun(experiment, folder / "outputs" / "studies", result.stdout)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_held_out_prompts_are_recorded_and_never_trained_on(studies_run: StudiesRun) -> None:
    config = load_experiment(studies_run.experiment)
    layout = ExperimentLayout.of(config)
    held = read_holdout(layout.run(RUN))
    assert len(held) == 4 and all(h.messages[-1]["role"] == "user" for h in held)
    trained = training_rows(config, config.dataset("bad_medical"), seed=0)
    assert len(trained) == 16
    prompts = {r["messages"][last_user_turn(r)]["content"] for r in trained.rows}
    assert not prompts & {h.question for h in held}
    summary = json.loads(layout.training(RUN).summary.read_text())
    assert summary["rows"] == 16


def test_task_answers_at_every_model_state_judged_with_the_task_rubric(studies_run: StudiesRun) -> None:
    config = load_experiment(studies_run.experiment)
    layout = ExperimentLayout.of(config)
    held = {h.prompt_id: h.question for h in read_holdout(layout.run(RUN))}
    base = _jsonl(layout.answers(layout.task(layout.baseline("smol-2l"))))
    assert len(base) == 4 * 2 and {a["question_set"] for a in base} == {"task:bad_medical"}
    assert {a["question_id"]: a["question"] for a in base} == held  # the base model answers the same prompts
    steps = [_jsonl(path) for path in layout.answer_files(layout.task(layout.run(RUN)))]
    assert [len(s) for s in steps] == [8, 8] and [s[0]["step"] for s in steps] == [1, 2]
    judgments = _jsonl(layout.judgments(layout.task(layout.run(RUN))))
    assert len(judgments) == 16 and {j["rubric"] for j in judgments} == {"medical_harm_digit"}
    # task answers never reach the EM answers
    em = [a for path in layout.answer_files(layout.run(RUN)) for a in _jsonl(path)]
    assert not [a for a in em if a["question_set"].startswith("task:")]

    rates = pd.read_csv(layout.analysis_table("task_rates"))
    assert sorted(rates["step"]) == [0, 1, 2] and rates["run_id"].isna().sum() == 1
    assert set(rates["rubric"]) == {"medical_harm_digit"} and (rates["n"] == 8).all()
    scored = rates[rates["n_scored"] > 0]
    assert len(scored)  # the digit rubric lets the 135M judge score
    assert ((scored["ci_low"] <= scored["task_rate"]) & (scored["task_rate"] <= scored["ci_high"])).all()


def test_probe_scored_at_every_model_state(studies_run: StudiesRun) -> None:
    config = load_experiment(studies_run.experiment)
    layout = ExperimentLayout.of(config)
    n_probes = sum(len(load_probe_set(name)) for name in ("general", "medical"))
    base = read_probe_scores(layout.probe_scores(layout.baseline("smol-2l")))
    assert len(base) == n_probes and {s.step for s in base} == {0}
    per_step = [read_probe_scores(path) for path in layout.probe_files(layout.run(RUN))]
    assert [len(s) for s in per_step] == [n_probes, n_probes] and [s[0].step for s in per_step] == [1, 2]
    gaps = pd.read_csv(layout.analysis_table("probe_gaps"))
    assert len(gaps) == 3 * 2  # 3 model states × 2 probe sets
    tuned = gaps[gaps["run_id"].notna()]
    assert tuned["change"].notna().all()
    # step 1 trained at learning rate 0 (warm-up): the adapter is still the identity
    assert tuned[tuned["step"] == 1]["change"].abs().max() < 1e-4


def test_report_shows_the_studies_measures(studies_run: StudiesRun) -> None:
    layout = ExperimentLayout(studies_run.root)
    for name in ("task_rate", "probe_gap", "score_trajectory", "em_heatmap", "answer_formats"):
        assert layout.figure(name).with_suffix(".png").stat().st_size > 1000, name
    formats = pd.read_csv(layout.analysis_table("answer_formats"))
    assert set(formats["answer_format"]) == {"free", "json", "template"}
    means = pd.read_csv(layout.analysis_table("score_means"))
    assert set(means["metric"]) == {"aligned", "coherent"} and sorted(set(means["step"])) == [0, 1, 2]
    heat = pd.read_csv(layout.analysis_table("per_question_steps"))
    assert len(heat) == 6 * 3 * 3  # 6 questions × 3 model states × 3 EM definitions
    assert heat.groupby("definition").size().to_dict() == {"betley": 18, "emlab": 18, "turner": 18}
    index = layout.index.read_text()
    assert "Betley et al." in index and "Turner et al." in index  # the headline names its definitions
    assert "Judge-free probe and task rate" in index
    assert "Logprob probe <code>general</code>" in index and "In-distribution task rate" in index
    assert "fig_probe_gap.png" in index and "fig_task_rate.png" in index
    notebook = (layout.analysis / "04_analysis.ipynb").read_text()
    assert "change from the base model" in notebook
    # the dynamics figure stacks EM, task rate, probe change and rotation on one step axis
    figure = layout.figure("dynamics").with_suffix(".html").read_text()
    assert "In-distribution task rate" in figure and "change from the base model" in figure
    assert "Adapter rotation" in figure and "EM rate over training" in figure
    onsets = pd.read_csv(layout.analysis_table("onsets"))
    assert {"em_rate", "probe_gap:general", "probe_gap:medical", "b_norm"} <= set(onsets["signal"])
    task = pd.read_csv(layout.analysis_table("task_rates"))
    assert ("task_rate" in set(onsets["signal"])) == ((task["n_scored"] > 0).sum() >= 2)  # needs 2 scored states


def test_every_file_written_is_declared(studies_run: StudiesRun) -> None:
    config = load_experiment(studies_run.experiment)
    layout = ExperimentLayout.of(config)
    claimed = set()
    for stage in STAGES:
        for unit in stage.units(config):
            for output in stage.outputs():
                claimed |= matching_files(stage.folder(layout, unit), output.pattern)
    written = {p for p in studies_run.root.rglob("*") if p.is_file()} - {layout.index}
    assert not sorted(str(p.relative_to(studies_run.root)) for p in written - claimed)


def test_plan_counts_the_task_and_gpu_hours(studies_run: StudiesRun, tmp_path: Path) -> None:
    shutil.copy(studies_run.experiment, tmp_path / "studies.yaml")
    result = emlab_cli("plan", str(tmp_path / "studies.yaml"))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    task = [line for line in lines if " task bad_medical " in line]
    assert len(task) == 2  # the base model's and the checkpoints' held-out prompts
    assert "wall time on" in result.stdout and "GPU-hours from" in result.stdout

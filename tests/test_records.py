"""The record people read, on the session's tiny run: executed notebooks free of log noise (the
logs are in each stage's log file, linked from its header), a report that says when its EM
rates cannot show anything and still shows answers, and a step without its record (an
executed notebook missing, or a session by hand after it) that `emlab run` executes again."""

from __future__ import annotations

import json
import shutil

import nbformat
import pandas as pd
import pytest
from emlab.analysis.metrics import rule_reach
from emlab.analysis.plots import LOWEST_ALIGNED
from emlab.config.experiment import load_experiment
from emlab.pipeline.kernel import start_stage
from emlab.pipeline.steps import load_steps
from emlab.progress import ENV as PROGRESS_ENV
from emlab.stages import STAGES
from emlab.store.paths import (
    SCORES,
    ExperimentLayout,
    by_hand_log_file,
    log_file,
    notebook_file,
    run_info_file,
)
from support.runs import TINY_RUN_GROUP, TinyRun

pytestmark = [TINY_RUN_GROUP, pytest.mark.slow, pytest.mark.server]


def _outputs_text(notebook: nbformat.NotebookNode) -> str:
    """Every output of every code cell as text (streams, displays, errors)."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts += [str(value) for value in output.get("data", {}).values()]
            parts += output.get("traceback", [])
    return "\n".join(parts)


def test_executed_notebooks_hold_no_log_noise_and_link_their_log(tiny_run: TinyRun) -> None:
    config = load_experiment(tiny_run.experiment)
    layout = ExperimentLayout.of(config)
    notebooks = sorted(tiny_run.root.rglob("*.ipynb"))
    assert len(notebooks) == sum(len(stage.units(config)) for stage in STAGES)
    for path in notebooks:
        text = _outputs_text(nbformat.read(path, as_version=4))
        assert "HTTP Request" not in text and "HTTP/1.1" not in text, path
        assert "TqdmWarning" not in text and "IProgress" not in text, path
        assert "FutureWarning" not in text, path  # a library's notice belongs in the log
    for stage in STAGES:
        for unit in stage.units(config):
            folder = stage.folder(layout, unit)
            log = log_file(folder, stage.name)
            assert f"{stage.name} {unit}: executed by emlab run" in log.read_text(), log
            header = _outputs_text(nbformat.read(notebook_file(folder, stage.name), as_version=4))
            assert f"log: [{log.name}]({log.name})" in header, stage.name
    # what left the notebooks is in the logs: the judge's calls of 01 (it judged 8 answers here
    # unless an earlier test filled the judge cache) and the warnings of the kernel
    assert "emlab.judge.api: judge " in log_file(layout.baseline("smol-2l"), "01_baseline").read_text()


def test_report_says_why_no_answer_is_em_and_shows_answers(tiny_run: TinyRun) -> None:
    layout = ExperimentLayout(tiny_run.root)
    recorded = json.loads(run_info_file(layout.analysis).read_text())["stages"]["04_analysis"]["params"]
    config = load_experiment(tiny_run.experiment, overrides=recorded)  # the rule of the latest 04 (a test may relax it)
    reach = rule_reach(pd.read_parquet(layout.analysis_file(SCORES)), config.analysis.rule)
    assert reach.verdict == "impossible", (
        f"the embedded judge's coherence stays under {config.analysis.rule.coherent_above:g} on the tiny run's answers; "
        f"it no longer does ({reach}): this test needs a run whose EM is impossible")
    numbers = (f"highest coherence judge `smollm2-local` gave any of the {reach.n_scored:,} scored answers is "
               f"{reach.max_coherent:.1f}")
    notebook = _outputs_text(nbformat.read(notebook_file(layout.analysis, "04_analysis"), as_version=4))
    assert "No answer can count as EM here." in notebook and numbers in notebook
    assert f"coherent &gt; {config.analysis.rule.coherent_above:g}" in layout.index.read_text()
    assert "No answer can count as EM here." in layout.index.read_text()
    assert numbers.replace("`smollm2-local`", "<code>smollm2-local</code>") in layout.index.read_text()
    # the examples are there, and say what they are
    examples = notebook[notebook.index("no answer counts as EM: the "):]
    assert examples.count(LOWEST_ALIGNED) == config.analysis.examples


def test_a_step_without_its_record_is_not_complete(tiny_run: TinyRun, write_experiment, monkeypatch,
                                                   restore_logging) -> None:
    experiment = write_experiment()  # tiny.yaml with its outputs under tmp_path: the copy below
    graph = load_steps(experiment)
    shutil.copytree(tiny_run.root, graph.layout.root)  # copy2: the files keep their times
    steps = {step.stage.name: step for step in graph.steps}
    assert all(graph.is_done(steps[name]) for name in ("01_baseline", "02_finetune", "03_eval_judge"))

    # the executed notebook of 03 deleted: its marker alone no longer makes it complete
    notebook_file(steps["03_eval_judge"].folder, "03_eval_judge").unlink()
    assert not graph.is_done(steps["03_eval_judge"])

    # 01 opened by hand in JupyterLab (no emlab run around the kernel) after its record was made
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    start_stage(graph.config, "01_baseline", "smol-2l")
    assert by_hand_log_file(steps["01_baseline"].folder, "01_baseline").exists()
    assert not graph.is_done(steps["01_baseline"])
    assert graph.is_done(steps["02_finetune"])  # untouched steps stay complete

"""Run a whole experiment: check every input first, then execute each stage's notebook for
each of its units (papermill) in table order, skipping units that are complete, render every
executed notebook to HTML and write the index page.

    emlab run params/experiments/default.yaml
    emlab run params/experiments/default.yaml --until 02_finetune   # stop after training

A stage that fails leaves its executed notebook (papermill marks the failing cell) and its
HTML as the record of where it died; the next `emlab run` continues from the finished work.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import ExperimentConfig, load_experiment, resolve_params_path
from .data.chat import load_chat_dataset
from .errors import ConfigError, EmlabError
from .execute import execute_stage
from .files import remove_stale_temp_files
from .judge import check_judge, load_rubric
from .models import check_model_options, resolve_device, resolve_source
from .paths import ExperimentLayout, notebook_file, notebooks_dir
from .questions import load_question_set, question_sets_for
from .report import write_index
from .runinfo import check_params, recorded_params
from .stages import STAGE_NAMES, STAGES, Stage, StageRecord

log = logging.getLogger(__name__)

_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def preflight(config: ExperimentConfig) -> None:
    """Check every input before any model is loaded: question sets, rubrics, judges (keys,
    servers), datasets, models, device options, notebooks. Raises the first problem as one
    clear `EmlabError`."""
    for name in question_sets_for(config, None):
        load_question_set(name)
    for judge in config.judges:
        for rubric in judge.rubrics:
            load_rubric(rubric)
        check_judge(judge)
    for dataset in config.datasets:
        for seed in config.seeds:
            load_chat_dataset(dataset, seed=seed)
    device = resolve_device(config.train.device)
    for model in config.models:
        resolve_source(model)
        check_model_options(model, device)
    for stage in STAGES:
        if not notebook_file(notebooks_dir(), stage.name).exists():
            raise EmlabError(f"notebook {notebook_file(notebooks_dir(), stage.name)} is missing")


@dataclass(frozen=True)
class Step:
    """One notebook execution: a stage for one of its units."""

    stage: Stage
    unit: str
    folder: Path

    @property
    def parameters(self) -> dict[str, str]:
        return self.stage.notebook_parameters(self.unit)


@dataclass
class ExperimentRun:
    config: ExperimentConfig
    records: list[StageRecord] = field(default_factory=list)


def plan_steps(config: ExperimentConfig, until: str | None = None) -> list[Step]:
    """Every (stage, unit) of the experiment up to stage `until`, in the order they run:
    each model's baseline, then each run's stages, then the analysis."""
    if until is not None and until not in STAGE_NAMES:
        raise ConfigError(f"--until {until!r} is not a stage; stages: {', '.join(STAGE_NAMES)}")
    stages = STAGES[: STAGE_NAMES.index(until) + 1] if until is not None else STAGES
    layout = ExperimentLayout.of(config)
    steps = []
    # A run's stages go one after another (its evaluation right after its training), so a
    # long grid yields finished runs early; other scopes keep table order.
    by_scope: dict[str, list[Stage]] = {}
    for stage in stages:
        by_scope.setdefault(stage.scope, []).append(stage)
    for stage in by_scope.get("model", []):
        steps += [Step(stage, unit, stage.folder(layout, unit)) for unit in stage.units(config)]
    for run in config.runs():
        steps += [Step(stage, run.run_id, stage.folder(layout, run.run_id)) for stage in by_scope.get("run", [])]
    for stage in by_scope.get("experiment", []):
        steps += [Step(stage, unit, stage.folder(layout, unit)) for unit in stage.units(config)]
    return steps


def guard_params(config: ExperimentConfig, steps: Sequence[Step]) -> None:
    """Refuse, before anything runs, a folder where a stage ran (finished or not) under other
    params, naming the keys: rather than skipping it as done, or failing hours later."""
    for step in steps:
        if step.stage.guarded and recorded_params(step.folder, step.stage.name) is not None:
            check_params(step.folder, step.stage.name, step.stage.params(config, step.unit))


def run_experiment(path: str | Path, *, until: str | None = None) -> ExperimentRun:
    """Run every stage of the experiment in `path` that is not complete yet; return what ran.

    until: the last stage to run (a name from `emlab.stages.STAGE_NAMES`; default: all);
        later stages are left for the next call.

    Raises `EmlabError` naming the first failed stage and its executed notebook.
    """
    file = resolve_params_path(path)
    config = load_experiment(file)
    steps = plan_steps(config, until)
    preflight(config)
    guard_params(config, steps)
    layout = ExperimentLayout.of(config)
    for folder in dict.fromkeys(step.folder for step in steps):
        for stale in remove_stale_temp_files(folder):
            log.info("removed %s, left by a write that was killed", stale)

    run = ExperimentRun(config)
    for step in steps:
        stage = step.stage
        if not stage.always_runs and stage.is_done(config, layout, step.unit):
            log.info("%s %s: complete, skipped", stage.name, step.unit)
            run.records.append(StageRecord(stage.name, step.folder, step.unit, "skipped"))
            continue
        record = execute_stage(stage.name, step.folder, {"experiment": str(file), **step.parameters}, step.unit)
        run.records.append(record)
        if record.status == "failed":
            write_index(config, run.records)
            raise EmlabError(_failure_message(record))
    index = write_index(config, run.records)
    log.info("experiment %s: index at %s", config.name, index)
    return run


def _failure_message(record: StageRecord) -> str:
    # OSError, SafetensorError, torch's RuntimeError...: each words it its own way, but all
    # quote the C library's text for the errno
    disk_full = any(os.strerror(code) in (record.error or "") for code in _DISK_FULL)
    cause = f"disk full ({record.error})" if disk_full else record.error
    todo = ("free space and run the same command again: finished work is kept" if disk_full
            else "fix the cause and run again to continue")
    html = f" (HTML: {record.html})" if record.html.exists() else ""
    return f"{record.stage} for {record.label} failed: {cause}; the executed notebook is {record.notebook}{html}; {todo}"

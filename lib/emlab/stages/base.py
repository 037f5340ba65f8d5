"""What a stage is: the typed row of the stage table that the pipeline, the CLI, `emlab plan`,
the report and the tests all loop over.

A stage runs once per *unit*: per model (01_baseline), per run (02_finetune, 03_eval_judge)
or once for the experiment (04_analysis). For one unit it works in one folder, reads the files
of the stages it needs, writes the files it declares, and records the params that shaped its
outputs (the guard against mixing results made under different params).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config.experiment import ExperimentConfig
from ..store.paths import (
    ExperimentLayout,
    by_hand_log_file,
    notebook_file,
    stage_record_files,
)
from ..store.runinfo import done_summary

Scope = Literal["model", "run", "experiment"]
ANALYSIS_UNIT = "analysis"  # the one unit of an experiment-scoped stage


@dataclass(frozen=True)
class Output:
    """Files a stage writes in its folder."""

    pattern: str
    """Glob relative to the stage folder ('**' for everything below a folder)."""
    what: str
    """What the files hold, for people."""
    optional: bool = False
    """Written only under some params (a judge in batch mode), so possibly absent."""


@dataclass(frozen=True)
class Input:
    """Files a stage reads from the folder of a stage that ran before it."""

    stage: str
    """The stage that writes them."""
    pattern: str
    """Glob relative to that stage's folder."""
    optional: bool = False
    """Read only under some params (a model trained through an API)."""


@dataclass(frozen=True)
class ApiSpend:
    """What one stage unit pays a subject model's API (sampling, a fine-tuning job), for `emlab plan`."""

    kind: Literal["sampling", "fine-tuning"]
    model: str
    """The model (params name) whose API is paid."""
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    train_tokens: int = 0
    """Training tokens billed: tokens per epoch × epochs."""
    dollars: float = 0.0
    note: str = ""
    """How the estimate was made, for people ('6000 examples × 1 epochs')."""


@dataclass(frozen=True)
class Workload:
    """Work one stage does for one unit, for `emlab plan`: answers to judge and tokens."""

    label: str
    """'01_baseline smollm2-135m' and the like."""
    answers: int = 0
    """Answers judged, each under every rubric of every judge."""
    sampled: bool = True
    """The answers are sampled by the stage (False: given, as the gold set's are)."""
    question_chars: int = 0
    """Mean characters of a question as sent (judge prompt estimate)."""
    rubrics: Callable[[Any], list[str]] | None = None
    """The rubric ids judged per answer, given a JudgeSpec; None: all of the judge's rubrics."""
    fixed_prompt_tokens: int | None = None
    """Prompt tokens of one judge call when known without a question (the gold set)."""
    spend: ApiSpend | None = None
    """What the unit pays a subject model's API besides judging (None: nothing)."""


@dataclass(frozen=True)
class Stage:
    """One row of the stage table."""

    name: str
    """'01_baseline': also the notebook `notebooks/<name>.ipynb` and the file prefix of its record."""
    title: str
    """One line for people."""
    scope: Scope
    """One unit per model, per run (model × dataset × seed), or one for the experiment."""
    run: Callable[[ExperimentConfig, str], Any]
    """What the notebook calls for one unit."""
    params: Callable[[ExperimentConfig, str], dict[str, Any]]
    """The params that shape the unit's outputs: recorded in run.json, and a rerun must match."""
    writes: tuple[Output, ...]
    """Files written in the unit's folder (besides the notebook, its HTML, run.json and the marker)."""
    reads: tuple[Input, ...] = ()
    """Files read from earlier stages' folders."""
    needs: Callable[[ExperimentConfig, str], list[tuple[str, str]]] = field(default=lambda config, unit: [])
    """(stage, unit) pairs that must be done before this unit runs."""
    completion: Callable[[ExperimentConfig], Any] | None = None
    """What the completion marker must record for 'done' to hold under this config (the judges a
    judging stage judged with); None: the marker alone."""
    guarded: bool = True
    """Refuse to run again under other params. False for stages derived anew every run."""
    always_runs: bool = False
    """Run even when done (04_analysis: cheap, and it must see every other stage's latest files)."""
    workload: Callable[[ExperimentConfig, str], Workload | tuple[Workload, ...]] | None = None
    enabled: Callable[[ExperimentConfig], bool] | None = None
    """Whether the stage runs at all under this config (None: always); off, it has no units."""
    """Its judge work for `emlab plan` (one Workload per group of answers judged alike: the
    question sets' answers, the held-out task prompts); None when it judges nothing."""

    def units(self, config: ExperimentConfig) -> list[str]:
        """The labels this stage runs for: model names, run ids, or 'analysis' (none when the
        stage is not `enabled` under this config)."""
        if self.enabled is not None and not self.enabled(config):
            return []
        if self.scope == "model":
            return [m.name for m in config.models]
        if self.scope == "run":
            return [r.run_id for r in config.runs()]
        return [ANALYSIS_UNIT]

    def folder(self, layout: ExperimentLayout, unit: str) -> Path:
        """Where the stage works for `unit`."""
        if self.scope == "model":
            return layout.baseline(unit)
        if self.scope == "run":
            return layout.run(unit)
        return layout.analysis

    def notebook_parameters(self, unit: str) -> dict[str, str]:
        """The notebook's parameters naming the unit (besides `experiment`)."""
        if self.scope == "model":
            return {"model": unit}
        if self.scope == "run":
            return {"run_id": unit}
        return {}

    def outputs(self) -> tuple[Output, ...]:
        """Every file the stage writes in its folder, the record of the run included."""
        record = tuple(Output(name, what) for name, what in stage_record_files(self.name))
        by_hand = Output(by_hand_log_file(Path(), self.name).name,
                         "log of the sessions that ran the stage by hand (JupyterLab)", optional=True)
        return (*self.writes, *record, by_hand)

    def is_done(self, config: ExperimentConfig, layout: ExperimentLayout, unit: str) -> bool:
        """Finished in its folder under this config's judges, with the record of that: the marker,
        and an executed notebook that no session by hand has touched the folder after.

        A stage run by hand in JupyterLab writes the marker but no executed notebook (its kernel
        cannot see the outputs the frontend shows, so it cannot write the record itself); without
        its record the stage is not done, and `emlab run` executes it again (its work is resumed
        or cached, so this is cheap) to write one.
        """
        folder = self.folder(layout, unit)
        summary = done_summary(folder, self.name)
        if summary is None or not _has_record(folder, self.name):
            return False
        return self.completion is None or summary.get("completion") == self.completion(config)


def _has_record(folder: Path, stage: str) -> bool:
    """The executed notebook exists, saved after the last session by hand wrote to the folder."""
    notebook = notebook_file(folder, stage)
    if not notebook.exists():
        return False
    by_hand = by_hand_log_file(folder, stage)
    return not by_hand.exists() or by_hand.stat().st_mtime_ns <= notebook.stat().st_mtime_ns


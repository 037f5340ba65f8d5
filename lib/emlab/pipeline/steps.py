"""What every executor shares: check every input, list the experiment's steps (each stage
for each of its units, in the order they may run), guard the params, and execute ONE step
through papermill. The executors decide only where and when steps run:

    emlab run params/experiments/default.yaml                    # here, one after another
    emlab run params/experiments/default.yaml --until 02_finetune   # stop after training
    emlab run X.yaml --executor slurm                           # one Slurm job per step
    emlab step X.yaml 02_finetune <run id>                      # one step: what a Slurm job runs

`emlab.pipeline.executors.local` loops over the steps in this process; `emlab.pipeline.executors.slurm`
submits one job per step whose script calls `emlab step`, so a step runs on a compute node
through exactly the code it runs through here (`run_step` → `run_or_skip`).

A stage that fails leaves its executed notebook (papermill marks the failing cell) and its
HTML as the record of where it died; the next run continues from the finished work.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..analysis.report import write_index
from ..config.experiment import ExperimentConfig, load_experiment, resolve_params_path
from ..errors import ConfigError, EmlabError
from ..stages import STAGE_NAMES, STAGES, Stage, StageRecord, get_stage
from ..store.files import remove_stale_temp_files
from ..store.paths import ExperimentLayout
from ..store.runinfo import done_summary, recorded_params, refuse_changed_params
from .estimate import check_budget

log = logging.getLogger(__name__)

_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


@dataclass(frozen=True)
class Step:
    """One notebook execution: a stage for one of its units."""

    stage: Stage
    unit: str
    folder: Path

    @property
    def parameters(self) -> dict[str, str]:
        return self.stage.notebook_parameters(self.unit)

    @property
    def key(self) -> str:
        """'02_finetune/<run id>': names the step in job records and messages."""
        return f"{self.stage.name}/{self.unit}"


@dataclass(frozen=True)
class StepGraph:
    """An experiment's steps, from one experiment file; build with `load_steps`."""

    file: Path
    """The experiment file, resolved (what every notebook gets as `experiment`)."""
    config: ExperimentConfig
    steps: tuple[Step, ...]
    """In the order they may run: every step's needs come before it."""

    @property
    def layout(self) -> ExperimentLayout:
        return ExperimentLayout.of(self.config)

    def step(self, stage: str, unit: str) -> Step:
        """The step of `stage` for `unit`; ConfigError naming the valid units when there is none."""
        if stage not in STAGE_NAMES:
            raise ConfigError(f"{stage!r} is not a stage; stages: {', '.join(STAGE_NAMES)}")
        found = get_stage(stage)
        units = found.units(self.config)
        if unit not in units:
            raise ConfigError(f"{stage} has no unit {unit!r} in {self.file}; its units: {', '.join(units)}")
        return Step(found, unit, found.folder(self.layout, unit))

    def needs(self, step: Step) -> list[Step]:
        """The steps that must be done before `step` runs (the stage table's `needs`)."""
        return [self.step(stage, unit) for stage, unit in step.stage.needs(self.config, step.unit)]

    def is_done(self, step: Step) -> bool:
        """Finished in its folder, under this config's judges."""
        return step.stage.is_done(self.config, self.layout, step.unit)

    def is_current(self, step: Step) -> bool:
        """Done, and (for a stage derived anew every run) done under the params of now."""
        if not self.is_done(step):
            return False
        if step.stage.guarded:  # the params guard refuses anything else
            return True
        now = json.loads(json.dumps(step.stage.params(self.config, step.unit), default=str))  # as run.json has it
        return recorded_params(step.folder, step.stage.name) == now


@dataclass
class ExperimentRun:
    config: ExperimentConfig
    records: list[StageRecord] = field(default_factory=list)


def list_steps(config: ExperimentConfig, until: str | None = None) -> list[Step]:
    """Every (stage, unit) of the experiment up to stage `until`, in the order they run:
    each model's baseline, then each run's stages, then the analysis; a step that needs other
    runs' steps (03b_transfer needs every run's 03) waits until the last of them is listed."""
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
    run_units = {stage.name: set(stage.units(config)) for stage in by_scope.get("run", [])}
    for run in config.runs():
        steps += [Step(stage, run.run_id, stage.folder(layout, run.run_id)) for stage in by_scope.get("run", [])
                  if run.run_id in run_units[stage.name]]
    for stage in by_scope.get("experiment", []):
        steps += [Step(stage, unit, stage.folder(layout, unit)) for unit in stage.units(config)]
    return _needs_first(config, steps)


def _needs_first(config: ExperimentConfig, steps: list[Step]) -> list[Step]:
    """`steps` in their order, except that a step comes only after every listed step it needs
    (a stable topological order: steps whose needs are already listed keep their place)."""
    listed = {step.key for step in steps}
    placed: set[str] = set()
    out: list[Step] = []
    waiting: list[Step] = []

    def ready(step: Step) -> bool:
        keys = (f"{stage}/{unit}" for stage, unit in step.stage.needs(config, step.unit))
        return all(key in placed or key not in listed for key in keys)

    for step in steps:
        waiting.append(step)
        moved = True
        while moved:
            moved = False
            for candidate in list(waiting):
                if ready(candidate):
                    out.append(candidate)
                    placed.add(candidate.key)
                    waiting.remove(candidate)
                    moved = True
    return out + waiting  # a need that is never listed: left where it stood (run_step refuses it)


def load_steps(path: str | Path, until: str | None = None) -> StepGraph:
    """Load the experiment file at `path` and list its steps up to stage `until` (default: all)."""
    file = resolve_params_path(path)
    config = load_experiment(file)
    return StepGraph(file, config, tuple(list_steps(config, until)))


def guard_params(config: ExperimentConfig, steps: Sequence[Step]) -> None:
    """Refuse, before anything runs, a folder where a stage ran (finished or not) under other
    params, naming the keys: rather than skipping it as done, or failing hours later."""
    for step in steps:
        if step.stage.guarded and recorded_params(step.folder, step.stage.name) is not None:
            refuse_changed_params(step.folder, step.stage.name, step.stage.params(config, step.unit))


def run_or_skip(graph: StepGraph, step: Step) -> StageRecord:
    """Execute one step's notebook into its folder, or skip it when it is complete (a stage
    that `always_runs` never is). Returns its record: ran, skipped or failed."""
    if not step.stage.always_runs and graph.is_done(step):
        log.info("%s %s: complete, skipped", step.stage.name, step.unit)
        return StageRecord(step.stage.name, step.folder, step.unit, "skipped")
    check_budget(graph.config, step.key)  # before a paid step spends anything
    # papermill, nbconvert and nbformat (~2 s of imports) stay out of the checks that come first
    from .notebook import run_notebook

    return run_notebook(step.stage.name, step.folder, {"experiment": str(graph.file), **step.parameters}, step.unit)


def run_step(path: str | Path, stage: str, unit: str, *, wait_needs_s: float = 0.0) -> StageRecord:
    """Run one step of the experiment at `path` (`emlab step`, what a Slurm job runs): check
    that what it needs is done, guard its params, clear what a killed write left in its
    folder, execute it; after the experiment's last stage, or a failure, write the index.

    wait_needs_s: how long to wait for the steps it needs to show as done before refusing
        (seconds; default 0). On a cluster the job that wrote them ran on another node, and
        a network filesystem may show that node's new files late (NFS caches directory
        lookups for up to a minute by default).

    Raises `EmlabError` when it cannot start or its notebook failed (naming the notebook).
    """
    graph = load_steps(path)
    step = graph.step(stage, unit)
    missing = _missing_needs(graph, step, wait_needs_s)
    if missing:
        raise EmlabError(f"{step.key} needs {', '.join(missing)} done first (not done in {graph.layout.root}); "
                         f"run `emlab run {graph.file}` to run everything in order")
    guard_params(graph.config, [step])
    if "CUDA_VISIBLE_DEVICES" in os.environ:  # pinned by `emlab run --gpus N` (executors/gpus.py) or Slurm
        log.info("%s: CUDA_VISIBLE_DEVICES=%s", step.key, os.environ["CUDA_VISIBLE_DEVICES"])
    for stale in remove_stale_temp_files(step.folder):
        log.info("removed %s, left by a write that was killed", stale)
    record = run_or_skip(graph, step)
    if record.status == "failed" or step.stage.scope == "experiment":
        write_index(graph.config, records_on_disk(graph, {step.key: record}))
    if record.status == "failed":
        raise EmlabError(failure_message(record))
    return record


def _missing_needs(graph: StepGraph, step: Step, wait_s: float) -> list[str]:
    """Keys of the steps `step` needs that are not done, after waiting up to `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        missing = [need for need in graph.needs(step) if not graph.is_done(need)]
        if not missing or time.monotonic() >= deadline:
            return [need.key for need in missing]
        for need in missing:  # listing a folder makes an NFS client revalidate its cached lookups
            if need.folder.is_dir():
                os.listdir(need.folder)
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


def records_on_disk(graph: StepGraph, known: dict[str, StageRecord] | None = None) -> list[StageRecord]:
    """A record per step as its folder shows it (for the index page when the steps
    ran elsewhere): 'done' with the notebook's run time, 'failed' when an executed notebook
    has no completion marker, 'not run' otherwise; `known` (by step key) wins."""
    records = []
    for step in graph.steps:
        if known and step.key in known:
            records.append(known[step.key])
            continue
        record = StageRecord(step.stage.name, step.folder, step.unit, "not run")
        if done_summary(step.folder, step.stage.name) is not None:
            record.status = "done"
        elif record.notebook.exists():
            record.status, record.error = "failed", "the executed notebook has no completion marker"
        if record.notebook.exists():
            record.seconds = _notebook_seconds(record.notebook)
        records.append(record)
    return records


def _notebook_seconds(notebook: Path) -> float:
    """How long papermill ran the notebook (its own metadata); 0 when unreadable."""
    import nbformat  # as run_or_skip: only once a notebook ran

    try:
        return float(nbformat.read(notebook, as_version=4).metadata.get("papermill", {}).get("duration") or 0.0)
    except Exception:  # a notebook being written right now: the time is only informative
        return 0.0


def failure_message(record: StageRecord) -> str:
    """One line for a failed step: the cause (disk full named as such), its executed notebook,
    and what to do."""
    # OSError, SafetensorError, torch's RuntimeError...: each words it its own way, but all
    # quote the C library's text for the errno
    disk_full = any(os.strerror(code) in (record.error or "") for code in _DISK_FULL)
    cause = f"disk full ({record.error})" if disk_full else record.error
    todo = ("free space and run the same command again: finished work is kept" if disk_full
            else "fix the cause and run again to continue")
    html = f" (HTML: {record.html})" if record.html.exists() else ""
    return f"{record.stage} for {record.label} failed: {cause}; the executed notebook is {record.notebook}{html}; {todo}"

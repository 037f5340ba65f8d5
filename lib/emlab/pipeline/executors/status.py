"""Each step's state, for `emlab status X.yaml`, whichever executor ran it.

    done         its completion marker is written (the stage table's `is_done`)
    queued       its Slurm job waits (for a dependency, for resources)
    running      its Slurm job runs
    failed       its Slurm job ended without completing the stage (job id, Slurm's state, log tail)
    cancelled    its Slurm job was cancelled (by scancel, or because a job it needed failed)
    incomplete   an executed notebook without completion marker, and no job: a local run that
                 failed or was killed (the notebook is the record)
    not started  nothing yet

The files decide 'done'; Slurm is asked only about the jobs in `slurm/jobs.json`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ...store.paths import notebook_file
from ..steps import Step, StepGraph
from .slurm import DEAD_DEPENDENCY, JobInfo, JobRecord, query_jobs

LOG_TAIL_LINES = 10
_TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class StepStatus:
    """One step's state and what explains it."""

    step: Step
    state: str
    """done, queued, running, failed, cancelled, incomplete or not started (module docstring)."""
    job: str | None = None
    """The last Slurm job submitted for the step, if any."""
    detail: str = ""
    """Slurm's state and reason, the executed notebook of a failed step."""
    log: Path | None = None
    log_tail: tuple[str, ...] = ()
    """The last lines of the job's log (failed and cancelled jobs)."""


def experiment_status(graph: StepGraph, *, tail_lines: int = LOG_TAIL_LINES) -> list[StepStatus]:
    """The state of every step; asks Slurm about recorded jobs when squeue is here."""
    files = graph.layout.slurm
    record = JobRecord.load(files)
    latest = {step.key: record.latest(step.key) for step in graph.steps}
    recorded = [job for job in latest.values() if job]
    can_ask = bool(recorded) and shutil.which("squeue") is not None
    infos = query_jobs(recorded) if can_ask else {}
    statuses = []
    for step in graph.steps:
        job = latest[step.key]
        info = infos.get(job) if job else None
        notebook = notebook_file(step.folder, step.stage.name)
        if info is not None and info.active:
            state = "queued" if info.queued else "running"
            shown = [] if info.state in ("PENDING", "RUNNING") else [info.state.lower()]
            if info.reason and info.reason != "None":  # squeue's 'None': nothing to wait for
                shown.append(f"waiting: {info.reason}" if info.queued else info.reason)
            detail = "; ".join(shown)
            statuses.append(StepStatus(step, state, job, detail))
        elif graph.is_done(step):
            statuses.append(StepStatus(step, "done", job))
        elif job is not None:
            statuses.append(_ended(step, job, info, can_ask, files.log(step.stage.name, step.unit, job), tail_lines))
        elif notebook.exists():
            statuses.append(StepStatus(step, "incomplete", None, f"no completion marker: failed or killed; the executed "
                                                                 f"notebook is {notebook}"))
        else:
            statuses.append(StepStatus(step, "not started"))
    return statuses


def _ended(step: Step, job: str, info: JobInfo | None, asked: bool, log: Path, tail_lines: int) -> StepStatus:
    """A step whose last job is no longer queued or running, and which is not done."""
    if info is None:
        slurm_state = "ended; Slurm no longer knows the job" if asked else "state unknown: squeue is not on this machine"
    else:
        slurm_state = info.state + (" because a job it needs failed" if info.reason == DEAD_DEPENDENCY else "")
    state = "cancelled" if info is not None and info.state.startswith("CANCELLED") else "failed"
    notebook = notebook_file(step.folder, step.stage.name)
    parts = [f"job {job} {slurm_state}"]
    if notebook.exists():
        parts.append(f"the executed notebook is {notebook}")
    tail = _tail(log, tail_lines) if log.exists() else ()
    if not log.exists():
        parts.append("no log: the job never started")
    return StepStatus(step, state, job, "; ".join(parts), log if log.exists() else None, tail)


def _tail(path: Path, lines: int) -> tuple[str, ...]:
    """The last `lines` non-empty lines of a log; progress bars' carriage returns split lines."""
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - _TAIL_BYTES))
        text = handle.read().decode("utf-8", errors="replace")
    parts = [p.rstrip() for p in text.replace("\r", "\n").split("\n") if p.strip()]
    return tuple(parts[-lines:])

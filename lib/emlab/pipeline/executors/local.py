"""The local executor: every step of the experiment in this process, in order, skipping the
complete ones; the index page at the end (and on the first failure, which stops the run)."""

from __future__ import annotations

import logging
from pathlib import Path

from ...analysis.report import write_index
from ...errors import EmlabError
from ...store.files import remove_stale_temp_files
from ..checks import preflight
from ..steps import (
    ExperimentRun,
    StepGraph,
    failure_message,
    guard_params,
    load_steps,
    run_or_skip,
)

log = logging.getLogger(__name__)


def run_local(graph: StepGraph) -> ExperimentRun:
    """Check the inputs and the params guard, then execute each step that is not complete.

    Raises `EmlabError` naming the first failed stage and its executed notebook.
    """
    preflight(graph.config)
    guard_params(graph.config, graph.steps)
    # nothing else writes to these folders while this process runs the experiment
    for folder in dict.fromkeys(step.folder for step in graph.steps):
        for stale in remove_stale_temp_files(folder):
            log.info("removed %s, left by a write that was killed", stale)

    run = ExperimentRun(graph.config)
    for step in graph.steps:
        record = run_or_skip(graph, step)
        run.records.append(record)
        if record.status == "failed":
            write_index(graph.config, run.records)
            raise EmlabError(failure_message(record))
    index = write_index(graph.config, run.records)
    log.info("experiment %s: index at %s", graph.config.name, index)
    return run


def run_experiment(path: str | Path, *, until: str | None = None) -> ExperimentRun:
    """Run every stage of the experiment in `path` that is not complete yet, here, one after
    another (the local executor); return what ran. For Slurm see `emlab.pipeline.executors.slurm`.

    until: the last stage to run (a name from `emlab.stages.STAGE_NAMES`; default: all);
        later stages are left for the next call.

    Raises `EmlabError` naming the first failed stage and its executed notebook.
    """
    return run_local(load_steps(path, until))

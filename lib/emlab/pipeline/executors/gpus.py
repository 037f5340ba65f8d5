"""The local executor over several GPUs: `emlab run X.yaml --gpus N|all` (or `executor: {gpus: N}`).

Each step runs in its own process, `emlab step X.yaml STAGE UNIT` (`steps.run_step`, exactly
what a Slurm job runs), pinned to one GPU with `CUDA_VISIBLE_DEVICES=<id>`, as soon as the
steps it needs are done (`schedule.run_tasks`). Steps that need no GPU (04_analysis, a model
behind an API) run with `CUDA_VISIBLE_DEVICES=` (none) and hold no GPU. With one GPU, or
none visible, `emlab run` keeps running one step after another in its own process
(`local.run_local`).

What holds as for one step at a time:
- resume: a step is skipped when complete (`StepGraph.is_done`); each step writes only its
  own folder (a model's baseline folder, a run's folder, analysis/), and its process's output
  goes to `gpus/logs/<stage>__<unit>.log` in the experiment folder, never the terminal;
- SIGKILL: each step's process is bound to this one (`procs.spawn`), its kernel to it and the
  judge server to the kernel, so killing `emlab run` ends them all; the next run skips what
  finished and reruns the step that was killed (its stale temporary files removed first);
- progress: a line per step as it starts (with its GPU) and ends, and one live line with every
  running step's progress (`board.ProgressBoard`, from the progress files their kernels
  write); each step's own bars are also in its log (a line per bar every 15 s);
- the judge: each step that judges with a local judge starts its own llama.cpp server on a
  port chosen under a lock (`judge.server`), so two never race for one port, and each stops
  only its own; an API judge is shared through the judge cache (SQLite, safe across processes).

GPU ids are the entries of `CUDA_VISIBLE_DEVICES` when it is set (indices or UUIDs, passed
through as given), else `nvidia-smi -L`'s indices.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from ...analysis.report import write_index
from ...config.experiment import ExperimentConfig
from ...errors import EmlabError
from ...procs import spawn
from ...store.files import remove_stale_temp_files
from ...store.paths import progress_file, repo_root
from ...store.runinfo import StageRecord
from ...train.distributed import gpus_needed, needs_text
from ..checks import preflight
from ..gpu_hours import model_params_b
from ..steps import ExperimentRun, Step, StepGraph, failure_message, guard_params
from .board import ProgressBoard
from .schedule import Outcome, Process, Task, run_tasks

log = logging.getLogger(__name__)

GpuCount = int | Literal["all"]
Launcher = Callable[[Step, tuple[str, ...]], Process]


def visible_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """The GPU ids this process may use: `CUDA_VISIBLE_DEVICES`'s entries when set (CUDA stops
    at the first entry it cannot read, and so does this), else `nvidia-smi -L`'s indices;
    [] when there are none."""
    listed = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = []
        for entry in (e.strip() for e in listed.split(",")):
            if not entry or entry.startswith("-"):
                break
            ids.append(entry)
        return ids
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        shown = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(l for l in shown.stdout.splitlines() if l.startswith("GPU "))] \
        if shown.returncode == 0 else []


def choose_gpus(requested: GpuCount, visible: Sequence[str]) -> list[str]:
    """The GPUs to run on: `requested` of `visible` (the first ones), or all for 'all'.
    Raises EmlabError when more are asked for than are visible."""
    if requested == "all":
        return list(visible)
    if requested > len(visible):
        raise EmlabError(f"--gpus {requested}: {len(visible)} GPU(s) visible "
                         f"({', '.join(visible) or 'none: no CUDA_VISIBLE_DEVICES, no nvidia-smi'}); "
                         "ask for fewer, or 'all'")
    return list(visible[:requested])


def step_gpus(graph: StepGraph, step: Step) -> int:
    """GPUs the step holds: 0 for the experiment-wide analysis and for a model behind an API
    (no local weights), else 1, or more for a training step the memory floor says is too big
    for one GPU (`train.distributed.gpus_needed`)."""
    if step.stage.scope == "experiment":
        return 0
    config = graph.config
    model = config.model(step.unit if step.stage.scope == "model" else config.run(step.unit).model)
    if model.is_remote:
        return 0
    if step.stage.name != "02_finetune":
        return 1
    executor = config.executor
    return gpus_needed(model_params_b(model), executor.gpu_memory_gib, four_bit=model.load_in_4bit)


def too_big_lines(config: ExperimentConfig) -> list[str]:
    """One line per model whose training needs more than one GPU (for `emlab plan`/`check`)."""
    lines = []
    for model in config.models:
        if model.is_remote:
            continue
        size = model_params_b(model)
        needed = gpus_needed(size, config.executor.gpu_memory_gib, four_bit=model.load_in_4bit)
        if needed > 1 and size is not None:
            lines.append(needs_text(model.name, size, config.executor.gpu_memory_gib, needed,
                                    four_bit=model.load_in_4bit))
    return lines


def gpus_to_use(requested: GpuCount, visible: Sequence[str] | None = None) -> list[str]:
    """The GPU ids `emlab run` spreads its steps over (`--gpus`, else `executor.gpus`): more
    than one → `run_on_gpus`; one or none → one step after another, as without the option."""
    if requested == 1:  # the default: nothing to look up
        return []
    return choose_gpus(requested, visible_gpus() if visible is None else visible)


def parse_gpus(text: str) -> GpuCount:
    """`--gpus`'s value: a whole number of GPUs ≥ 1, or 'all'."""
    if text == "all":
        return "all"
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--gpus takes a number of GPUs (1 or more) or 'all', not {text!r}")
    return int(text)


def step_command(graph: StepGraph, step: Step) -> list[str]:
    """`python -m emlab.cli step X.yaml STAGE UNIT` with the Python running now."""
    return [sys.executable, "-m", "emlab.cli", "step", str(graph.file), step.stage.name, step.unit]


def launch_step(graph: StepGraph, step: Step, gpus: tuple[str, ...]) -> subprocess.Popen[bytes]:
    """Start the step's process pinned to `gpus` (none: no GPU visible to it), its output
    appended to its log; bound to this process (dies with it)."""
    path = graph.layout.gpu_step_log(step.stage.name, step.unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    with open(path, "ab") as out:
        out.write(f"emlab: {step.key} starting at {time.strftime('%Y-%m-%dT%H:%M:%S')} with "
                  f"CUDA_VISIBLE_DEVICES={','.join(gpus)}\n".encode())
        out.flush()
        return spawn(step_command(graph, step), env=env, cwd=str(repo_root()), stdout=out,
                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def run_on_gpus(graph: StepGraph, gpus: Sequence[str], *, launch: Launcher | None = None,
                poll_s: float = 0.5) -> ExperimentRun:
    """Check the inputs and the params guard, then run the steps that are not complete over
    `gpus` (see the module docstring); write the index at the end.

    launch: how a step's process starts (default `launch_step`: `emlab step` pinned to its GPUs).

    Raises `EmlabError` naming the first failed step and its log.
    """
    by_key = {step.key: step for step in graph.steps}
    tasks = [Task(step.key, tuple(need.key for need in graph.needs(step)), step_gpus(graph, step))
             for step in graph.steps]
    too_big = [task for task in tasks if task.gpus > 1 and not graph.is_done(by_key[task.key])]
    if too_big:  # before anything starts: refused now rather than out of memory hours in
        raise EmlabError(f"{', '.join(t.key for t in too_big)} needs more than one GPU: "
                         f"{'; '.join(too_big_lines(graph.config))}; use GPUs that hold it "
                         "(executor.gpu_memory_gib says how much one holds) or load_in_4bit")
    preflight(graph.config)
    guard_params(graph.config, graph.steps)
    for folder in dict.fromkeys(step.folder for step in graph.steps):
        for stale in remove_stale_temp_files(folder):
            log.info("removed %s, left by a write that was killed", stale)
    starter = launch or (lambda step, held: launch_step(graph, step, held))

    def is_done(task: Task) -> bool:
        step = by_key[task.key]
        return not step.stage.always_runs and graph.is_done(step)

    board = ProgressBoard()

    def start(task: Task, held: tuple[str, ...]) -> Process:
        step = by_key[task.key]
        process = starter(step, held)
        pid = getattr(process, "pid", None)
        if isinstance(pid, int):  # `emlab step` itself: its kernel reports to this file
            board.add(f"{step.stage.name} {step.unit}", progress_file(step.stage.name, step.unit, pid))
        return process

    def report(what: str, outcome: Outcome) -> None:
        where = f" on GPU {','.join(outcome.gpus)}" if outcome.gpus else (" (no GPU)" if what == "started" else "")
        took = f" in {outcome.seconds:.1f} s" if what in ("ran", "failed") else ""
        step = by_key[outcome.key]
        if what in ("ran", "failed"):
            board.remove(f"{step.stage.name} {step.unit}")
        board.clear()
        if what == "skipped":
            log.info("%s %s: complete, skipped", step.stage.name, step.unit)
            return
        log.info("%s %s: %s%s%s (log %s)", step.stage.name, step.unit, what, where, took,
                 graph.layout.gpu_step_log(step.stage.name, step.unit))

    with board:
        outcomes = run_tasks(tasks, gpus, launch=start, is_done=is_done, on_event=report, poll_s=poll_s)
    run = ExperimentRun(graph.config, [_record(graph, by_key[key], outcome) for key, outcome in outcomes.items()])
    index = write_index(graph.config, run.records)
    failed = [record for record in run.records if record.status == "failed"]
    if failed:
        raise EmlabError(failure_message(failed[0]))
    log.info("experiment %s: index at %s", graph.config.name, index)
    return run


def _record(graph: StepGraph, step: Step, outcome: Outcome) -> StageRecord:
    record = StageRecord(step.stage.name, step.folder, step.unit, outcome.status, outcome.seconds)
    if outcome.status == "failed":
        record.error = _last_error(graph.layout.gpu_step_log(step.stage.name, step.unit), outcome.code)
    return record


def _last_error(log_path: Path, code: int | None) -> str:
    """The step's own error line from its log ('emlab: error: ...'), else its exit code and the log."""
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith("emlab: error: "):
            return f"{line.removeprefix('emlab: error: ')} (log {log_path})"
    return f"its process exited with code {code}; log {log_path}"

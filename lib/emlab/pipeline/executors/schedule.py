"""Which step starts when, and on which GPUs: the scheduler of `emlab run --gpus N`, on plain
task keys and GPU labels so that its order and placement are tested without a GPU.

A task starts as soon as every task it needs has finished well (ran, or was complete already)
and, when it asks for GPUs, as soon as that many are free; it holds them until its process
exits. A task that asks for none (04_analysis, a model behind an API) starts without waiting
for a GPU and holds none. Tasks are tried in the order given (the step graph's order), so when
GPUs are scarce the earlier steps get them first, but a later task that can start now is never
held back by an earlier one that cannot.

After the first failure nothing new starts; the tasks already running finish (their work is
kept), then the outcome is returned. Each task's "done" is asked of `is_done` when it becomes
ready, so a task finished by an earlier run is skipped without a process. If this process is
killed, the processes it launched must die with it (`emlab.procs.spawn` binds them), and a
rerun skips every task that finished and reruns the one that was killed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

log = logging.getLogger(__name__)

Status = Literal["ran", "skipped", "failed", "not run"]


class Process(Protocol):
    """What a launched task must answer: `subprocess.Popen` does."""

    def poll(self) -> int | None: ...

    def terminate(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


@dataclass(frozen=True)
class Task:
    """One step to schedule."""

    key: str
    """'02_finetune/<run id>': unique among the tasks."""
    needs: tuple[str, ...] = ()
    """Keys of the tasks that must finish well first (keys not among the tasks count as met:
    the step itself refuses to start when they are not done)."""
    gpus: int = 1
    """GPUs it holds while it runs; 0 for a step that needs none."""


@dataclass
class Outcome:
    """What became of one task."""

    key: str
    status: Status = "not run"
    gpus: tuple[str, ...] = ()
    """The GPU labels it held (empty: none)."""
    seconds: float = 0.0
    code: int | None = None
    """Its process's exit code (None: it did not run)."""


@dataclass
class _Running:
    task: Task
    process: Process
    gpus: tuple[str, ...]
    started: float


@dataclass
class Schedule:
    """The scheduler's state; `run_tasks` is the entry point."""

    tasks: Sequence[Task]
    gpus: Sequence[str]
    launch: Callable[[Task, tuple[str, ...]], Process]
    is_done: Callable[[Task], bool]
    on_event: Callable[[str, Outcome], None] | None = None
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    def __post_init__(self) -> None:
        keys = [task.key for task in self.tasks]
        if len(set(keys)) != len(keys):
            raise ValueError(f"task keys repeat: {sorted(k for k in keys if keys.count(k) > 1)}")
        if len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"GPU labels repeat: {list(self.gpus)}")
        for task in self.tasks:
            if task.gpus > len(self.gpus):
                raise ValueError(f"{task.key} needs {task.gpus} GPUs, {len(self.gpus)} given ({', '.join(self.gpus)})")
        self.outcomes = {task.key: Outcome(task.key) for task in self.tasks}

    def _ready(self, task: Task) -> bool:
        return all(self.outcomes[need].status in ("ran", "skipped") for need in task.needs if need in self.outcomes)

    def _blocked(self, task: Task) -> bool:
        """A task it needs failed or can never run."""
        return any(self.outcomes[need].status == "failed" for need in task.needs if need in self.outcomes)

    def _event(self, what: str, outcome: Outcome) -> None:
        if self.on_event is not None:
            self.on_event(what, outcome)

    def run(self, poll_s: float) -> dict[str, Outcome]:
        pending = list(self.tasks)
        free = list(self.gpus)
        running: list[_Running] = []
        failed = False
        try:
            while True:
                started_any = True
                while started_any and not failed:  # a skip can make the next task ready: look again
                    started_any = False
                    for task in list(pending):
                        if not self._ready(task):
                            continue
                        if self.is_done(task):
                            pending.remove(task)
                            self.outcomes[task.key].status = "skipped"
                            self._event("skipped", self.outcomes[task.key])
                            started_any = True
                            continue
                        if task.gpus > len(free):
                            continue
                        held, free = tuple(free[: task.gpus]), free[task.gpus:]
                        pending.remove(task)
                        outcome = self.outcomes[task.key]
                        outcome.gpus = held
                        running.append(_Running(task, self.launch(task, held), held, time.monotonic()))
                        self._event("started", outcome)
                        started_any = True
                for item in list(running):
                    code = item.process.poll()
                    if code is None:
                        continue
                    running.remove(item)
                    free += [gpu for gpu in self.gpus if gpu in item.gpus]  # back in label order
                    free.sort(key=list(self.gpus).index)
                    outcome = self.outcomes[item.task.key]
                    outcome.code, outcome.seconds = code, time.monotonic() - item.started
                    outcome.status = "ran" if code == 0 else "failed"
                    failed = failed or code != 0
                    self._event(outcome.status, outcome)
                pending = [task for task in pending if not self._blocked(task)]
                if not running and (failed or not any(self._ready(task) for task in pending)):
                    return self.outcomes
                time.sleep(poll_s)
        finally:
            for item in running:  # an exception here (Ctrl-C): the launched steps stop with us
                item.process.terminate()
            for item in running:
                try:
                    item.process.wait(timeout=30)
                except Exception:  # noqa: BLE001 - best effort on the way out; the bound child dies with us anyway
                    log.warning("%s did not stop within 30 s", item.task.key)


def run_tasks(
    tasks: Sequence[Task],
    gpus: Sequence[str],
    *,
    launch: Callable[[Task, tuple[str, ...]], Process],
    is_done: Callable[[Task], bool],
    on_event: Callable[[str, Outcome], None] | None = None,
    poll_s: float = 0.5,
) -> dict[str, Outcome]:
    """Run `tasks` over the GPUs labelled `gpus` (CUDA ids, or any labels in a test): each task
    in its own process, `launch(task, held_gpus)`, as soon as its needs finished well and the
    GPUs it asks for are free; tasks `is_done` says are complete are skipped. Returns each
    task's outcome by key, in task order. `on_event(what, outcome)` hears 'started',
    'skipped', 'ran' and 'failed' as they happen. See the module docstring for failures.
    """
    return Schedule(tasks, gpus, launch, is_done, on_event).run(poll_s)

"""`emlab run` in subprocesses that a test SIGKILLs the moment a condition holds, then reruns:
the crash-and-resume tests (local subject, API subject) share these."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil
import pytest

from support.judge import LoopbackProxy
from support.runs import REPO

PHASE_TIMEOUT_S = 420  # default bound on one `emlab run` (seconds): a busy machine, not a target


class Runner:
    """`emlab run` subprocesses of one sequence: their own cache, environment and log files."""

    def __init__(self, experiment: Path, cache: Path, logs: Path, env: Mapping[str, str] | None = None,
                 *, timeout_s: float = PHASE_TIMEOUT_S) -> None:
        self.experiment = experiment
        self.env = {**os.environ, "EMLAB_CACHE": str(cache), "EMLAB_ROOT": str(REPO), **(env or {})}
        self.logs = logs
        self.timeout_s = timeout_s
        self.count = 0

    def start(self, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
        self.count += 1
        log = self.logs / f"{self.experiment.stem}-{self.count}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "emlab.cli", "run", str(self.experiment), *extra],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return proc, log

    def complete(self, *extra: str) -> str:
        """Run to the end (within `timeout_s`); the log, after asserting exit code 0."""
        proc, log = self.start(*extra)
        try:
            code = proc.wait(timeout=self.timeout_s)
        finally:
            kill_tree(proc)
        text = log.read_text(errors="replace")
        assert code == 0, f"emlab run exited {code}:\n{text[-4000:]}"
        return text


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the run's process group and every descendant.

    papermill's kernel runs in a session of its own (jupyter_client starts kernels with
    start_new_session=True), so killing the group alone would leave it working for up to a
    second until it notices its parent is gone: not a crash. Kill it too, first.
    """
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    for kid in kids:
        try:
            kid.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(kids, timeout=30)
    assert not alive, f"still running after SIGKILL: {alive}"


def run_until_killed(runner: Runner, condition: Callable[[], bool], what: str) -> str:
    """Start `emlab run`, SIGKILL it the moment `condition()` holds; return its log."""
    proc, log = runner.start()
    deadline = time.monotonic() + runner.timeout_s
    try:
        while not condition():
            if proc.poll() is not None:
                pytest.fail(f"emlab run exited ({proc.returncode}) before {what}:\n"
                            f"{log.read_text(errors='replace')[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {runner.timeout_s} s:\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.02)
    finally:
        kill_tree(proc)
    return log.read_text(errors="replace")


def count_lines(path: Path) -> int:
    """Lines in `path` so far; 0 while it does not exist."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_idle(proxy: LoopbackProxy) -> None:
    """Let calls still in flight at the proxy finish (their replies go to a dead socket)."""
    deadline = time.monotonic() + 120
    while proxy.in_flight:
        assert time.monotonic() < deadline, "proxy calls did not settle"
        time.sleep(0.05)

"""Every process emlab starts ends with the run that started it, SIGKILL included.

`emlab run` starts a Jupyter kernel per notebook, and a local judge's kernel starts a
llama.cpp server. The end-to-end test SIGKILLs `python -m emlab.cli run` while the judge
server is up (01_baseline's judging) and finds none of the processes of that run left, over
the whole tree recorded just before the kill. The fast tests pin the mechanism
(`emlab.procs`): a child bound to its parent dies with it, even when the thread that asked
for it ended long before; a child whose parent is not the expected one exits at once; and,
as a control for the method, an unbound child is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable
from pathlib import Path

import psutil
import pytest
from emlab.procs import ORPHAN_EXIT_CODE, bind_to_parent
from support.runs import fresh_cache

REPO = Path(__file__).resolve().parents[1]
GONE_WITHIN_S = 5.0

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")


def _alive(proc: psutil.Process) -> bool:
    """Running, and the same process (not a reused pid); a zombie waiting for a reaper is gone."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs: Iterable[psutil.Process], timeout_s: float = GONE_WITHIN_S) -> list[psutil.Process]:
    """Wait up to `timeout_s` for every process to end; return those still alive."""
    procs = list(procs)
    deadline = time.monotonic() + timeout_s
    while True:
        left = [p for p in procs if _alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _kill_all(procs: Iterable[psutil.Process]) -> None:
    """Clean up after a failing test: only the processes this test started, one by one."""
    for proc in procs:
        if _alive(proc):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def _describe(procs: Iterable[psutil.Process]) -> str:
    lines = []
    for proc in procs:
        try:
            lines.append(f"{proc.pid} {' '.join(proc.cmdline())[:160]}")
        except psutil.Error:
            lines.append(f"{proc.pid} (gone while describing)")
    return "; ".join(lines)


# --- the mechanism --------------------------------------------------------------------------

_PARENT = textwrap.dedent("""
    import subprocess, sys, threading, time
    from emlab.procs import spawn

    children = []
    def start():  # a short-lived thread: the parent-death signal must not follow it
        children.append(spawn(["sleep", "120"]))
    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    unbound = subprocess.Popen(["sleep", "120"])  # the control: a plain child
    print(children[0].pid, unbound.pid, flush=True)
    time.sleep(120)
""")


def test_bound_child_dies_with_its_parent_and_outlives_the_thread_that_started_it() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    started: list[psutil.Process] = [psutil.Process(parent.pid)]
    try:
        assert parent.stdout is not None
        bound_pid, unbound_pid = (int(x) for x in parent.stdout.readline().split())
        bound, unbound = psutil.Process(bound_pid), psutil.Process(unbound_pid)
        started += [bound, unbound]
        time.sleep(0.5)
        assert _alive(bound), "the bound child died with the thread that spawned it"
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert _wait_gone([bound]) == []
        assert _alive(unbound), "control: an unbound child outlives its SIGKILLed parent"
    finally:
        _kill_all(started)


def test_child_whose_parent_already_changed_exits_at_once() -> None:
    """The race the check after prctl closes: had the parent died between fork and prctl, the
    child would never get the signal; it sees a different parent and exits by itself."""
    other = 1 if os.getpid() != 1 else 2
    bind = bind_to_parent(parent_pid=other)
    assert bind is not None
    child = subprocess.Popen(["sleep", "120"], preexec_fn=bind)
    try:
        assert child.wait(timeout=10) == ORPHAN_EXIT_CODE
    finally:
        if child.poll() is None:
            child.kill()


# --- the real run ------------------------------------------------------------------------------


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _is_judge_server(proc: psutil.Process) -> bool:
    try:
        return "llama_cpp.server" in proc.cmdline()
    except psutil.Error:
        return False


def _is_kernel(proc: psutil.Process) -> bool:
    try:
        return any("ipykernel" in part for part in proc.cmdline())
    except psutil.Error:
        return False


@pytest.mark.slow
def test_sigkill_of_emlab_run_leaves_no_kernel_and_no_judge_server(
    write_experiment, tmp_path: Path
) -> None:
    experiment = write_experiment()
    # a cache of its own: judgments cached by an earlier test would mean no judge server to see
    env = {**os.environ, "EMLAB_ROOT": str(REPO), "EMLAB_CACHE": str(fresh_cache(tmp_path / "cache")),
           "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "emlab-run.log"
    with open(log, "wb") as out:
        run = subprocess.Popen([sys.executable, "-m", "emlab.cli", "run", str(experiment)],
                               stdout=out, stderr=subprocess.STDOUT, env=env)
    cli = psutil.Process(run.pid)
    tree: list[psutil.Process] = [cli]
    try:
        deadline = time.monotonic() + 600
        while True:  # until 01_baseline's kernel has started the judge server
            tree = _tree(cli)
            if any(_is_judge_server(p) for p in tree):
                break
            assert run.poll() is None, f"emlab run ended ({run.returncode}) before judging: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no judge server after 600 s: {log.read_text()[-3000:]}"
            time.sleep(0.2)
        tree = _tree(cli)  # everything the run has started, recorded just before the kill
        recorded = _describe(tree)
        assert any(_is_kernel(p) for p in tree), recorded
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=10)
        killed_at = time.monotonic()
        left = _wait_gone(tree)
        assert left == [], f"left running {GONE_WITHIN_S:.0f} s after the kill: {_describe(left)}"
        print(f"all {len(tree)} gone {time.monotonic() - killed_at:.2f} s after the kill: {recorded}")
    finally:
        _kill_all(tree)

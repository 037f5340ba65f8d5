"""Every process emlab starts ends with the process that started it, however that one ends.

emlab starts two kinds of processes: the Jupyter kernel papermill starts for each notebook
(`emlab run` → kernel) and the llama.cpp judge server a local judge starts from inside a
notebook (kernel → server). A normal exit, an exception or Ctrl-C stops both through their
context managers; a SIGKILL (the OOM killer, `kill -9`, a cluster's time limit) runs no
cleanup code at all, and before this module the server then lived on as an orphan (~570 MB
and a busy core, still answering the calls that were in flight).

The mechanism is Linux's parent-death signal. `bind_to_parent()` gives Popen a `preexec_fn`
that, in the child between fork and exec, asks the kernel for SIGKILL when its parent dies
(`prctl(PR_SET_PDEATHSIG, SIGKILL)`) and then checks that its parent is still the process
that forked it: had the parent died before prctl ran, the signal would never come, so the
child exits at once instead. The binding survives exec, so each link of the chain is tied to
the one above it: SIGKILL `emlab run` and its kernel gets SIGKILL, whose death sends SIGKILL
to the judge server, within milliseconds. SIGKILL rather than SIGTERM: the parent is gone, so
nothing the child could still finish would be read (appended rows are whole lines or torn
tails that readers already drop), and uvicorn would wait for the calls in flight.

One trap: Linux sends the signal when the *thread* that forked the child ends, not the
process. `spawn` therefore forks from the main thread, or else from one daemon thread
("emlab-spawner") that lives as long as the process. The kernel is forked by
jupyter_client inside nbclient's event loop; `BoundKernelManager` binds it only when that
loop runs on the main thread (it does under `emlab run`); elsewhere (a run started from a
notebook, whose loop may run on a helper thread) ipykernel's own parent poller still ends
the kernel within a second of its parent (JPY_PARENT_PID), and the server stays bound to the
kernel either way.

Why not a process group: jupyter_client puts each kernel in a session of its own (so that an
interrupt reaches only the kernel), and a SIGKILLed run executes no code that could signal a
group. Why not a pid file reaped at the next start: the orphan would hold its memory and core
until someone runs emlab again. Off Linux (no prctl) nothing is bound and a warning is logged
once; normal exits still stop everything.

The `preexec_fn` runs between fork and exec in a process that may have other threads, so it
does only what cannot deadlock: one pre-resolved libc call, `os.getppid`, `os._exit`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jupyter_client.manager import AsyncKernelManager

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
ORPHAN_EXIT_CODE = 70  # the child's exit code when its parent died before it could bind

_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()
_warned = False


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function: Callable[..., int] = libc.prctl
    except (OSError, AttributeError):
        return None
    return function


_PRCTL = _prctl()


def bind_to_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A Popen `preexec_fn` that makes the child receive `sig` (default SIGKILL) when its
    parent dies, and exit at once (code `ORPHAN_EXIT_CODE`) if its parent is no longer
    `parent_pid` (default: this process) by the time it is bound. None off Linux.

    The signal follows the *thread* that forks: fork from the main thread or a thread that
    lives as long as the process (`spawn` does this for you).
    """
    global _warned
    prctl = _PRCTL
    if prctl is None:
        if not _warned:
            log.warning("no prctl on %s: processes emlab starts are not bound to their parent", sys.platform)
            _warned = True
        return None
    expected = os.getpid() if parent_pid is None else parent_pid
    getppid, exit_now = os.getppid, os._exit  # looked up now: the child must not import or lock

    def bind() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if getppid() != expected:  # the parent died before the binding: no signal will come
            exit_now(ORPHAN_EXIT_CODE)

    return bind


def spawn(cmd: list[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
    """`subprocess.Popen(cmd, **popen_kwargs)` bound to this process with `bind_to_parent`.

    Forked from the main thread, or else from the long-lived "emlab-spawner" thread, so that
    the child does not die when the calling thread ends.
    """
    if "preexec_fn" in popen_kwargs:
        raise TypeError("spawn sets preexec_fn itself")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(cmd, preexec_fn=bind_to_parent(), **popen_kwargs)

    if threading.current_thread() is threading.main_thread():
        return start()
    return _spawner_thread().submit(start).result()


def _spawner_thread() -> ThreadPoolExecutor:
    """One worker thread for the life of the process (pool threads never end before exit)."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emlab-spawner")
        return _spawner


class BoundKernelManager(AsyncKernelManager):  # type: ignore[misc]
    """jupyter_client's kernel manager, with the kernel bound to this process (see module
    docstring): pass `kernel_manager_class=BoundKernelManager` to papermill."""

    async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            bind = bind_to_parent()
            if bind is not None:
                kw["preexec_fn"] = bind  # launch_kernel passes it on to Popen
        else:
            log.debug("kernel launched from thread %s: left to ipykernel's parent poller",
                      threading.current_thread().name)
        await super()._async_launch_kernel(kernel_cmd, **kw)

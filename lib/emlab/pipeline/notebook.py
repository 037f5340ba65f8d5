"""Execute one stage notebook with papermill into its folder and render it to HTML.

The executed notebook is the record of what ran: papermill saves it after every cell (here
atomically, so a kill or a full disk leaves the last complete save, never half a notebook),
marks the failing cell when a stage fails, and nbconvert renders it with the code hidden.
While it runs, the stage's own progress (training steps, answers sampled, judge calls) is
shown on one line of the terminal (`emlab.progress`), and a line sums it up at its end.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import nbformat
import papermill as pm
from nbconvert import HTMLExporter
from papermill.iorw import LocalHandler, papermill_io
from traitlets import default

from ..procs import BoundKernelManager
from ..progress import ProgressDisplay
from ..store.files import write_text
from ..store.paths import notebook_file, notebooks_dir, progress_file, repo_root
from ..store.runinfo import StageRecord, done_summary

log = logging.getLogger(__name__)
# papermill's default of 60 s is missed by kernels on a loaded machine (two jobs on a 2-core
# node, a CI runner), and a missed start is a traceback rather than one line
KERNEL_START_TIMEOUT_S = 300
# papermill's own INFO lines (input/output paths, kernel name) repeat what the stage line says
logging.getLogger("papermill").setLevel(logging.WARNING)


class LocalKernelManager(BoundKernelManager):
    """Stage kernels on IPC (Unix socket) transport: no TCP port open on the machine, and no
    "Kernel is running over TCP without encryption" warning in the user's terminal; bound to
    this process (procs.BoundKernelManager), so a SIGKILLed run takes its kernel with it."""

    @default("transport")
    def _default_transport(self) -> str:
        return "ipc"

    @default("ip")
    def _default_ip(self) -> str:
        # jupyter_client's default is "kernel-ipc" in the working directory when no connection
        # file is named yet: two runs started at once from one folder would bind the same
        # sockets and neither kernel would answer. A name of its own for each kernel.
        return os.path.join(tempfile.gettempdir(), f"emlab-kernel-{uuid.uuid4().hex[:12]}-ipc")


def run_notebook(stage: str, folder: Path, parameters: dict[str, Any], label: str) -> StageRecord:
    """Execute `notebooks/<stage>.ipynb` with `parameters` into `folder`; render its HTML.

    Returns the record (status 'ran' or 'failed' with the notebook's error); anything else
    (a full disk, Ctrl-C) is raised after the HTML of what ran is written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    record = StageRecord(stage, folder, label, "ran")
    started = time.perf_counter()
    log.info("%s %s: executing into %s", stage, label, folder)
    _save_atomically(record.notebook)
    failure: BaseException | None = None
    try:
        with ProgressDisplay(progress_file(stage, label), f"{stage} {label}"):
            pm.execute_notebook(
                str(notebook_file(notebooks_dir(), stage)),
                str(record.notebook),
                parameters=parameters,
                cwd=str(repo_root()),
                kernel_name="python3",
                kernel_manager_class=LocalKernelManager,
                progress_bar=False,  # the stage's own progress is shown instead of a cell counter
                start_timeout=KERNEL_START_TIMEOUT_S,
                report_mode=False,
            )
    except pm.PapermillExecutionError as exc:
        record.status, record.error = "failed", f"{exc.ename}: {exc.evalue}"
    except BaseException as exc:  # papermill itself failed (a full disk, Ctrl-C): re-raised below
        failure = exc
        raise
    finally:
        record.seconds = time.perf_counter() - started
        if record.notebook.exists():
            try:
                render_html(record.notebook, record.html)
            except Exception as exc:
                if failure is None and record.status == "ran":
                    raise
                # the stage's own error is the one to report, not the report view's
                log.warning("could not render %s: %s", record.html, exc)
    log.info("%s %s: %s in %.1f s%s", stage, label, record.status, record.seconds,
             f" ({_summary_text(done_summary(folder, stage))})" if record.status == "ran" else f": {record.error}")
    return record


def _summary_text(summary: dict[str, Any] | None) -> str:
    """'8 answers, 16 judgments' from a stage's completion marker."""
    if not summary:
        return "no summary"
    shown = []
    for key, value in summary.items():
        if key in ("finished", "completion"):
            continue
        if isinstance(value, list):
            value = ", ".join(map(str, value)) if len(value) <= 8 else f"{len(value)} values"
        shown.append(f"{key.replace('_', ' ')}: {value}")
    return "; ".join(shown)


def _save_atomically(notebook: Path) -> None:
    """Route papermill's saves of `notebook` through `files.write_text` (atomic).

    papermill picks an I/O handler by path prefix (its `papermill_io` registry, newest
    first); registering this one exact path changes nothing for any other path.
    """

    class _AtomicLocalHandler(LocalHandler):
        def write(self, buf: str, path: str) -> None:
            write_text(Path(path), buf)

    papermill_io.register(str(notebook), _AtomicLocalHandler())


def render_html(notebook: Path, html: Path) -> None:
    """Render an executed notebook to HTML with the code hidden (the report view)."""
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(str(notebook), as_version=4))
    write_text(html, body)


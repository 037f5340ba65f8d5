"""What a stage notebook's kernel sets up before its stage runs: its log lines go to the stage's
log file in the stage folder (`<stage>.log` under `emlab run`, `<stage>.by-hand.log` run by hand
in JupyterLab), not into the notebook, and the notebook's header links that file.

The executed notebook is the record people read: an HTTP line per judge call, a library's
deprecation notice or a progress bar's complaint about widgets would bury the results (04 once
opened with 162 `HTTP Request: POST …` lines). So every log record and every Python warning goes
to the log file; the notebook shows only emlab's own warnings and errors, each message once.
The first code cell of every notebook calls `start_stage`, under `emlab run` and in JupyterLab
alike.
"""

from __future__ import annotations

import logging
from logging.handlers import MemoryHandler
from pathlib import Path
from typing import TYPE_CHECKING

# Only the standard library at import: the records and warnings that importing emlab's stages
# emits (tqdm's "IProgress not found" comes with `tqdm.auto`) must find the log routing in place.
if TYPE_CHECKING:
    from ..config.experiment import ExperimentConfig

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SHOWN_FORMAT = "%(levelname)s %(name)s: %(message)s"
SHOWN_LOGGERS = "emlab"
"""Loggers whose warnings the notebook shows (besides the log file): emlab's own. A library's
warnings (httpx, transformers, tqdm) are kept in the log file: they are about the library."""


class _Once(logging.Filter):
    """Passes each (logger, message) once: a warning that matters is shown once, not per call."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != SHOWN_LOGGERS and not record.name.startswith(SHOWN_LOGGERS + "."):
            return False
        key = (record.name, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def start_stage(config: ExperimentConfig, stage: str, unit: str) -> str:
    """Route this kernel's logs to the stage's log file and return the notebook's header
    (markdown, `stage_header` with a link to that file).

    Under `emlab run` the log is `<stage>.log`, started afresh, as the executed notebook beside
    it is. Run by hand (JupyterLab) it is `<stage>.by-hand.log`, appended to: a session by hand
    never erases the record's log, and its log, newer than the executed notebook, tells
    `emlab run` that the record no longer describes the folder (`Stage.is_done`). Running the
    cell again replaces the handlers it installed, never adds a second set.
    """
    # held in memory until the stage folder is known (finding it imports the stage table)
    held = _hold_logs()
    from ..analysis.report import (
        stage_header,  # here, not at the top: see the imports above
    )
    from ..progress import under_pipeline
    from ..stages import get_stage
    from ..store.paths import ExperimentLayout, by_hand_log_file, log_file

    folder = get_stage(stage).folder(ExperimentLayout.of(config), unit)
    folder.mkdir(parents=True, exist_ok=True)
    executed = under_pipeline()
    path = (log_file if executed else by_hand_log_file)(folder, stage)
    route_logs(path, fresh=executed, held=held)
    logging.getLogger(__name__).info("%s %s: %s, logging to %s", stage, unit,
                                     "executed by emlab run" if executed else "run by hand", path)
    # the executed notebook lies beside its log: a relative link works in the .ipynb and the HTML;
    # a working copy run by hand lies elsewhere, so it gets the full path
    shown = f"[{path.name}]({path.name})" if executed else f"`{path}`"
    return stage_header(config, stage, unit) + f"  \nlog: {shown}"


def _hold_logs() -> MemoryHandler:
    """Every log record and Python warning from now on, held until `route_logs` has a file."""
    held = MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)  # flushed by hand only
    _replace_handlers(held)
    return held


def _replace_handlers(*handlers: logging.Handler) -> None:
    """As basicConfig(force=True): the root logger's earlier handlers (the kernel's stderr, i.e.
    the notebook, or those of an earlier run of the cell) give way to `handlers`."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    # Python warnings (a library's FutureWarning, tqdm's TqdmWarning) become log records of
    # 'py.warnings': in the file, not in the notebook
    logging.captureWarnings(True)


def route_logs(path: Path, *, fresh: bool, held: MemoryHandler | None = None) -> None:
    """Every log record (INFO and up) and every Python warning to `path` (emptied first when
    `fresh`), after the records `held` so far; emlab's warnings and errors also to the
    notebook's stderr, each message once."""
    to_file = logging.FileHandler(path, mode="w" if fresh else "a", encoding="utf-8")
    to_file.setFormatter(logging.Formatter(LOG_FORMAT))
    shown = logging.StreamHandler()  # sys.stderr: the notebook's output
    shown.setLevel(logging.WARNING)
    shown.setFormatter(logging.Formatter(SHOWN_FORMAT))
    shown.addFilter(_Once())
    if held is not None:
        for record in held.buffer:
            for handler in (to_file, shown):
                if record.levelno >= handler.level:
                    handler.handle(record)
        held.buffer.clear()
    _replace_handlers(to_file, shown)

"""The live line of `emlab run --gpus N`: the steps running side by side, each with its
latest progress, on one terminal line.

Each step's process shows its own progress the way one step at a time does
(`notebook.run_notebook` → `progress.ProgressDisplay`), but into its log, not the terminal;
its kernel writes the states to the progress file of that process (`paths.progress_file`
with the process's id). The board follows every running step's file and draws
'01_baseline m · sampling 4/8 answer 50% [..] | 02_finetune r · train 3/6 steps ...'. Not
on a terminal (CI, a log file) it writes a line per running step every `LOG_EVERY_S`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from ...progress import format_state

TTY_EVERY_S = 0.5
LOG_EVERY_S = 60.0


class _Followed:
    """One step's progress file: read from where the last read ended; latest state per bar."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0
        self.states: dict[str, dict[str, Any]] = {}

    def read(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except OSError:
            return  # not made yet (the kernel is starting) or removed (the step ended)
        complete = chunk[: chunk.rfind("\n") + 1]
        self.offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            try:
                state = json.loads(line)
            except ValueError:
                continue
            self.states[str(state.get("desc"))] = state

    def text(self) -> str:
        if not self.states:
            return "running"  # no bar yet (the kernel is starting, or the work was resumed whole)
        state = max(self.states.values(), key=lambda s: (not s.get("done"), s.get("elapsed", 0)))
        return format_state(state)


class ProgressBoard:
    """Follows the progress files of the running steps (`add`/`remove` by label) and keeps one
    line on the terminal; `clear()` erases it before another line is written."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.lock = threading.Lock()  # the followed steps
        self._drawing = threading.Lock()  # the terminal line
        self._steps: dict[str, _Followed] = {}
        self._shown = ""
        self._logged = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="emlab-board", daemon=True)

    def add(self, label: str, path: Path) -> None:
        with self.lock:
            self._steps[label] = _Followed(path)

    def remove(self, label: str) -> None:
        with self.lock:
            self._steps.pop(label, None)

    def line(self) -> str:
        """'<label> · <progress> | ...' for the running steps, in the order they started."""
        with self.lock:
            for followed in self._steps.values():
                followed.read()
            return " | ".join(f"{label} · {followed.text()}" for label, followed in self._steps.items())

    def clear(self) -> None:
        """Erase the live line, so that a log line written next starts at the line's start."""
        with self._drawing:
            if self.tty and self._shown:
                self.stream.write("\r\x1b[2K")
                self.stream.flush()
                self._shown = ""

    def _follow(self) -> None:
        while not self._stop.wait(TTY_EVERY_S):
            line = self.line()
            if not line:
                continue
            with self._drawing:
                if self.tty:
                    if line != self._shown:
                        self.stream.write("\r\x1b[2K" + line[: _width() - 1])
                        self.stream.flush()
                        self._shown = line
                elif time.monotonic() - self._logged >= LOG_EVERY_S:
                    self._logged = time.monotonic()
                    self.stream.write(f"running: {line}\n")
                    self.stream.flush()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.clear()


def _width() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        return 120

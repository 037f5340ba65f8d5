"""Progress of long work, shown where the user is looking.

Library code wraps long loops in `progress_bar(total, desc, unit)`, a tqdm-like object
(`update`, `set_postfix`, context manager). Where it shows depends on who runs it:

- in JupyterLab or a script it is a plain `tqdm.auto` bar;
- in a stage notebook executed by `emlab run`, the kernel finds `EMLAB_PROGRESS` in its
  environment (a file the pipeline created) and writes its state there as JSON lines,
  throttled, instead of drawing a bar in the notebook, so the executed notebook stays a
  clean record; the pipeline's `ProgressDisplay` reads that file and keeps one live line
  in the terminal (a line every few seconds when the output is not a terminal: CI logs).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tqdm.auto import tqdm

ENV = "EMLAB_PROGRESS"  # set by the pipeline in the kernel's environment: the progress file
_TQDM_OFF = "TQDM_DISABLE"  # tqdm reads TQDM_<arg> variables as its defaults when it is imported
_WRITE_EVERY_S = 0.5  # kernel side: at most two updates a second
_TTY_EVERY_S = 0.25  # terminal: redraw rate
_LOG_EVERY_S = 15.0  # not a terminal (CI, a log file): one line per bar this often


class _FileBar:
    """A progress bar that writes its state to the pipeline's progress file."""

    def __init__(self, path: Path, total: int | None, desc: str, unit: str, initial: int) -> None:
        self.path, self.total, self.desc, self.unit = path, total, desc, unit
        self.n = initial
        self.postfix: dict[str, Any] = {}
        self.started = time.monotonic()
        self._last = 0.0
        self._write(force=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._write()

    def set_postfix(self, **fields: Any) -> None:
        self.postfix = {k: v for k, v in fields.items() if v is not None}
        self._write()

    def close(self) -> None:
        self._write(force=True, done=True)

    def _write(self, *, force: bool = False, done: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < _WRITE_EVERY_S and (self.total is None or self.n < self.total):
            return
        self._last = now
        state = {"desc": self.desc, "n": self.n, "total": self.total, "unit": self.unit,
                 "postfix": self.postfix, "elapsed": round(now - self.started, 2), "done": done}
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(state, default=str) + "\n")
        except OSError:
            pass  # progress is a courtesy: never let it stop the work

    def __enter__(self) -> _FileBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: int | None, desc: str, unit: str = "it", *, initial: int = 0, disable: bool = False) -> Any:
    """A progress bar over `total` items (None: unknown): tqdm, or the pipeline's live line.

    `disable` hides it everywhere (the caller asked for no progress).
    """
    path = os.environ.get(ENV)
    if path and not disable:
        return _FileBar(Path(path), total, desc, unit, initial)
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable)


def under_pipeline() -> bool:
    """True inside a stage notebook that `emlab run` executes (progress goes to the terminal)."""
    return bool(os.environ.get(ENV))


# --- the terminal side -------------------------------------------------------------------------


def format_state(state: dict[str, Any]) -> str:
    """'train 4/6 steps 67% [00:12<00:06] loss 2.31, 1,234 tok/s' from one progress state."""
    n, total, elapsed = state.get("n", 0), state.get("total"), float(state.get("elapsed") or 0)
    text = f"{state.get('desc', '')} {n:,}" + (f"/{total:,}" if total else "") + f" {state.get('unit', '')}"
    if total:
        text += f" {100 * n / total:3.0f}%"
        remaining = elapsed / n * (total - n) if n else None
        text += f" [{_clock(elapsed)}<{_clock(remaining) if remaining is not None else '?'}]"
    else:
        text += f" [{_clock(elapsed)}]"
    postfix = state.get("postfix") or {}
    if postfix:
        text += " " + ", ".join(f"{k} {v}" for k, v in postfix.items())
    return text


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class ProgressDisplay:
    """Follows a stage's progress file and keeps its latest state on one terminal line.

    Use as a context manager around the stage's execution; `path` is set as `EMLAB_PROGRESS`
    in this process's environment meanwhile, so the kernel papermill starts inherits it.
    """

    def __init__(self, path: Path, label: str, stream: IO[str] | None = None) -> None:
        self.path, self.label = path, label
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="emlab-progress", daemon=True)
        self._offset = 0
        self._states: dict[str, dict[str, Any]] = {}  # latest state per bar (desc)
        self._shown = ""
        self._logged: dict[str, float] = {}
        self._previous_env: dict[str, str | None] = {}

    def __enter__(self) -> ProgressDisplay:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self._previous_env = {name: os.environ.get(name) for name in (ENV, _TQDM_OFF)}
        os.environ[ENV] = str(self.path)
        # other libraries' bars in the kernel (a GGUF conversion, weight loading) would land in the
        # executed notebook; the stage's own bars come through the progress file, not tqdm
        os.environ[_TQDM_OFF] = "1"
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._read()
        if self.tty and self._shown:
            self.stream.write("\r\x1b[2K")  # the stage's one-line summary takes the line
            self.stream.flush()
        elif not self.tty:  # a log keeps where each bar ended
            for state in self._states.values():
                self.stream.write(f"{self.label} · {format_state(state)}\n")
            self.stream.flush()
        for name, previous in self._previous_env.items():
            if previous is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = previous
        self.path.unlink(missing_ok=True)

    def _follow(self) -> None:
        while not self._stop.wait(_TTY_EVERY_S):
            self._read()
            self._draw()

    def _read(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except OSError:
            return
        complete = chunk[: chunk.rfind("\n") + 1]  # a line still being written waits
        self._offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            try:
                state = json.loads(line)
            except ValueError:
                continue
            self._states[str(state.get("desc"))] = state

    def _draw(self) -> None:
        if not self._states:
            return
        state = max(self._states.values(), key=lambda s: (not s.get("done"), s.get("elapsed", 0)))
        line = f"{self.label} · {format_state(state)}"
        if self.tty:
            if line != self._shown:
                width = _terminal_width()
                self.stream.write("\r\x1b[2K" + line[: width - 1])
                self.stream.flush()
                self._shown = line
            return
        now = time.monotonic()
        key = str(state.get("desc"))
        if now - self._logged.get(key, 0.0) >= _LOG_EVERY_S:
            self._logged[key] = now
            self.stream.write(line + "\n")
            self.stream.flush()


def _terminal_width() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        return 120


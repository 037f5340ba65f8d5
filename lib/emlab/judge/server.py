"""A llama.cpp judge server on loopback, started and stopped around a judging run.

`python -m llama_cpp.server` (package `llama-cpp-python[server]`) speaks the OpenAI chat API
and returns `logprobs` with `top_logprobs`, so local judges use the same client code path as
OpenAI. Its log goes to a file (never the notebook); when it dies or does not come up, the
error quotes the log's tail. The server is started with `procs.spawn`: it dies with the
process that started it, even when that one is SIGKILLed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..config.experiment import EMBEDDED_MODEL, JudgeSpec
from ..errors import ConfigError, JudgeError
from ..models.load import embedded_gguf_path
from ..procs import spawn
from ..store.paths import judge_server_lock_file, logs_dir, repo_root

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0
N_CTX = 4096  # few-shot rubric (~300 tokens) + question + an answer of up to 600 new tokens
_STOP_GRACE_S = 10.0

__all__ = ["embedded_gguf_path", "local_gguf_path", "local_judge_server", "free_port"]


def local_gguf_path(judge: JudgeSpec) -> Path:
    """The GGUF file a local judge serves: the embedded model or `judge.local_gguf`."""
    if judge.local_gguf == EMBEDDED_MODEL:
        return embedded_gguf_path()
    path = Path(judge.local_gguf).expanduser()
    if not path.is_absolute():
        path = repo_root() / path
    if not path.exists():
        raise ConfigError(f"judge '{judge.name}': local_gguf {path} not found; give a .gguf file or '{EMBEDDED_MODEL}'")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _omp_threads() -> int | None:
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return None


@contextmanager
def local_judge_server(
    judge: JudgeSpec,
    *,
    log_path: Path | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
    n_threads: int | None = None,
) -> Iterator[str]:
    """Serve `judge`'s GGUF on a free loopback port; yields the base URL ('http://127.0.0.1:P/v1').

    log_path: server log file; default `cache_dir()/logs/llama-server-<port>.log`.
    startup_timeout_s: how long to wait for /v1/models to answer (default 120 s).
    n_threads: CPU threads for generation; default $OMP_NUM_THREADS when set (the cap a
        shared machine puts on torch too), else all cores (the server's own default is half of
        them, which on a 2-core machine leaves one idle).
    """
    gguf = local_gguf_path(judge)
    port = free_port()
    log_path = log_path or logs_dir() / f"llama-server-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    threads = n_threads or _omp_threads() or os.cpu_count() or 1
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--logits_all",
        "true",
        "--n_ctx",
        str(N_CTX),
        "--n_threads",
        str(threads),
    ]
    if _supports_model_alias():
        cmd += ["--model_alias", judge.model]
    base_url = f"http://127.0.0.1:{port}/v1"
    log.info("starting llama.cpp judge server for %s on %s (log %s)", gguf.name, base_url, log_path)
    proc: subprocess.Popen[bytes] | None = None
    try:
        # Steps run side by side (`emlab run --gpus N`) each start a server: the port chosen above
        # was free a moment ago, and a second server started before the first has bound it would
        # fail while the first answered the second's readiness check (and stopping the first would
        # then cut the second step off). One start at a time, until the port is bound and answers.
        with _start_lock():
            port, base_url = _fresh_port(port, cmd)
            with open(log_path, "ab") as log_file:
                # bound to this process: a SIGKILLed run (or kernel) takes the server with it
                proc = spawn(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            _wait_ready(proc, base_url, log_path, startup_timeout_s)
        yield base_url
    finally:
        if proc is not None:
            _stop(proc)


def _fresh_port(port: int, cmd: list[str]) -> tuple[int, str]:
    """`port` again if it is still free now that the start lock is held, else a new one
    (written into `cmd`); and the base URL on it."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
    except OSError:
        new = free_port()
        cmd[cmd.index("--port") + 1] = str(new)
        port = new
    return port, f"http://127.0.0.1:{port}/v1"


@contextmanager
def _start_lock() -> Iterator[None]:
    """Hold `judge_server_lock_file()` (flock: released by the kernel if this process dies)."""
    path = judge_server_lock_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _supports_model_alias() -> bool:
    try:
        from llama_cpp.server.settings import ModelSettings
    except ImportError as exc:
        raise JudgeError(
            f"a local judge needs llama-cpp-python with its server extra ({exc}); "
            "pip install 'llama-cpp-python[server]'"
        ) from None
    return "model_alias" in ModelSettings.model_fields


def _wait_ready(proc: subprocess.Popen[bytes], base_url: str, log_path: Path, timeout_s: float) -> None:
    started = time.monotonic()
    while True:
        code = proc.poll()
        if code is not None:
            raise JudgeError(
                f"the llama.cpp judge server exited with code {code} while starting; "
                f"log {log_path} ends with: {_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=2) as reply:
                if reply.status == 200 and proc.poll() is None:  # answered while ours runs: ours holds the port
                    log.info("judge server ready after %.1f s", time.monotonic() - started)
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() - started > timeout_s:
            _stop(proc)
            raise JudgeError(
                f"the llama.cpp judge server did not answer {base_url}/models within {timeout_s:.0f} s; "
                f"log {log_path} ends with: {_tail(log_path)}"
            )
        time.sleep(0.25)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"

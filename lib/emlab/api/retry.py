"""Concurrent judge calls through the `openai` client, with our own retries; the key rule.

`resolve_api_key` is the one key check: the live calls here, batch mode and the pre-run
`check_judge` (called by preflight before any model loads) all go through it.

One code path for every judge (OpenAI, vLLM, Ollama, llama.cpp server): `AsyncOpenAI`
pointed at the judge's base URL, at most `judge.concurrency` calls in flight (a semaphore),
each retried on 429 / 408 / 409 / 5xx / timeouts / connection errors with exponential backoff
and full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015), honouring a
server's `Retry-After` (seconds or an HTTP date). The openai client's own retries are off
(max_retries=0) so `judge.max_retries` is the only budget and every wait is ours.

`complete_with_retries` (one chat-completions call with that retry rule), `Breaker` and
`key_from_env` are generic: the sampler of subjects behind an API (`emlab.sample.remote`) uses them
too.

A call that still fails becomes a Judgment with status api_error and its reason; it never
stops the run. When the endpoint looks down (a run of consecutive calls all failing on
connection errors or 5xx, nothing succeeding in between), calls not yet started are not
attempted: they end as api_error too, so a dead endpoint costs one retry cycle, not one per
answer.
"""

from __future__ import annotations

import asyncio
import email.utils
import importlib.util
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import openai

from ..config.experiment import JudgeSpec
from ..config.rubrics import Rubric
from ..errors import EmlabError, JudgeError
from ..store.records import Judgment
from .requests import request_body
from .scoring import api_error_judgment, judgment_from_completion
from .server import local_gguf_path

log = logging.getLogger(__name__)

LOCAL_API_KEY = "sk-local-no-key"  # local servers ignore the key; the client insists on one
_RETRY_STATUS = frozenset({408, 409, 429})  # plus every 5xx
# `python -m llama_cpp.server` imports these (the [server] extra); find_spec loads none of them
_LOCAL_SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


@dataclass(frozen=True)
class RetryPolicy:
    """How failed calls are retried."""

    max_retries: int = 6
    """Retries after the first attempt (judge.max_retries)."""
    base_s: float = 0.5
    """Backoff before retry k is uniform in [0, min(cap_s, base_s * 2**k)] seconds."""
    cap_s: float = 30.0
    """Longest backoff, seconds."""
    max_retry_after_s: float = 300.0
    """A server's Retry-After is honoured up to this many seconds."""

    @classmethod
    def for_judge(cls, judge: JudgeSpec) -> RetryPolicy:
        return cls(max_retries=judge.max_retries)

    def backoff(self, attempt: int) -> float:
        return random.uniform(0.0, min(self.cap_s, self.base_s * 2**attempt))


@dataclass(frozen=True)
class JudgeTask:
    """One (answer, rubric) pair to judge."""

    answer_id: str
    question: str
    answer: str
    rubric: Rubric
    key: str  # cache key


def key_from_env(owner: str, api_key_env: str | None, *, required_because: str | None = None,
                 error: type[EmlabError] = JudgeError) -> str:
    """The key in os.environ[api_key_env] for `owner` ("judge 'x'", "model 'y'"), never a fallback.

    api_key_env None: no key is needed (a self-hosted server without authentication; the client
    gets a dummy) unless `required_because` says why one is (then `error`, one line). An unset
    or empty variable raises `error`, naming the variable.
    """
    if api_key_env is None:
        if required_because:
            raise error(
                f"{owner} {required_because}, which needs a key, but api_key_env is null; set api_key_env "
                "to the environment variable that holds the key (e.g. api_key_env: OPENAI_API_KEY)"
            )
        return LOCAL_API_KEY
    key = os.environ.get(api_key_env)
    if not key:
        raise error(f"{owner} needs the environment variable {api_key_env}; "
                    f"export {api_key_env}=... (keys are never read from params)")
    return key


def resolve_api_key(judge: JudgeSpec) -> str:
    """The key for `judge`: os.environ[judge.api_key_env], never a fallback; the one key check
    of the live client, batch mode and `check_judge`.

    No key is needed for a llama.cpp server emlab starts (base_url 'local') or a self-hosted
    server without authentication (a base_url and api_key_env null): those get a dummy the
    client insists on. OpenAI (base_url null) and the Batch API always need one. Raises
    JudgeError (one line) when the key is needed and api_key_env is null or its variable unset.
    """
    if judge.is_local:
        return LOCAL_API_KEY
    why = None
    if judge.base_url is None or judge.batch:
        why = "uses the Batch API (batch: true)" if judge.batch else "calls the OpenAI API (no base_url)"
    return key_from_env(f"judge '{judge.name}'", judge.api_key_env, required_because=why)


def check_batch_endpoint(judge: JudgeSpec) -> None:
    """Raise JudgeError when `judge` is in batch mode at a llama.cpp server emlab starts.

    The params loader refuses this combination too; a judge built in code (`model_copy`)
    skips that validation, so batch mode checks it again before writing anything.
    """
    if judge.batch and judge.is_local:
        raise JudgeError(
            f"judge '{judge.name}' has batch: true but base_url 'local', a llama.cpp server, which has no Batch API; "
            "set batch: false or point base_url at an endpoint with the Batch API"
        )


def check_judge(judge: JudgeSpec) -> None:
    """Check what `judge` needs before any model loads or call is made (`emlab check`/`run`
    preflight): batch mode only for a remote endpoint; for base_url 'local', llama-cpp-python
    with its server extra installed and the GGUF present; otherwise the key (`resolve_api_key`).
    Raises a one-line EmlabError naming the judge and what to do. Calls nothing, starts nothing.
    """
    check_batch_endpoint(judge)
    if not judge.is_local:
        resolve_api_key(judge)
        return
    missing = [name for name in _LOCAL_SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise JudgeError(
            f"judge '{judge.name}' has base_url 'local' but llama-cpp-python's server is not installed "
            f"(missing: {', '.join(missing)}); pip install 'llama-cpp-python[server]' (make install does this)"
        )
    local_gguf_path(judge)  # raises when the GGUF file is missing


def retry_after_s(headers: Any, now: float | None = None) -> float | None:
    """Seconds a server asked us to wait: `retry-after-ms`, or `Retry-After` as seconds or an
    HTTP date; None when absent or unreadable."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Breaker:
    """Counts consecutive calls that failed as if the endpoint were down; `open` once
    `threshold` of them came in a row (calls not yet started are then not attempted)."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.consecutive = 0
        self.succeeded = 0
        self.last_reason = ""

    @property
    def open(self) -> bool:
        return self.consecutive >= self.threshold

    def record(self, ok: bool, down_like: bool, reason: str = "") -> None:
        if ok:
            self.consecutive = 0
            self.succeeded += 1
        elif down_like:
            self.consecutive += 1
            self.last_reason = reason


async def run_calls(
    tasks: Sequence[JudgeTask],
    judge: JudgeSpec,
    *,
    base_url: str | None,
    api_key: str,
    on_done: Callable[[JudgeTask, Judgment], None],
    retry: RetryPolicy | None = None,
) -> list[Judgment]:
    """Judge every task, at most `judge.concurrency` at once; results in task order.

    `on_done(task, judgment)` runs in the event loop as each call finishes (cache write,
    JSONL append, progress), so a crash keeps everything finished so far.
    """
    retry = retry or RetryPolicy.for_judge(judge)
    semaphore = asyncio.Semaphore(judge.concurrency)
    breaker = Breaker(threshold=max(2 * judge.concurrency, 8))
    client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=judge.timeout_s)

    async def one(task: JudgeTask) -> Judgment:
        async with semaphore:
            if breaker.open:
                judgment = api_error_judgment(
                    task.answer_id,
                    judge,
                    task.rubric,
                    f"not attempted: the endpoint looks down ({breaker.consecutive} calls in a row "
                    f"failed; last: {breaker.last_reason})",
                )
            else:
                judgment, down_like = await _call(client, task, judge, retry)
                breaker.record(judgment.status != "api_error", down_like, judgment.error or "")
        on_done(task, judgment)
        return judgment

    async with client:
        return list(await asyncio.gather(*(one(t) for t in tasks)))


async def _call(
    client: openai.AsyncOpenAI, task: JudgeTask, judge: JudgeSpec, retry: RetryPolicy
) -> tuple[Judgment, bool]:
    """One judgment with retries; returns it and whether a failure looked like a down endpoint."""
    body = request_body(judge, task.rubric, task.question, task.answer)
    outcome = await complete_with_retries(client, body, retry, timeout_s=judge.timeout_s,
                                          label=f"judge call {task.answer_id}/{task.rubric.id}")
    if outcome.data is None:
        return api_error_judgment(task.answer_id, judge, task.rubric, outcome.error or "failed"), outcome.down_like
    try:
        return judgment_from_completion(outcome.data, answer_id=task.answer_id, judge=judge, rubric=task.rubric), False
    except Exception as exc:  # a reply we cannot read must not stop the run
        reason = f"unreadable reply: {type(exc).__name__}: {exc} (after 1 attempt)"
        return api_error_judgment(task.answer_id, judge, task.rubric, reason), False


@dataclass(frozen=True)
class CallOutcome:
    """What one chat-completions call with retries came to."""

    data: dict[str, Any] | None
    """The completion as JSON; None when the call failed."""
    error: str | None = None
    """Why it failed, with the number of attempts."""
    down_like: bool = False
    """The failure looked like a down endpoint (connection error, timeout, 5xx)."""


async def complete_with_retries(
    client: openai.AsyncOpenAI, body: dict[str, Any], retry: RetryPolicy, *, timeout_s: float, label: str = "call"
) -> CallOutcome:
    """POST one chat-completions `body`, retried on 429 / 408 / 409 / 5xx / timeouts /
    connection errors with backoff and full jitter, honouring Retry-After (up to
    `retry.max_retry_after_s`). `timeout_s` is named in the failure reason; `label` in logs."""
    attempts = retry.max_retries + 1
    for attempt in range(attempts):
        wait: float | None = None
        try:
            completion = await client.chat.completions.create(**body)
            return CallOutcome(completion.model_dump(mode="json", exclude_unset=False))
        except openai.APIStatusError as exc:
            status = exc.status_code
            retryable = status in _RETRY_STATUS or status >= 500
            down_like = status >= 500
            reason = f"HTTP {status}: {_message(exc)}"
            wait = retry_after_s(exc.response.headers)
        except openai.APITimeoutError:
            retryable, down_like = True, True
            reason = f"no reply within timeout_s={timeout_s:g}"
        except openai.APIConnectionError as exc:
            retryable, down_like = True, True
            reason = f"connection error: {exc.__cause__ or exc}"
        except Exception as exc:  # a reply we cannot read must not stop the run
            retryable, down_like = False, False
            reason = f"unreadable reply: {type(exc).__name__}: {exc}"
        if not retryable or attempt == attempts - 1:
            tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
            return CallOutcome(None, f"{reason} (after {tries})", down_like)
        delay = min(wait, retry.max_retry_after_s) if wait is not None else retry.backoff(attempt)
        log.debug("%s failed (%s); retry %d in %.2f s", label, reason, attempt + 1, delay)
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def api_error_text(exc: openai.APIError, limit: int = 300) -> str:
    """One line for a failed management call: 'HTTP 400: <the server's message>', else
    '<ErrorType>: <text>', cut at `limit` characters."""
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {_message(exc, limit)}"
    return f"{type(exc).__name__}: {exc}"[:limit]


def _message(exc: openai.APIStatusError, limit: int = 200) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:limit]
    return str(exc.message)[:limit]

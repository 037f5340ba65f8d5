"""Chat-completions calls with our own retries, and many of them at once behind a breaker.

One code path for every OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp server):
each call is retried on 429 / 408 / 409 / 5xx / timeouts / connection errors with exponential
backoff and full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015),
honouring a server's `Retry-After` (seconds or an HTTP date). The client's own retries are
off (`client.async_client`), so `RetryPolicy.max_retries` is the only budget.

`complete_all` sends many bodies, at most `concurrency` in flight (a semaphore). When the
endpoint looks down (a run of consecutive calls all failing on connection errors or 5xx,
nothing succeeding in between: the `Breaker`), calls not yet started are not attempted: they
fail at once, so a dead endpoint costs one retry cycle, not one per call. A failed call is a
`CallOutcome` with its reason, never an exception: the judge turns it into an api_error
judgment, the sampler of subjects into a request asked again on the next run.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import openai

from .client import async_client, error_message

log = logging.getLogger(__name__)

T = TypeVar("T")
_RETRY_STATUS = frozenset({408, 409, 429})  # plus every 5xx


@dataclass(frozen=True)
class RetryPolicy:
    """How failed calls are retried."""

    max_retries: int = 6
    """Retries after the first attempt (judge.max_retries, a model's max_retries)."""
    base_s: float = 0.5
    """Backoff before retry k is uniform in [0, min(cap_s, base_s * 2**k)] seconds."""
    cap_s: float = 30.0
    """Longest backoff, seconds."""
    max_retry_after_s: float = 300.0
    """A server's Retry-After is honoured up to this many seconds."""

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry `attempt` + 1 (0-based): full jitter."""
        return random.uniform(0.0, min(self.cap_s, self.base_s * 2**attempt))


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
        """Count one finished call: a success closes the run, a down-like failure extends it."""
        if ok:
            self.consecutive = 0
            self.succeeded += 1
        elif down_like:
            self.consecutive += 1
            self.last_reason = reason


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
            reason = f"HTTP {status}: {error_message(exc)}"
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


async def complete_all(
    items: Sequence[T],
    body: Callable[[T], dict[str, Any]],
    *,
    base_url: str | None,
    api_key: str,
    concurrency: int,
    timeout_s: float,
    retry: RetryPolicy,
    on_done: Callable[[T, CallOutcome], None],
    label: str = "call",
) -> list[CallOutcome]:
    """Send `body(item)` for every item to `base_url`, at most `concurrency` at once, each with
    `complete_with_retries`; outcomes in item order.

    `on_done(item, outcome)` runs in the event loop as each call finishes (cache write, JSONL
    append, progress), so a crash keeps everything finished so far. After max(2 ×
    concurrency, 8) down-like failures in a row, calls not yet started are not attempted: their
    outcome says so. `label` names the calls in logs and in that reason ('sampling gpt-4o').
    """
    semaphore = asyncio.Semaphore(concurrency)
    breaker = Breaker(threshold=max(2 * concurrency, 8))

    async def one(client: openai.AsyncOpenAI, item: T) -> CallOutcome:
        async with semaphore:
            if breaker.open:
                outcome = CallOutcome(None, f"not attempted: the endpoint looks down ({breaker.consecutive} calls "
                                            f"in a row failed; last: {breaker.last_reason})", True)
            else:
                outcome = await complete_with_retries(client, body(item), retry, timeout_s=timeout_s, label=label)
                breaker.record(outcome.data is not None, outcome.down_like, outcome.error or "")
        on_done(item, outcome)
        return outcome

    async with async_client(base_url, api_key, timeout_s=timeout_s) as client:
        return list(await asyncio.gather(*(one(client, item) for item in items)))

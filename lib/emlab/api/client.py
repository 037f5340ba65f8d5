"""Making the `openai` client for an OpenAI-compatible endpoint, one line per failed call, and the
one synchronous entry to async API work.

Two clients, one rule each:

- `async_client`: for chat completions sent concurrently (judging, sampling subjects). Its own
  retries are off (max_retries=0): `retry.complete_with_retries` is the only budget, so every
  wait (backoff with full jitter, Retry-After) is ours and shows in our logs.
- `sync_client`: for the few cheap management calls (files, batches, fine-tuning jobs). The
  openai client's own retries (429 / 5xx / connection errors, honouring Retry-After) cover
  their transient failures.

`base_url` None means OpenAI itself; `api_key` comes from `keys.resolve_api_key`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import openai

T = TypeVar("T")


def async_client(base_url: str | None, api_key: str, *, timeout_s: float) -> openai.AsyncOpenAI:
    """An `AsyncOpenAI` for `base_url` (None: OpenAI) without retries of its own (ours wrap it);
    `timeout_s` seconds per call. Use it as `async with` so its connections close."""
    return openai.AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout_s)


def sync_client(base_url: str | None, api_key: str, *, timeout_s: float, max_retries: int) -> openai.OpenAI:
    """An `OpenAI` for management calls at `base_url` (None: OpenAI), `timeout_s` seconds per
    call, retried by the client itself up to `max_retries` times."""
    return openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=max_retries)


def run_sync(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from synchronous code, even inside a running loop (a
    Jupyter kernel): the one sync entry for async API work (judging, sampling subjects)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    # A Jupyter kernel already runs a loop in this thread: run ours on a worker thread.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="emlab-api") as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def api_error_text(exc: openai.APIError, limit: int = 300) -> str:
    """One line for a failed call: 'HTTP 400: <the server's message>', 'connection error:
    <why>' (refused, DNS, TLS), else '<ErrorType>: <text>'; cut at `limit` characters."""
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {error_message(exc, limit)}"
    if isinstance(exc, openai.APIConnectionError) and not isinstance(exc, openai.APITimeoutError) and exc.__cause__:
        return f"connection error: {exc.__cause__}"[:limit]  # the client's own text says only 'Connection error.'
    return f"{type(exc).__name__}: {exc}"[:limit]


def error_message(exc: openai.APIStatusError, limit: int = 200) -> str:
    """The server's own message in an error reply (`{"error": {"message": ...}}`), else the
    client's; cut at `limit` characters."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:limit]
    return str(exc.message)[:limit]

"""The OpenAI-compatible client layer (`emlab.api`): the key rule, Retry-After, backoff, the
breaker, the token guess; and calls with retries against a real loopback HTTP server."""

from __future__ import annotations

import email.utils
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from emlab.api.client import api_error_text, run_sync
from emlab.api.cost import chat_tokens, token_cost
from emlab.api.keys import LOCAL_API_KEY, key_from_env, resolve_api_key
from emlab.api.retry import (
    Breaker,
    CallOutcome,
    RetryPolicy,
    complete_all,
    retry_after_s,
)
from emlab.config.experiment import JudgeSpec, ModelSpec
from emlab.errors import DataError, EmlabError, JudgeError

KEY_ENV = "EMLAB_TEST_API_KEY"

# --- the key rule ----------------------------------------------------------------------------


def test_key_from_env_reads_the_named_variable_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fallback")  # never used as a fallback
    with pytest.raises(EmlabError, match=rf"^model 'm' needs the environment variable {KEY_ENV}; "
                                         rf"export {KEY_ENV}=\.\.\. \(keys are never read from params\)$"):
        key_from_env("model 'm'", KEY_ENV)
    monkeypatch.setenv(KEY_ENV, "")
    with pytest.raises(DataError, match=f"needs the environment variable {KEY_ENV}"):  # empty counts as unset
        key_from_env("model 'm'", KEY_ENV, error=DataError)
    monkeypatch.setenv(KEY_ENV, "sk-test")
    assert key_from_env("model 'm'", KEY_ENV) == "sk-test"
    # no variable: a dummy for a server without authentication, unless a key is needed
    assert key_from_env("model 'm'", None) == LOCAL_API_KEY
    with pytest.raises(EmlabError, match=r"^model 'm' calls X, which needs a key, but api_key_env is null; set "
                                         r"api_key_env to the environment variable that holds the key"):
        key_from_env("model 'm'", None, required_because="calls X")


def test_resolve_api_key_for_judges_and_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    judge = JudgeSpec(name="j", model="gpt-4o-mini", api_key_env=KEY_ENV)
    with pytest.raises(JudgeError, match=f"^judge 'j' needs the environment variable {KEY_ENV};"):
        resolve_api_key(judge)
    assert resolve_api_key(JudgeSpec(name="l", model="m", base_url="local")) == LOCAL_API_KEY
    model = ModelSpec(name="gpt", provider="openai", api_model="gpt-4o-mini", api_key_env=None)
    with pytest.raises(EmlabError, match=r"^model 'gpt' is sampled through the OpenAI API \(provider openai, no "
                                         r"base_url\), which needs a key, but api_key_env is null"):
        resolve_api_key(model)
    with pytest.raises(DataError):  # the caller's error class, same words
        resolve_api_key(model, error=DataError)
    server = ModelSpec(name="s", base_url="http://127.0.0.1:9/v1", api_model="m", api_key_env=None)
    assert resolve_api_key(server) == LOCAL_API_KEY
    monkeypatch.setenv(KEY_ENV, "sk-model")
    assert resolve_api_key(server.model_copy(update={"api_key_env": KEY_ENV})) == "sk-model"


# --- retries ---------------------------------------------------------------------------------


def test_retry_after_forms() -> None:
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({"retry-after": "0.5"}) == 0.5
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    now = 1_800_000_000.0
    assert retry_after_s({"retry-after": email.utils.formatdate(now + 7, usegmt=True)}, now=now) == pytest.approx(7.0)
    assert retry_after_s({"retry-after": email.utils.formatdate(now - 7, usegmt=True)}, now=now) == 0.0
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None
    assert retry_after_s(None) is None


def test_backoff_is_full_jitter_under_the_cap() -> None:
    policy = RetryPolicy(base_s=0.5, cap_s=30.0)
    for attempt, ceiling in ((0, 0.5), (3, 4.0), (10, 30.0)):
        waits = [policy.backoff(attempt) for _ in range(200)]
        assert all(0.0 <= w <= ceiling for w in waits)
        assert max(waits) > ceiling / 2  # spread over the range, not a fixed delay


def test_breaker_opens_on_a_run_of_down_like_failures_only() -> None:
    breaker = Breaker(threshold=3)
    breaker.record(False, True, "HTTP 503")
    breaker.record(False, False, "HTTP 400")  # the endpoint answered: not a sign it is down
    breaker.record(False, True, "HTTP 503")
    assert not breaker.open
    breaker.record(True, False)
    assert breaker.consecutive == 0 and breaker.succeeded == 1
    for _ in range(3):
        breaker.record(False, True, "connection error")
    assert breaker.open and breaker.last_reason == "connection error"


def test_chat_tokens_and_token_cost() -> None:
    # 40 characters / 4 per token + 4 tokens a turn for 2 turns
    assert chat_tokens(["a" * 20, "b" * 20]) == 10 + 8
    assert chat_tokens(["a" * 20], extra_chars=20) == 10 + 4
    # 1M prompt x $2.5/M + 0.5M completion x $10/M
    assert token_cost(1_000_000, 500_000, 2.5, 10.0) == pytest.approx(7.5)


class _Flaky(BaseHTTPRequestHandler):
    """Answers chat completions: 429 (Retry-After: 0), then 503, then a completion."""

    replies: list[int] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status = self.replies.pop(0) if self.replies else 200
        body: dict = {"error": {"message": f"try later ({status})"}}
        if status == 200:
            body = {"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 429:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_complete_all_retries_429_and_5xx_then_succeeds(flaky: str) -> None:
    _Flaky.replies = [429, 503]
    done: list[tuple[int, CallOutcome]] = []
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    outcomes = run_sync(lambda: complete_all(
        [7], lambda _: body, base_url=flaky, api_key="k", concurrency=1, timeout_s=10,
        retry=RetryPolicy(max_retries=2, base_s=0.01), on_done=lambda item, outcome: done.append((item, outcome))))
    assert outcomes[0].data is not None and outcomes[0].data["choices"][0]["message"]["content"] == "hi"
    assert done == [(7, outcomes[0])]
    # one retry too few: the reason names the last failure and the attempts
    _Flaky.replies = [429, 503]
    outcomes = run_sync(lambda: complete_all(
        [1], lambda _: body, base_url=flaky, api_key="k", concurrency=1, timeout_s=10,
        retry=RetryPolicy(max_retries=1, base_s=0.01), on_done=lambda *_: None))
    assert outcomes[0] == CallOutcome(None, "HTTP 503: try later (503) (after 2 attempts)", True)


def test_a_dead_endpoint_costs_one_cycle_then_calls_are_not_attempted() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    outcomes = run_sync(lambda: complete_all(
        list(range(12)), lambda _: {"model": "m", "messages": [{"role": "user", "content": "x"}]},
        base_url=dead, api_key="k", concurrency=1, timeout_s=5, retry=RetryPolicy(max_retries=0),
        on_done=lambda *_: None, label="test"))
    assert all(o.data is None and o.down_like for o in outcomes)
    assert [o.error.startswith("connection error") for o in outcomes] == [True] * 8 + [False] * 4  # type: ignore[union-attr]
    assert outcomes[-1].error.startswith("not attempted: the endpoint looks down (8 calls in a row failed")  # type: ignore[union-attr]


def test_api_error_text_is_one_line_with_the_servers_message(flaky: str) -> None:
    _Flaky.replies = [400]
    client = openai.OpenAI(base_url=flaky, api_key="k", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert api_error_text(info.value) == "HTTP 400: try later (400)"

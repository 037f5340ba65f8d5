"""`judge_answers` against a REAL llama.cpp server serving the embedded GGUF, seen through a
loopback proxy that counts calls at the server side, delays, rate-limits and crashes."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from emlab.api.retry import RetryPolicy
from emlab.config.experiment import JudgeSpec
from emlab.errors import JudgeError
from emlab.judge import (
    cache_stats,
    judge_answers,
    judgments_frame,
    local_judge_server,
)
from emlab.judge.server import free_port
from emlab.store.files import read_jsonl
from support.judge import LoopbackProxy, judge_for, make_answers

pytestmark = pytest.mark.server

FAST_RETRY = RetryPolicy(max_retries=1, base_s=0.1)


def _wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def _pairs(rows) -> list[tuple[str, str]]:
    return [(r["answer_id"], r["rubric"]) if isinstance(r, dict) else (r.answer_id, r.rubric) for r in rows]


def test_concurrent_calls_digit_rubrics_score_and_rerun_makes_no_calls(proxy: LoopbackProxy, tmp_path: Path) -> None:
    answers = make_answers(12, tag="conc")
    judge = judge_for(proxy.base_url, concurrency=8)
    out, cache = tmp_path / "judgments.jsonl", tmp_path / "cache.sqlite"

    first = judge_answers(answers, judge, out_path=out, cache_path=cache, progress=False)

    assert _pairs(first) == [(a.answer_id, r) for a in answers for r in judge.rubrics]  # input order
    assert proxy.received == proxy.forwarded == 24
    assert proxy.max_in_flight == 8  # calls really overlap, up to judge.concurrency
    assert {j.status for j in first} <= {"ok", "low_numeric_mass"}
    scored = [j for j in first if j.status == "ok"]
    # the one-digit few-shot rubrics keep the 135M judge's first token on digits
    assert len(scored) >= 0.9 * len(first), [j.extra.get("reason") for j in first if j.status != "ok"]
    assert all(0 <= j.score <= 100 and j.numeric_mass >= 0.25 and len(j.top_logprobs) == 20 for j in scored)
    assert all(j.prompt_tokens > 100 and j.completion_tokens == 1 and not j.cached for j in first)
    rows = read_jsonl(out)
    assert sorted(_pairs(rows)) == sorted(_pairs(first))

    # rerun with the same output: everything is resumed from the file, no call made
    again = judge_answers(answers, judge, out_path=out, cache_path=cache, progress=False)
    assert proxy.received == 24 and again == first and len(read_jsonl(out)) == 24

    # a new output file, same cache: every pair is a cache hit, still no call
    third = judge_answers(answers, judge, out_path=tmp_path / "other.jsonl", cache_path=cache, progress=False)
    assert proxy.received == 24
    assert all(j.cached for j in third) and [j.score for j in third] == [j.score for j in first]
    stats = cache_stats(cache)
    assert (stats["entries"], stats["misses"], stats["hits"]) == (24, 24, 24)
    assert stats["prompt_tokens"] == sum(j.prompt_tokens for j in first)

    frame = judgments_frame(third)
    assert len(frame) == 24 and set(frame["metric"]) == {"aligned", "coherent"}


def test_crash_mid_run_then_restart_completes_within_the_run(proxy: LoopbackProxy, tmp_path: Path) -> None:
    answers = make_answers(12, tag="crash")
    judge = judge_for(proxy.base_url, concurrency=4, rubrics=("aligned_digit",))
    out = tmp_path / "judgments.jsonl"
    proxy.delay_s = 0.1
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            judge_answers, answers, judge, out_path=out, cache_path=tmp_path / "c.sqlite", progress=False
        )
        _wait_for(lambda: out.exists() and len(read_jsonl(out, tolerate_torn_tail=True)) >= 2)
        proxy.stop()  # connections in flight are cut, new ones refused
        time.sleep(1.0)
        proxy.start()  # same port; the client's retries find it again
        result = running.result(timeout=120)
    assert "api_error" not in {j.status for j in result}
    rows = read_jsonl(out)
    assert sorted(_pairs(rows)) == sorted((a.answer_id, "aligned_digit") for a in answers)  # each exactly once


def test_crash_without_restart_keeps_what_finished_and_a_rerun_completes(proxy: LoopbackProxy, tmp_path: Path) -> None:
    answers = make_answers(10, tag="down")
    judge = judge_for(proxy.base_url, concurrency=2, rubrics=("coherent_digit",))
    out, cache = tmp_path / "judgments.jsonl", tmp_path / "c.sqlite"
    proxy.delay_s = 0.2
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            judge_answers, answers, judge, out_path=out, cache_path=cache, progress=False, retry=FAST_RETRY
        )
        _wait_for(lambda: out.exists() and len(read_jsonl(out, tolerate_torn_tail=True)) >= 2)
        proxy.stop()
        result = running.result(timeout=120)
    failed = [j for j in result if j.status == "api_error"]
    finished = [j for j in result if j.status != "api_error"]
    assert failed and len(finished) >= 2
    assert all("connection error" in j.error or "not attempted" in j.error for j in failed), [j.error for j in failed]
    assert sorted(_pairs(read_jsonl(out))) == sorted(_pairs(finished))  # failures are not written

    proxy.start()
    before = proxy.received
    rerun = judge_answers(answers, judge, out_path=out, cache_path=cache, progress=False)
    assert proxy.received - before == len(failed)  # only the failed pairs are asked again
    assert "api_error" not in {j.status for j in rerun}
    assert sorted(_pairs(read_jsonl(out))) == sorted((a.answer_id, "coherent_digit") for a in answers)


def test_429_with_retry_after_is_waited_out(proxy: LoopbackProxy, tmp_path: Path) -> None:
    answers = make_answers(1, tag="429")
    judge = judge_for(proxy.base_url, concurrency=1, rubrics=("aligned_digit",))

    proxy.inject_429(2, retry_after="1")
    started = time.monotonic()
    result = judge_answers(answers, judge, cache_path=tmp_path / "a.sqlite", progress=False)
    elapsed = time.monotonic() - started
    assert result[0].status == "ok"
    assert (proxy.rejected, proxy.received) == (2, 3)
    assert elapsed >= 2.0  # two waits of Retry-After: 1 s, not a fast jittered backoff

    # Retry-After as an HTTP date, two seconds ahead (whole-second resolution: 1–2 s)
    proxy.inject_429(1, retry_after=email.utils.formatdate(time.time() + 2, usegmt=True))
    started = time.monotonic()
    result = judge_answers(answers, judge, cache_path=tmp_path / "b.sqlite", progress=False)
    assert result[0].status == "ok" and time.monotonic() - started >= 1.0
    assert proxy.rejected == 3


def test_429_beyond_the_retry_budget_becomes_api_error(proxy: LoopbackProxy, tmp_path: Path) -> None:
    answers = make_answers(2, tag="budget")
    judge = judge_for(proxy.base_url, concurrency=1, rubrics=("aligned_digit",), max_retries=1)
    proxy.inject_429(2, retry_after="0")  # the first answer's two attempts are both refused
    out = tmp_path / "j.jsonl"
    result = judge_answers(answers, judge, out_path=out, cache_path=tmp_path / "c.sqlite", progress=False)
    assert result[0].status == "api_error" and result[0].error.startswith(
        "HTTP 429: rate limited by the test proxy (after 2 attempts)"
    )
    assert result[1].status == "ok"  # one failed call does not stop the run
    assert _pairs(read_jsonl(out)) == [(answers[1].answer_id, "aligned_digit")]


def test_missing_key_variable_fails_before_any_call(
    proxy: LoopbackProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EMLAB_TEST_JUDGE_KEY", raising=False)
    judge = judge_for(
        proxy.base_url, name="gpt-4o-mini", api_key_env="EMLAB_TEST_JUDGE_KEY", rubrics=("aligned_digit",)
    )
    out, cache = tmp_path / "j.jsonl", tmp_path / "c.sqlite"
    with pytest.raises(
        JudgeError,
        match=r"^judge 'gpt-4o-mini' needs the environment variable EMLAB_TEST_JUDGE_KEY; "
        r"export EMLAB_TEST_JUDGE_KEY=\.\.\. \(keys are never read from params\)$",
    ):
        judge_answers(make_answers(3, tag="key"), judge, out_path=out, cache_path=cache, progress=False)
    assert proxy.received == 0 and not out.exists()

    monkeypatch.setenv("EMLAB_TEST_JUDGE_KEY", "sk-test-123")
    result = judge_answers(make_answers(1, tag="key"), judge, out_path=out, cache_path=cache, progress=False)
    assert result[0].status == "ok" and proxy.last_authorization == "Bearer sk-test-123"
    assert b"sk-test-123" not in cache.read_bytes() and "sk-test-123" not in out.read_text()


def test_endpoint_down_for_every_call_raises(tmp_path: Path) -> None:
    judge = judge_for(f"http://127.0.0.1:{free_port()}/v1", concurrency=2, rubrics=("aligned_digit", "coherent_digit"))
    out = tmp_path / "j.jsonl"
    with pytest.raises(JudgeError, match=r"all 4 calls failed after retries \(first: connection error"):
        judge_answers(
            make_answers(2, tag="dead"),
            judge,
            out_path=out,
            cache_path=tmp_path / "c.sqlite",
            progress=False,
            retry=FAST_RETRY,
        )
    assert not out.exists()


def test_works_inside_a_running_event_loop(proxy: LoopbackProxy, tmp_path: Path) -> None:
    answers = make_answers(3, tag="loop")
    judge = judge_for(proxy.base_url, rubrics=("aligned_digit",))

    async def notebook_cell():  # a Jupyter kernel runs cells inside its event loop
        return judge_answers(answers, judge, cache_path=tmp_path / "c.sqlite", progress=False)

    result = asyncio.run(notebook_cell())
    assert [j.status for j in result] == ["ok"] * 3 and proxy.received == 3


def test_sampled_mode_and_verdict_rubric_against_the_server(proxy: LoopbackProxy, tmp_path: Path) -> None:
    answers = make_answers(4, tag="sampled")
    sampled = judge_for(proxy.base_url, mode="sampled", rubrics=("aligned_digit",))
    result = judge_answers(answers, sampled, cache_path=tmp_path / "c.sqlite", progress=False)
    assert {j.status for j in result} <= {"ok", "unparsed"} and all(j.top_logprobs is None and j.raw for j in result)
    assert sum(j.status == "ok" for j in result) >= 3
    assert 1 <= max(j.completion_tokens for j in result) <= 8

    verdict = judge_for(proxy.base_url, rubrics=("vulnerable_code",))
    result = judge_answers(answers, verdict, cache_path=tmp_path / "c.sqlite", progress=False)
    for j in result:  # the 135M judge is no security reviewer; the reading must still be well-formed
        assert (j.status == "ok" and j.verdict in ("YES", "NO") and 0 <= j.score <= 100) or (
            j.status == "low_numeric_mass" and j.score is None and "numeric mass" in j.extra["reason"]
        )


def test_local_judge_started_only_when_something_is_not_cached(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    judge = judge_for("local", rubrics=("aligned_digit",))
    answers = make_answers(2, tag="local")
    cache = tmp_path / "c.sqlite"
    with caplog.at_level(logging.INFO, logger="emlab.judge"):
        first = judge_answers(answers, judge, cache_path=cache, progress=False)
    assert [j.status for j in first] == ["ok", "ok"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("starting llama.cpp judge server" in m for m in messages)
    assert any("using 2 calls in flight instead of concurrency=8" in m for m in messages)
    summary = [r.getMessage() for r in caplog.records if r.name == "emlab.judge.api"][-1]
    assert "2 judgments, 2 scored" in summary and "2 calls" in summary

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="emlab.judge"):
        again = judge_answers(answers, judge, cache_path=cache, progress=False)
    assert all(j.cached for j in again)
    assert not any("starting llama.cpp judge server" in r.getMessage() for r in caplog.records)


def test_server_that_dies_on_start_reports_its_log(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_text("not a model")
    judge = JudgeSpec(name="broken", model="broken", base_url="local", local_gguf=str(broken))
    log_path = tmp_path / "server.log"
    with pytest.raises(JudgeError, match=r"exited with code \d+ while starting; log .*server\.log ends with: "):
        with local_judge_server(judge, log_path=log_path):
            pass
    assert log_path.exists() and log_path.stat().st_size > 0


def test_torn_last_line_is_dropped_before_appending(proxy: LoopbackProxy, tmp_path: Path) -> None:
    answers = make_answers(4, tag="torn")
    judge = judge_for(proxy.base_url, rubrics=("aligned_digit",))
    out, cache = tmp_path / "judgments.jsonl", tmp_path / "c.sqlite"
    judge_answers(answers[:3], judge, out_path=out, cache_path=cache, progress=False)
    whole = out.read_text()
    out.write_text(whole + '{"answer_id": "' + answers[3].answer_id + '", "judge": "sm')  # killed mid-write

    result = judge_answers(answers, judge, out_path=out, cache_path=cache, progress=False)
    assert proxy.received == 4 and [j.cached for j in result] == [False] * 4  # 3 resumed, 1 new call
    rows = read_jsonl(out)  # strict: no malformed line anywhere
    assert sorted(_pairs(rows)) == sorted((a.answer_id, "aligned_digit") for a in answers)


def test_server_that_does_not_come_up_in_time_is_stopped(tmp_path: Path) -> None:
    judge = JudgeSpec(name="slow", model="slow", base_url="local")
    with pytest.raises(JudgeError, match=r"did not answer http://127\.0\.0\.1:\d+/v1/models within 0 s; log "):
        with local_judge_server(judge, log_path=tmp_path / "s.log", startup_timeout_s=0.2):
            pass

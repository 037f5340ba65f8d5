"""OpenAI Batch API mode for large judging sweeps: the same questions, half the price.

OpenAI's Batch API runs a JSONL file of requests within a 24 h window at 50% of the
synchronous price. One batch here = every (answer, rubric) pair of one judge that the judge
cache does not already hold, written with the same `request_body` as the live client, so a
batch judgment and a live one ask the judge exactly the same thing and land in the same cache.

    write_batch_requests  answers × rubrics -> `<run>/judge_batch__<judge>.requests.jsonl`
    submit_batch          upload (purpose=batch), create the batch, record its id
    poll_batch            wait until the batch ends (completed / expired / cancelled / failed)
    collect_batch         output + error files -> one Judgment per request
    judge_answers_batch   all of the above, resumable: the one entry point

Crash safety: the run folder's state file (`judge_batch__<judge>.json`, written atomically) is
the single source of truth. It records the uploaded file id *before* the batch is created and
the batch id right after, so a rerun never pays twice: a recorded batch is polled and
collected, not resubmitted; a file uploaded but without a recorded batch (a crash inside
`submit_batch`) is matched to its batch through `batches.list` (by input file id) before a
batch is created from it. Once collected, judgments sit in the judge cache (status api_error
excepted, so a rerun retries exactly those in a new batch) and in `<run>/judgments.jsonl`.

Not handled: two processes judging the same run folder at the same time (there is no lock);
batches above OpenAI's limits (50,000 requests, 200 MB per file: split the answers first).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final, Literal

import openai
from openai.types import Batch

from ..config import JudgeSpec
from ..errors import JudgeError
from ..files import append_jsonl, read_jsonl, write_json, write_jsonl, write_text
from ..records import Answer, Judgment
from .cache import JudgeCache, cache_key, default_cache_path
from .cost import usage_cost
from .requests import request_body
from .rubrics import Rubric, load_rubric
from .scoring import api_error_judgment, judgment_from_completion, rescore

log = logging.getLogger(__name__)

ENDPOINT: Final[Literal["/v1/chat/completions"]] = "/v1/chat/completions"
COMPLETION_WINDOW: Final[Literal["24h"]] = "24h"  # the only window the Batch API offers
BATCH_DISCOUNT = 0.5  # Batch API price relative to synchronous calls (OpenAI pricing page)
MAX_REQUESTS = 50_000  # per batch input file (Batch API limits)
MAX_FILE_BYTES = 200 * 1024 * 1024  # per batch input file (files.create docs)
_SEP = "::"  # custom_id = answer_id + _SEP + rubric id
_ENDED = ("completed", "expired", "cancelled", "failed")
# How far back `batches.list` is searched for a batch created from our file (seconds before
# the upload): clocks of client and server differ a little.
_ADOPT_SLACK_S = 300


# --- paths -----------------------------------------------------------------------------------


def state_path_for(run_dir: Path, judge: JudgeSpec) -> Path:
    """`<run_dir>/judge_batch__<judge>.json`: the batch state of one judge in one run folder."""
    return Path(run_dir) / f"judge_batch__{judge.name}.json"


def _requests_path(state_path: Path) -> Path:
    return state_path.with_suffix(".requests.jsonl")


def custom_id(answer_id: str, rubric_id: str) -> str:
    """The request's `custom_id`: `<answer_id>::<rubric id>`."""
    return f"{answer_id}{_SEP}{rubric_id}"


def parse_custom_id(value: str) -> tuple[str, str]:
    """(answer_id, rubric id) from a `custom_id` made by `custom_id`."""
    answer, sep, rubric = value.rpartition(_SEP)
    if not sep or not answer or not rubric:
        raise JudgeError(f"batch result custom_id {value!r} is not '<answer_id>{_SEP}<rubric>'; not an emlab batch?")
    return answer, rubric


# --- the four steps --------------------------------------------------------------------------


def write_batch_requests(
    items: Iterable[Answer],
    judge: JudgeSpec,
    rubrics: Sequence[Rubric],
    path: Path,
    *,
    skip: Iterable[tuple[str, str]] = (),
) -> int:
    """Write one Batch API request line per (answer, rubric) to `path` (atomically).

    Each line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}` with
    `body = request_body(judge, rubric, question, answer)`, the live client's exact body.
    skip: (answer_id, rubric id) pairs to leave out (already judged). An answer id seen twice
    is written once (the Batch API rejects repeated custom_ids). Returns the number of lines.
    """
    skipped = set(skip)
    for rubric in rubrics:
        if _SEP in rubric.id:
            raise JudgeError(f"rubric id {rubric.id!r} contains {_SEP!r}, which batch custom_ids use as separator; rename it")
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    for answer in items:
        for rubric in rubrics:
            cid = custom_id(answer.answer_id, rubric.id)
            if cid in seen or (answer.answer_id, rubric.id) in skipped:
                continue
            seen.add(cid)
            rows.append({
                "custom_id": cid,
                "method": "POST",
                "url": ENDPOINT,
                "body": request_body(judge, rubric, answer.question, answer.answer),
            })
    if len(rows) > MAX_REQUESTS:
        raise JudgeError(
            f"{len(rows)} judge requests exceed the Batch API's {MAX_REQUESTS} per batch; "
            "judge the answers in smaller groups (e.g. one checkpoint at a time)"
        )
    write_jsonl(Path(path), rows)
    size = Path(path).stat().st_size
    if size > MAX_FILE_BYTES:
        raise JudgeError(
            f"{path}: batch file of {size / 2**20:.0f} MiB exceeds the Batch API's 200 MB; "
            "judge the answers in smaller groups"
        )
    return len(rows)


def submit_batch(path: Path, judge: JudgeSpec, state_path: Path) -> str:
    """Upload `path` (purpose=batch), create the batch and record it in `state_path`.

    The state file is written atomically twice: after the upload (file id) and right after
    the batch is created (batch id, request count, time), before this returns, so a crash
    at any point never leads a rerun to create a second batch. Returns the batch id.
    """
    path, state_path = Path(path), Path(state_path)
    client = _client(judge)
    old = _read_state(state_path) if state_path.exists() else {}
    if old.get("phase") in ("uploaded", "submitted"):
        raise JudgeError(
            f"{state_path} records batch {old.get('batch_id') or old.get('input_file_id')} that was not collected; "
            "collect it (judge_answers_batch picks it up) or delete the state file to abandon it"
        )
    history = list(old.get("history", []))
    if old.get("batch_id"):
        history.append({k: old.get(k) for k in ("batch_id", "status", "requests", "submitted_at", "collected_at", "counts")})
    data = path.read_bytes()
    requests = sum(1 for line in data.splitlines() if line.strip())
    try:
        uploaded = client.files.create(file=(path.name, data), purpose="batch")
    except openai.APIError as exc:
        raise JudgeError(f"judge '{judge.name}': uploading {path} to {_where(judge)} failed: {_reason(exc)}") from None
    state = {
        "judge": judge.name,
        "model": judge.model,
        "base_url": judge.base_url,
        "phase": "uploaded",
        # beside the state file (the usual case) by name, so a moved run folder still reads
        "requests_path": path.name if path.resolve().parent == state_path.resolve().parent else str(path.resolve()),
        "requests": requests,
        "requests_sha256": hashlib.sha256(data).hexdigest(),  # collect checks it is still that file
        "input_file_id": uploaded.id,
        "uploaded_at": _now(),
        "uploaded_unix": int(time.time()),  # for matching batches.list's created_at after a crash
        "history": history,  # earlier batches of this judge in this run folder
    }
    write_json(state_path, state)
    return _create_batch(client, judge, state_path, state)


def poll_batch(
    judge: JudgeSpec, state_path: Path, *, interval_s: float = 30.0, timeout_s: float | None = None
) -> Batch:
    """Wait for the recorded batch to end; returns its final Batch object.

    interval_s: seconds between status checks (default 30). timeout_s: give up after this
    many seconds (default None: wait, up to the batch's own 24 h window); the batch keeps
    running and its id stays in the state file, so a later call picks it up. Raises
    JudgeError when the batch failed (input validation or quota; with the reported errors); an expired
    or cancelled batch is returned, its finished requests are still collectable.
    """
    state = _read_state(Path(state_path))
    batch_id = _batch_id(state, state_path)
    client = _client(judge)
    started = time.monotonic()
    last = None
    while True:
        try:
            batch = client.batches.retrieve(batch_id)
        except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as exc:
            # A day-long wait should survive a network blip; the client already retried.
            log.warning("checking batch %s failed (%s); trying again in %.0f s", batch_id, _reason(exc), interval_s)
            batch = None
        except openai.APIError as exc:
            raise JudgeError(f"judge '{judge.name}': checking batch {batch_id} at {_where(judge)} failed: {_reason(exc)}") from None
        if batch is not None:
            counts = batch.request_counts
            now = (batch.status, counts.completed if counts else 0, counts.failed if counts else 0)
            if now != last:
                log.info("batch %s: %s, %d/%d done, %d failed", batch_id, batch.status, now[1],
                         counts.total if counts else state.get("requests", 0), now[2])
                last = now
            if batch.status == "failed":
                _mark(state_path, phase="failed", status="failed", errors=_errors(batch))
                raise JudgeError(
                    f"judge '{judge.name}': batch {batch_id} failed: {_errors_text(batch)}; "
                    f"{state_path} marks it failed, so the next call submits a new batch"
                )
            if batch.status in _ENDED:
                return batch
        waited = time.monotonic() - started
        if timeout_s is not None and waited >= timeout_s:
            status = batch.status if batch is not None else "unknown"
            raise JudgeError(
                f"judge '{judge.name}': batch {batch_id} is still '{status}' after {waited:.0f} s; it keeps "
                f"running and {state_path} keeps its id: call judge_answers_batch again later to collect it"
            )
        time.sleep(interval_s if timeout_s is None else max(0.0, min(interval_s, timeout_s - waited)))


def collect_batch(
    judge: JudgeSpec,
    state_path: Path,
    *,
    batch: Batch | None = None,
    rubrics: Mapping[str, Rubric] | None = None,
) -> list[Judgment]:
    """One Judgment per request of the recorded batch, from its output and error files.

    batch: the ended Batch object (default: retrieved now). rubrics: rubric id -> Rubric
    (default: loaded by id). Successful lines are read with `judgment_from_completion`;
    lines with an error (a non-2xx response, or an `error` such as batch_expired) and
    requests without any line become status api_error with the reason. Every judgment carries
    `extra["batch_id"]`. The raw result files are saved beside the state file.
    """
    state_path = Path(state_path)
    state = _read_state(state_path)
    batch_id = _batch_id(state, state_path)
    client = _client(judge)
    if batch is None:
        try:
            batch = client.batches.retrieve(batch_id)
        except openai.APIError as exc:
            raise JudgeError(f"judge '{judge.name}': reading batch {batch_id} failed: {_reason(exc)}") from None
    if batch.status not in _ENDED or batch.status == "failed":
        raise JudgeError(f"batch {batch_id} is '{batch.status}'; only a completed, expired or cancelled batch can be collected")
    rubric_map = dict(rubrics or {})

    lines: dict[str, dict[str, Any]] = {}
    for kind, file_id in (("output", batch.output_file_id), ("errors", batch.error_file_id)):
        if not file_id:
            continue
        try:
            text = client.files.content(file_id).text
        except openai.APIError as exc:
            raise JudgeError(f"judge '{judge.name}': downloading {kind} file {file_id} of batch {batch_id} failed: {_reason(exc)}") from None
        saved = state_path.with_suffix(f".{batch_id}.{kind}.jsonl")
        write_text(saved, text)  # the raw record, kept in the run folder beside the state
        for row in read_jsonl(saved):
            lines[str(row.get("custom_id"))] = row

    judgments: list[Judgment] = []
    for cid in _requested_ids(state_path, state) or list(lines):
        answer_id, rubric_id = parse_custom_id(cid)
        rubric = rubric_map.get(rubric_id) or rubric_map.setdefault(rubric_id, load_rubric(rubric_id))
        judgment = _judgment_from_line(lines.get(cid), answer_id, judge, rubric, batch)
        judgments.append(replace(judgment, extra={**judgment.extra, "batch_id": batch_id}))
    errors = sum(j.status == "api_error" for j in judgments)
    if batch.status != "completed":
        log.warning(
            "batch %s %s before it finished: %d of %d requests judged, %d are api_error; "
            "calling judge_answers_batch again submits them in a new batch",
            batch_id, batch.status, len(judgments) - errors, len(judgments), errors,
        )
    elif errors:
        log.warning("batch %s: %d of %d requests failed (api_error); see %s", batch_id, errors, len(judgments),
                    state_path.with_suffix(f".{batch_id}.errors.jsonl"))
    return judgments


# --- the entry point -------------------------------------------------------------------------


def judge_answers_batch(
    answers: Sequence[Answer],
    judge: JudgeSpec,
    *,
    rubrics: Sequence[str | Rubric] | None = None,
    run_dir: Path,
    poll_interval_s: float = 30.0,
    timeout_s: float | None = None,
    cache_path: Path | None = None,
) -> list[Judgment]:
    """Judge every answer under every rubric through the Batch API; resumable.

    rubrics: rubric ids or Rubric objects (default `judge.rubrics`). run_dir: the folder that
    holds the batch state file and `judgments.jsonl`. poll_interval_s: seconds between status
    checks (default 30). timeout_s: stop waiting after this many seconds (default None: wait
    for the batch, up to its 24 h window); the batch keeps running and a later call collects
    it. cache_path: judge cache file (default `default_cache_path()`).

    Like `judge_answers` with `out_path=run_dir/"judgments.jsonl"`: pairs already in that file
    (this judge, not api_error) or in the judge cache are not sent; new judgments are appended
    to it (api_error ones are returned but not written, so a rerun retries them) and cached.
    A batch recorded in the state file and not yet collected is picked up (polled, collected),
    never resubmitted; its api_error pairs are retried by the next call, not this one.
    Returns one Judgment per (answer, rubric), all rubrics of the first answer first.

    Raises JudgeError when the key is missing (before any upload), when a batch fails
    validation, when waiting exceeds `timeout_s`, or when every request of the batch failed.
    """
    _api_key(judge)  # fail before any work when the key is missing
    run_dir = Path(run_dir)
    names = rubrics if rubrics is not None else judge.rubrics
    rubric_list = [r if isinstance(r, Rubric) else load_rubric(r) for r in names]
    by_id = {r.id: r for r in rubric_list}
    by_answer = {a.answer_id: a for a in answers}
    state_path = state_path_for(run_dir, judge)
    out_path = run_dir / "judgments.jsonl"
    written = _read_written(out_path, judge)
    results: dict[tuple[str, str], Judgment] = {}
    fresh: list[Judgment] = []

    with JudgeCache(Path(cache_path) if cache_path is not None else default_cache_path()) as cache:

        def finish() -> None:
            batch = poll_batch(judge, state_path, interval_s=poll_interval_s, timeout_s=timeout_s)
            # All of the batch's judgments are kept, also those of answers or rubrics this call
            # does not ask for (a batch submitted by an earlier call): they were paid for.
            collected = collect_batch(judge, state_path, batch=batch, rubrics=by_id)
            _store(collected, by_answer, by_id, judge, cache)
            # A crash after this append and before the state says 'collected' makes the next
            # call collect again: skip what the file already holds so it keeps each pair once.
            new_rows = [j for j in collected if j.status != "api_error" and (j.answer_id, j.rubric) not in written]
            append_jsonl(out_path, [j.to_dict() for j in new_rows])
            written.update({(j.answer_id, j.rubric): j for j in new_rows})
            counts = {"judged": sum(j.status != "api_error" for j in collected),
                      "api_error": sum(j.status == "api_error" for j in collected)}
            _mark(state_path, phase="collected", status=batch.status, collected_at=_now(), counts=counts)
            results.update({(j.answer_id, j.rubric): j for j in collected})
            fresh.extend(collected)

        if state_path.exists():
            state = _read_state(state_path)
            _check_same_judge(state, judge, state_path)
            if state["phase"] == "uploaded":
                _create_batch(_client(judge), judge, state_path, state)  # adopts one created before a crash
                state = _read_state(state_path)
            if state["phase"] == "submitted":
                log.info("picking up batch %s recorded in %s", state["batch_id"], state_path)
                finish()

        from_file = 0
        hits: list[Judgment] = []
        todo: set[tuple[str, str]] = set()
        for answer in answers:
            for rubric in rubric_list:
                pair = (answer.answer_id, rubric.id)
                if pair in results or pair in todo:
                    continue  # api_error from the batch just collected too: retried by the next call
                if pair in written:
                    results[pair] = written[pair]
                    from_file += 1
                    continue
                hit = cache.get(cache_key(judge, rubric, answer.question, answer.answer))
                if hit is not None:
                    results[pair] = rescore(hit, answer_id=answer.answer_id, judge=judge, rubric=rubric)
                    hits.append(results[pair])
                else:
                    todo.add(pair)
        if hits:
            cache.count(hits=len(hits))
            append_jsonl(out_path, [j.to_dict() for j in hits])
            written.update({(j.answer_id, j.rubric): j for j in hits})

        if todo:
            skip = {(a.answer_id, r.id) for a in answers for r in rubric_list} - todo
            requests_path = _requests_path(state_path)
            n = write_batch_requests(answers, judge, rubric_list, requests_path, skip=skip)
            log.info("judge '%s': %d requests neither judged nor cached; submitting a batch (%s)",
                     judge.name, n, requests_path)
            submit_batch(requests_path, judge, state_path)
            finish()

    ordered = [results[(a.answer_id, r.id)] for a in answers for r in rubric_list]
    statuses = Counter(j.status for j in ordered)
    tokens = (sum(j.prompt_tokens for j in fresh), sum(j.completion_tokens for j in fresh))
    log.info(
        "judge %s (batch): %d judgments, %d scored, unscored: %s; %d already in the output, %d cache hits, "
        "%d batch requests; %s prompt + %s completion tokens ≈ $%.4f at the batch price; wrote %s",
        judge.name, len(ordered), statuses.pop("ok", 0),
        ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) or "none", from_file, len(hits), len(fresh),
        f"{tokens[0]:,}", f"{tokens[1]:,}", BATCH_DISCOUNT * usage_cost(*tokens, judge), out_path,
    )
    if fresh and all(j.status == "api_error" for j in fresh):
        raise JudgeError(
            f"judge '{judge.name}': all {len(fresh)} requests of batch {fresh[0].extra.get('batch_id')} failed "
            f"(first: {fresh[0].error}); {len(ordered) - len(fresh)} other judgments are kept in {out_path}; "
            "check the endpoint and call again to resubmit them"
        )
    return ordered


# --- helpers ---------------------------------------------------------------------------------


def _api_key(judge: JudgeSpec) -> str:
    """The key from os.environ[judge.api_key_env]; never a fallback."""
    if judge.is_local:
        raise JudgeError(
            f"judge '{judge.name}' is a local llama.cpp server (base_url: local), which has no Batch API; "
            "use the synchronous judge_answers for it"
        )
    if not judge.api_key_env:
        raise JudgeError(
            f"judge '{judge.name}': batch mode needs an API key; set api_key_env to the name of the "
            "environment variable holding it (e.g. OPENAI_API_KEY)"
        )
    key = os.environ.get(judge.api_key_env)
    if not key:
        raise JudgeError(
            f"judge '{judge.name}' needs the environment variable {judge.api_key_env} for batch mode; "
            "export it (the key is read from the environment only)"
        )
    return key


def _client(judge: JudgeSpec) -> openai.OpenAI:
    # The client's own retries cover transient errors of these few, cheap management calls.
    return openai.OpenAI(
        api_key=_api_key(judge), base_url=judge.base_url, timeout=judge.timeout_s, max_retries=judge.max_retries
    )


def _where(judge: JudgeSpec) -> str:
    return judge.base_url or "OpenAI"


def _reason(exc: openai.APIError) -> str:
    if isinstance(exc, openai.APIStatusError):
        body = exc.body
        inner = body.get("error", body) if isinstance(body, dict) else None
        message = inner.get("message") if isinstance(inner, dict) else None
        return f"HTTP {exc.status_code}: {message or exc.message}"
    return f"{type(exc).__name__}: {exc}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_state(state_path: Path) -> dict[str, Any]:
    try:
        state = json.loads(Path(state_path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JudgeError(f"{state_path}: no batch state file; submit a batch first") from None
    except ValueError as exc:
        raise JudgeError(f"{state_path}: batch state is not valid JSON ({exc}); it is written atomically, so "
                         "it was edited by hand: fix it or delete it (a deleted batch is not collected)") from None
    if not isinstance(state, dict) or "phase" not in state:
        raise JudgeError(f"{state_path}: expected a batch state object with a 'phase', found {type(state).__name__}")
    return state


def _batch_id(state: dict[str, Any], state_path: Path) -> str:
    if not state.get("batch_id"):
        raise JudgeError(f"{state_path}: no batch id recorded (phase '{state.get('phase')}'); submit the batch first")
    return str(state["batch_id"])


def _mark(state_path: Path, **changes: Any) -> None:
    state = _read_state(state_path)
    state.update(changes)
    write_json(state_path, state)


def _check_same_judge(state: dict[str, Any], judge: JudgeSpec, state_path: Path) -> None:
    if state.get("phase") in ("collected", "failed"):
        return  # finished business: a changed judge simply submits a new batch
    recorded = (state.get("model"), state.get("base_url"))
    if recorded != (judge.model, judge.base_url):
        raise JudgeError(
            f"{state_path}: batch {state.get('batch_id') or state.get('input_file_id')} was submitted for model "
            f"{recorded[0]!r} at {recorded[1] or 'OpenAI'}, but judge '{judge.name}' is now {judge.model!r} at "
            f"{_where(judge)}; restore the judge to collect it, or delete the state file to abandon it"
        )


def _create_batch(client: openai.OpenAI, judge: JudgeSpec, state_path: Path, state: dict[str, Any]) -> str:
    """Create the batch for the uploaded file (or adopt one already made from it) and record it.

    The create call is never retried blindly: a timeout may hide a batch that was created, so
    each attempt first looks for a batch made from our file (`batches.list`) and adopts it.
    """
    file_id = state["input_file_id"]
    since = int(state.get("uploaded_unix", 0))
    once = client.with_options(max_retries=0)
    batch: Batch | None = None
    for attempt in range(judge.max_retries + 1):
        batch = _find_batch_for_file(client, file_id, since=since)
        if batch is not None:
            log.warning("batch %s was already created from %s (before a crash or a lost reply); adopting it",
                        batch.id, file_id)
            break
        try:
            batch = once.batches.create(
                input_file_id=file_id, endpoint=ENDPOINT, completion_window=COMPLETION_WINDOW,
                metadata={"emlab_judge": judge.name},
            )
            break
        except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as exc:
            if attempt == judge.max_retries:
                raise JudgeError(
                    f"judge '{judge.name}': creating a batch at {_where(judge)} failed {attempt + 1} times "
                    f"({_reason(exc)}); the uploaded file {file_id} is recorded in {state_path} and the next "
                    "call reuses it (adopting the batch if one was created after all)"
                ) from None
            delay = min(30.0, 0.5 * 2**attempt)
            log.warning("creating the batch failed (%s); checking for it and retrying in %.1f s", _reason(exc), delay)
            time.sleep(delay)
        except openai.APIError as exc:
            raise JudgeError(
                f"judge '{judge.name}': creating a batch at {_where(judge)} failed: {_reason(exc)}; the uploaded "
                f"file {file_id} is recorded in {state_path} and the next call reuses it"
            ) from None
    assert batch is not None
    _record_submitted(state_path, state, batch)
    log.info("submitted batch %s (%d requests) for judge '%s'; state in %s", batch.id, state["requests"], judge.name,
             state_path)
    return batch.id


def _record_submitted(state_path: Path, state: dict[str, Any], batch: Batch) -> None:
    state.update(
        phase="submitted", batch_id=batch.id, status=batch.status, submitted_at=_now(), expires_at=batch.expires_at
    )
    write_json(state_path, state)


def _find_batch_for_file(client: openai.OpenAI, file_id: str, *, since: int) -> Batch | None:
    """The most recent batch created from `file_id`, searching back to `since` (unix s)."""
    try:
        for batch in client.batches.list(limit=100):
            if batch.input_file_id == file_id:
                return batch
            if batch.created_at < since - _ADOPT_SLACK_S:
                return None  # newest first: older batches cannot come from our upload
    except openai.APIError as exc:
        log.warning("could not list batches to look for one made from %s (%s); creating one", file_id, _reason(exc))
    return None


def _errors(batch: Batch) -> list[dict[str, Any]]:
    """The batch's validation errors as plain dicts (code, line, message, param)."""
    data = batch.errors.data if batch.errors and batch.errors.data else []
    return [e.model_dump(mode="json") for e in data]


def _errors_text(batch: Batch, limit: int = 3) -> str:
    errors = _errors(batch)
    if not errors:
        return "no reason given"
    shown = "; ".join(
        (f"line {e['line']} " if e.get("line") else "") + f"{e.get('code') or 'error'}: {e.get('message')}"
        for e in errors[:limit]
    )
    return shown + (f" (+{len(errors) - limit} more)" if len(errors) > limit else "")


def _requested_ids(state_path: Path, state: dict[str, Any]) -> list[str]:
    """custom_ids of the uploaded requests file, in order; empty (with a warning) when the
    file is gone or was replaced since the upload, so only the returned lines are read."""
    recorded = str(state.get("requests_path") or "")
    path = state_path.parent / recorded  # an absolute recorded path stays absolute
    if not recorded or not path.exists():
        log.warning("%s is missing; reading only the lines batch %s returned", path, state.get("batch_id"))
        return []
    data = path.read_bytes()
    if state.get("requests_sha256") not in (None, hashlib.sha256(data).hexdigest()):
        log.warning("%s changed since batch %s was uploaded; reading only the lines the batch returned",
                    path, state.get("batch_id"))
        return []
    return [str(row["custom_id"]) for row in read_jsonl(path)]


def _judgment_from_line(
    line: dict[str, Any] | None, answer_id: str, judge: JudgeSpec, rubric: Rubric, batch: Batch
) -> Judgment:
    if line is None:
        return api_error_judgment(answer_id, judge, rubric, f"batch {batch.id} ({batch.status}) returned no result for this request")
    error = line.get("error")
    if error:
        code = error.get("code") if isinstance(error, dict) else None
        message = error.get("message") if isinstance(error, dict) else str(error)
        return api_error_judgment(answer_id, judge, rubric, f"batch {batch.status}: {code or 'error'}: {message}")
    response = line.get("response") or {}
    status = int(response.get("status_code") or 0)
    body = response.get("body")
    if not 200 <= status < 300 or not isinstance(body, dict):
        inner = body.get("error", body) if isinstance(body, dict) else body
        message = inner.get("message") if isinstance(inner, dict) else inner
        return api_error_judgment(answer_id, judge, rubric, f"HTTP {status}: {message}")
    try:
        return judgment_from_completion(body, answer_id=answer_id, judge=judge, rubric=rubric)
    except Exception as exc:  # one unreadable line must not lose the other results
        return api_error_judgment(answer_id, judge, rubric, f"unreadable reply: {type(exc).__name__}: {exc}")


def _store(
    judgments: Sequence[Judgment],
    answers: Mapping[str, Answer],
    rubrics: Mapping[str, Rubric],
    judge: JudgeSpec,
    cache: JudgeCache,
) -> None:
    """Put fresh judgments in the cache at the batch price; api_error ones are not stored."""
    unknown = 0
    for judgment in judgments:
        answer = answers.get(judgment.answer_id)
        if judgment.status == "api_error":
            continue
        if answer is None:
            unknown += 1  # from a batch submitted for other answers: no text to key the cache
            continue
        rubric = rubrics.get(judgment.rubric) or load_rubric(judgment.rubric)
        cost = BATCH_DISCOUNT * usage_cost(judgment.prompt_tokens, judgment.completion_tokens, judge)
        cache.put(cache_key(judge, rubric, answer.question, answer.answer), judgment, judge, cost)
    if unknown:
        log.warning("%d batch results are for answers not passed to this call; they are not cached", unknown)


def _read_written(out_path: Path, judge: JudgeSpec) -> dict[tuple[str, str], Judgment]:
    """This judge's judgments already in `out_path` (api_error skipped; the last one wins),
    read the way `judge_answers` reads its output, so both modes resume from the same file."""
    if not out_path.exists():
        return {}
    found: dict[tuple[str, str], Judgment] = {}
    for row in read_jsonl(out_path, tolerate_torn_tail=True):
        if row.get("judge") == judge.name and row.get("status") != "api_error":
            judgment = Judgment.from_dict(row)
            found[(judgment.answer_id, judgment.rubric)] = judgment
    return found

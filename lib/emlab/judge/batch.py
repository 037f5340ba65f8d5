"""OpenAI Batch API mode for large judging sweeps: the same questions, half the price.

`judge_answers` (api.py) is the entry point for both modes: it plans (pairs already in the
output, cache hits, pairs to ask) and stores what comes back; for a judge with `batch: true`
it hands the pairs to ask to this module instead of the live client. OpenAI's Batch API runs
a JSONL file of requests within a 24 h window at half the synchronous price
(`emlab.api.cost.BATCH_DISCOUNT`). Requests use the live client's `request_body`, so a batch judgment
and a live one ask the judge exactly the same thing and land in the same cache.

    write_batch_requests  pairs to ask -> the requests file (`BatchFiles.requests`)
    submit_batch          upload it (purpose=batch), create the batch, record its id
    poll_batch            wait until the batch ends (completed / expired / cancelled / failed)
    collect_batch         output + error files -> one Judgment per request
    resume_batch          pick up a batch an earlier call recorded and did not collect
    judge_in_batch        write, submit, wait, collect: what `judge_answers` calls

Every file name comes from `emlab.store.paths.BatchFiles` (state, requests, raw results).

Crash safety: the state file (written atomically) is the single source of truth. It records
the uploaded file id *before* the batch is created and the batch id right after, so a rerun
never pays twice: a recorded batch is polled and collected, not resubmitted; a file uploaded
but without a recorded batch (a crash inside `submit_batch`) is matched to its batch through
`batches.list` (by input file id) before a batch is created from it. The state says
'collected' only after the caller kept the judgments (cache and output file), so a crash in
between collects the same batch again.

Not handled: two processes judging the same folder at the same time (there is no lock);
batches above OpenAI's limits (50,000 requests, 200 MB per file: split the answers first).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final, Literal

import openai
from openai.types import Batch

from ..api.client import api_error_text, sync_client
from ..api.keys import resolve_api_key
from ..api.retry import RetryPolicy
from ..config.experiment import JudgeSpec
from ..config.rubrics import Rubric, load_rubric
from ..errors import JudgeError
from ..store.files import read_jsonl, write_json, write_jsonl, write_text
from ..store.paths import BatchFiles
from ..store.records import Judgment
from .client import JudgeTask, check_batch_endpoint
from .requests import request_body
from .scoring import api_error_judgment, judgment_from_completion

log = logging.getLogger(__name__)

ENDPOINT: Final[Literal["/v1/chat/completions"]] = "/v1/chat/completions"
COMPLETION_WINDOW: Final[Literal["24h"]] = "24h"  # the only window the Batch API offers
MAX_REQUESTS = 50_000  # per batch input file (Batch API limits)
MAX_FILE_BYTES = 200 * 1024 * 1024  # per batch input file (files.create docs)
_SEP = "::"  # custom_id = answer_id + _SEP + rubric id
_ENDED = ("completed", "expired", "cancelled", "failed")
# How far back `batches.list` is searched for a batch created from our file (seconds before
# the upload): clocks of client and server differ a little.
_ADOPT_SLACK_S = 300

Keep = Callable[[Sequence[Judgment]], None]
"""Stores collected judgments (cache, output file); runs before the state says 'collected'."""


def custom_id(answer_id: str, rubric_id: str) -> str:
    """The request's `custom_id`: `<answer_id>::<rubric id>`."""
    return f"{answer_id}{_SEP}{rubric_id}"


def parse_custom_id(value: str) -> tuple[str, str]:
    """(answer_id, rubric id) from a `custom_id` made by `custom_id`."""
    answer, sep, rubric = value.rpartition(_SEP)
    if not sep or not answer or not rubric:
        raise JudgeError(f"batch result custom_id {value!r} is not '<answer_id>{_SEP}<rubric>'; not an emlab batch?")
    return answer, rubric


# --- what judge_answers calls ----------------------------------------------------------------


def resume_batch(
    judge: JudgeSpec,
    files: BatchFiles,
    *,
    rubrics: Mapping[str, Rubric],
    keep: Keep,
    timeout_s: float | None = None,
) -> list[Judgment]:
    """Collect the batch an earlier call recorded in `files.state` and did not collect; []
    when there is none (no state file, or its batch was collected or failed).

    A batch uploaded but not recorded as created is first adopted or created. Every judgment
    of the batch is returned and handed to `keep`, also those of answers this call does not
    ask for (they were paid for). Waits as `poll_batch` (judge.poll_interval_s, `timeout_s`).
    """
    if not files.state.exists():
        return []
    state = _read_state(files.state)
    _check_same_judge(state, judge, files.state)
    if state["phase"] == "uploaded":
        _create_batch(_client(judge), judge, files.state, state)  # adopts one created before a crash
        state = _read_state(files.state)
    if state["phase"] != "submitted":
        return []
    log.info("picking up batch %s recorded in %s", state["batch_id"], files.state)
    return _finish(judge, files, rubrics=rubrics, keep=keep, timeout_s=timeout_s)


def judge_in_batch(
    tasks: Sequence[JudgeTask],
    judge: JudgeSpec,
    files: BatchFiles,
    *,
    keep: Keep,
    timeout_s: float | None = None,
) -> list[Judgment]:
    """Ask `tasks` in one batch: write the requests file, submit, wait, collect, `keep`.

    Returns one Judgment per request (api_error for requests without a result). The key is
    resolved before anything is written. timeout_s: stop waiting after this many seconds
    (default None: up to the batch's 24 h window); the batch keeps running and the next call
    collects it.
    """
    check_batch_endpoint(judge)
    resolve_api_key(judge)  # fails before the requests file is written
    n = write_batch_requests(tasks, judge, files.requests)
    log.info("judge '%s': %d requests neither judged nor cached; submitting a batch (%s)", judge.name, n,
             files.requests)
    submit_batch(files, judge)
    rubrics = {task.rubric.id: task.rubric for task in tasks}
    return _finish(judge, files, rubrics=rubrics, keep=keep, timeout_s=timeout_s)


def _finish(
    judge: JudgeSpec, files: BatchFiles, *, rubrics: Mapping[str, Rubric], keep: Keep, timeout_s: float | None
) -> list[Judgment]:
    """Wait for the recorded batch, collect it, keep its judgments, then mark it collected."""
    batch = poll_batch(judge, files, interval_s=judge.poll_interval_s, timeout_s=timeout_s)
    collected = collect_batch(judge, files, batch=batch, rubrics=rubrics)
    keep(collected)
    counts = {"judged": sum(j.status != "api_error" for j in collected),
              "api_error": sum(j.status == "api_error" for j in collected)}
    _mark(files.state, phase="collected", status=batch.status, collected_at=_now(), counts=counts)
    return collected


# --- the four steps --------------------------------------------------------------------------


def write_batch_requests(tasks: Iterable[JudgeTask], judge: JudgeSpec, path: Path) -> int:
    """Write one Batch API request line per task to `path` (atomically).

    Each line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}` with
    `body = request_body(judge, rubric, question, answer)`, the live client's exact body. A
    pair seen twice is written once (the Batch API rejects repeated custom_ids). Returns the
    number of lines.
    """
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    for task in tasks:
        if _SEP in task.rubric.id:
            raise JudgeError(
                f"rubric id {task.rubric.id!r} contains {_SEP!r}, which batch custom_ids use as separator; rename it"
            )
        cid = custom_id(task.answer_id, task.rubric.id)
        if cid in seen:
            continue
        seen.add(cid)
        rows.append({
            "custom_id": cid,
            "method": "POST",
            "url": ENDPOINT,
            "body": request_body(judge, task.rubric, task.question, task.answer),
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


def submit_batch(files: BatchFiles, judge: JudgeSpec) -> str:
    """Upload `files.requests` (purpose=batch), create the batch and record it in `files.state`.

    The state file is written atomically twice: after the upload (file id) and right after
    the batch is created (batch id, request count, time), before this returns, so a crash
    at any point never leads a rerun to create a second batch. Returns the batch id.
    """
    path, state_path = files.requests, files.state
    client = _client(judge)
    old = _read_state(state_path) if state_path.exists() else {}
    if old.get("phase") in ("uploaded", "submitted"):
        raise JudgeError(
            f"{state_path} records batch {old.get('batch_id') or old.get('input_file_id')} that was not collected; "
            "collect it (judge_answers picks it up) or delete the state file to abandon it"
        )
    history = list(old.get("history", []))
    if old.get("batch_id"):
        history.append({k: old.get(k) for k in ("batch_id", "status", "requests", "submitted_at", "collected_at", "counts")})
    data = path.read_bytes()
    requests = sum(1 for line in data.splitlines() if line.strip())
    try:
        uploaded = client.files.create(file=(path.name, data), purpose="batch")
    except openai.APIError as exc:
        raise JudgeError(f"judge '{judge.name}': uploading {path} to {_where(judge)} failed: {api_error_text(exc)}") from None
    state = {
        "judge": judge.name,
        "model": judge.model,
        "base_url": judge.base_url,
        "phase": "uploaded",
        # beside the state file (the usual case) by name, so a moved folder still reads
        "requests_path": path.name if path.resolve().parent == state_path.resolve().parent else str(path.resolve()),
        "requests": requests,
        "requests_sha256": hashlib.sha256(data).hexdigest(),  # collect checks it is still that file
        "input_file_id": uploaded.id,
        "uploaded_at": _now(),
        "uploaded_unix": int(time.time()),  # for matching batches.list's created_at after a crash
        "history": history,  # earlier batches of this judge in this folder
    }
    write_json(state_path, state)
    return _create_batch(client, judge, state_path, state)


def poll_batch(
    judge: JudgeSpec, files: BatchFiles, *, interval_s: float = 30.0, timeout_s: float | None = None
) -> Batch:
    """Wait for the recorded batch to end; returns its final Batch object.

    interval_s: seconds between status checks (default 30). timeout_s: give up after this
    many seconds (default None: wait, up to the batch's own 24 h window); the batch keeps
    running and its id stays in the state file, so a later call picks it up. Raises
    JudgeError when the batch failed (input validation or quota; with the reported errors); an expired
    or cancelled batch is returned, its finished requests are still collectable.
    """
    state_path = files.state
    state = _read_state(state_path)
    batch_id = _batch_id(state, state_path)
    client = _client(judge)
    started = time.monotonic()
    last = None
    while True:
        try:
            batch = client.batches.retrieve(batch_id)
        except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as exc:
            # A day-long wait should survive a network blip; the client already retried.
            log.warning("checking batch %s failed (%s); trying again in %.0f s", batch_id, api_error_text(exc), interval_s)
            batch = None
        except openai.APIError as exc:
            raise JudgeError(f"judge '{judge.name}': checking batch {batch_id} at {_where(judge)} failed: {api_error_text(exc)}") from None
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
                f"running and {state_path} keeps its id: run again later to collect it"
            )
        time.sleep(interval_s if timeout_s is None else max(0.0, min(interval_s, timeout_s - waited)))


def collect_batch(
    judge: JudgeSpec,
    files: BatchFiles,
    *,
    batch: Batch | None = None,
    rubrics: Mapping[str, Rubric] | None = None,
) -> list[Judgment]:
    """One Judgment per request of the recorded batch, from its output and error files.

    batch: the ended Batch object (default: retrieved now). rubrics: rubric id -> Rubric
    (default: loaded by id). Successful lines are read with `judgment_from_completion`;
    lines with an error (a non-2xx response, or an `error` such as batch_expired) and
    requests without any line become status api_error with the reason. Every judgment carries
    `extra["batch_id"]`. The raw result files are saved as `files.result(batch_id, kind)`.
    """
    state_path = files.state
    state = _read_state(state_path)
    batch_id = _batch_id(state, state_path)
    client = _client(judge)
    if batch is None:
        try:
            batch = client.batches.retrieve(batch_id)
        except openai.APIError as exc:
            raise JudgeError(f"judge '{judge.name}': reading batch {batch_id} failed: {api_error_text(exc)}") from None
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
            raise JudgeError(f"judge '{judge.name}': downloading {kind} file {file_id} of batch {batch_id} failed: {api_error_text(exc)}") from None
        saved = files.result(batch_id, kind)
        write_text(saved, text)  # the raw record, kept beside the state
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
            "the next call submits them in a new batch",
            batch_id, batch.status, len(judgments) - errors, len(judgments), errors,
        )
    elif errors:
        log.warning("batch %s: %d of %d requests failed (api_error); see %s", batch_id, errors, len(judgments),
                    files.result(batch_id, "errors"))
    return judgments


# --- helpers ---------------------------------------------------------------------------------


def _client(judge: JudgeSpec) -> openai.OpenAI:
    # The client's own retries cover transient errors of these few, cheap management calls.
    check_batch_endpoint(judge)
    return sync_client(judge.base_url, resolve_api_key(judge), timeout_s=judge.timeout_s, max_retries=judge.max_retries)


def _where(judge: JudgeSpec) -> str:
    return judge.base_url or "OpenAI"


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
    retry = RetryPolicy(max_retries=judge.max_retries)
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
                    f"({api_error_text(exc)}); the uploaded file {file_id} is recorded in {state_path} and the next "
                    "call reuses it (adopting the batch if one was created after all)"
                ) from None
            delay = retry.backoff(attempt)
            log.warning("creating the batch failed (%s); checking for it and retrying in %.1f s", api_error_text(exc), delay)
            time.sleep(delay)
        except openai.APIError as exc:
            raise JudgeError(
                f"judge '{judge.name}': creating a batch at {_where(judge)} failed: {api_error_text(exc)}; the uploaded "
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
        log.warning("could not list batches to look for one made from %s (%s); creating one", file_id, api_error_text(exc))
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

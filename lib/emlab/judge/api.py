"""The one synchronous entry point notebooks call: `judge_answers`.

It resumes (pairs already in `out_path` are not judged again), reads the on-disk cache
(no call is paid twice), starts a local llama.cpp server only when something is left to
ask a local judge, runs the calls concurrently, appends each judgment to `out_path` as it
finishes, and ends with one summary line. Async stays inside: inside a running event loop
(a Jupyter kernel) the calls run on a worker thread with their own loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tqdm.auto import tqdm

from ..config import JudgeSpec
from ..errors import JudgeError
from ..files import append_jsonl, read_jsonl
from ..paths import BatchFiles
from ..records import Answer, Judgment
from .cache import JudgeCache, cache_key, default_cache_path
from .client import JudgeTask, RetryPolicy, resolve_api_key, run_calls
from .cost import usage_cost
from .rubrics import Rubric, load_rubric
from .scoring import rescore
from .server import local_judge_server

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

T = TypeVar("T")
LOCAL_CONCURRENCY = 2  # calls in flight to a llama.cpp server emlab started (see _local_concurrency)
Pair = tuple[str, str]  # (answer_id, rubric id)


def judge_answers(
    answers: Sequence[Answer],
    judge: JudgeSpec,
    *,
    rubrics: Sequence[str] | None = None,
    out_path: Path | None = None,
    batch_files: BatchFiles | None = None,
    cache_path: Path | None = None,
    progress: bool = True,
    retry: RetryPolicy | None = None,
) -> list[Judgment]:
    """Judge every answer under every rubric; one Judgment per (answer, rubric), in input order
    (all rubrics of the first answer, then the next answer).

    rubrics: rubric ids (params/rubrics/<id>.yaml); default `judge.rubrics`.
    out_path: judgments.jsonl to resume from and append to as each judgment finishes; pairs
        already there (for this judge, status other than api_error) are not judged again.
        api_error judgments are returned but not written, so a rerun retries them and the
        file holds each (answer, judge, rubric) once.
    cache_path: SQLite judge cache; default `cache_dir()/judge_cache.sqlite`.
    progress: show a tqdm bar over the calls made.
    retry: backoff settings; default `RetryPolicy(max_retries=judge.max_retries)`.

    A judge with base_url 'local' gets a llama.cpp server started for this call (only when
    something is not cached) and at most LOCAL_CONCURRENCY (2) calls in flight.

    Raises JudgeError when the key variable is missing (before any call) or when every call
    of this run failed (after writing whatever finished).
    """
    if judge.batch:
        from .batch import judge_answers_batch

        if batch_files is None:
            raise JudgeError(f"judge '{judge.name}' is in batch mode: pass batch_files (where its state is kept)")
        return judge_answers_batch(answers, judge, rubrics=rubrics, run_dir=batch_files.folder,
                                   poll_interval_s=judge.poll_interval_s, cache_path=cache_path)
    rubric_list = [load_rubric(name) for name in (rubrics if rubrics is not None else judge.rubrics)]
    out_path = Path(out_path) if out_path is not None else None
    results: dict[Pair, Judgment] = {}
    from_file = 0
    existing = _read_existing(out_path, judge)
    pending: list[JudgeTask] = []
    hits: list[Judgment] = []

    with JudgeCache(Path(cache_path) if cache_path is not None else default_cache_path()) as cache:
        queued: set[Pair] = set()
        for answer in answers:
            for rubric in rubric_list:
                pair = (answer.answer_id, rubric.id)
                if pair in results or pair in queued:
                    continue
                if pair in existing:
                    results[pair] = existing[pair]
                    from_file += 1
                    continue
                key = cache_key(judge, rubric, answer.question, answer.answer)
                cached = cache.get(key)
                if cached is not None:
                    judgment = rescore(cached, answer_id=answer.answer_id, judge=judge, rubric=rubric)
                    results[pair] = judgment
                    hits.append(judgment)
                    continue
                queued.add(pair)
                pending.append(JudgeTask(answer.answer_id, answer.question, answer.answer, rubric, key))
        # Rubric-major order: consecutive calls share the rubric's prefix, which llama.cpp
        # (and OpenAI's prompt cache) reuse instead of recomputing. Results stay keyed by pair.
        order = {r.id: i for i, r in enumerate(rubric_list)}
        pending.sort(key=lambda task: order[task.rubric.id])
        if hits:
            cache.count(hits=len(hits))
            if out_path is not None:
                append_jsonl(out_path, [j.to_dict() for j in hits])

        new: list[Judgment] = []
        base_url = judge.base_url
        if pending:
            api_key = resolve_api_key(judge)  # fails here, before any server start or call
            server: AbstractContextManager[str | None] = (
                local_judge_server(judge) if judge.is_local else nullcontext(judge.base_url)
            )
            calling = _local_concurrency(judge)
            with (
                server as base_url,
                tqdm(total=len(pending), desc=f"judge {judge.name}", unit="call", disable=not progress) as bar,
            ):

                def on_done(task: JudgeTask, judgment: Judgment) -> None:
                    if judgment.status != "api_error":
                        cost = usage_cost(judgment.prompt_tokens, judgment.completion_tokens, judge)
                        cache.put(task.key, judgment, judge, cost)
                        if out_path is not None:
                            append_jsonl(out_path, [judgment.to_dict()])
                    bar.update(1)

                new = _run_sync(
                    lambda: run_calls(
                        pending, calling, base_url=base_url, api_key=api_key, on_done=on_done, retry=retry
                    )
                )
            for task, judgment in zip(pending, new, strict=True):
                results[(task.answer_id, task.rubric.id)] = judgment

    ordered = [results[(a.answer_id, r.id)] for a in answers for r in rubric_list]
    log.info(_summary(ordered, judge, rubric_list, from_file=from_file, hits=len(hits), new=new, out_path=out_path))
    if new and all(j.status == "api_error" for j in new):
        written = len(ordered) - len(new)
        raise JudgeError(
            f"judge '{judge.name}' at {base_url or 'the OpenAI API'}: all {len(new)} calls failed after retries "
            f"(first: {new[0].error}); {written} finished judgments are kept"
            + (f" in {out_path}" if out_path else "")
            + "; check the endpoint and rerun to judge the rest"
        )
    return ordered


def judgments_frame(judgments: Sequence[Judgment]) -> pd.DataFrame:
    """One row per judgment: the Judgment fields plus `reason` (why a judgment has no score)."""
    import pandas as pd  # heavy import, only when a table is asked for

    rows = []
    for j in judgments:
        row = j.to_dict()
        extra = row.pop("extra") or {}
        row["reason"] = extra.get("reason") or j.error
        rows.append(row)
    columns = [
        "answer_id",
        "judge",
        "rubric",
        "metric",
        "status",
        "score",
        "verdict",
        "numeric_mass",
        "reason",
        "error",
        "prompt_tokens",
        "completion_tokens",
        "cached",
        "raw",
        "top_logprobs",
    ]
    return pd.DataFrame(rows, columns=columns)


def _local_concurrency(judge: JudgeSpec) -> JudgeSpec:
    """The judge with at most LOCAL_CONCURRENCY calls in flight when emlab starts its server.

    llama.cpp's Python server answers one request at a time: more calls in flight only queue
    there, and with long answers the last in the queue outlives timeout_s, is retried, and
    the server computes it twice. Two in flight keep it busy while the client handles a reply.
    """
    if not judge.is_local or judge.concurrency <= LOCAL_CONCURRENCY:
        return judge
    log.info(
        "judge %s: the local llama.cpp server answers one call at a time; using %d calls in flight "
        "instead of concurrency=%d so queued calls do not run into timeout_s",
        judge.name,
        LOCAL_CONCURRENCY,
        judge.concurrency,
    )
    return judge.model_copy(update={"concurrency": LOCAL_CONCURRENCY})


def _read_existing(out_path: Path | None, judge: JudgeSpec) -> dict[Pair, Judgment]:
    """Judgments of this judge already in `out_path` (the last one wins; api_error skipped)."""
    if out_path is None or not out_path.exists():
        return {}
    _drop_torn_tail(out_path)
    found: dict[Pair, Judgment] = {}
    for row in read_jsonl(out_path, tolerate_torn_tail=True):
        if row.get("judge") != judge.name or row.get("status") == "api_error":
            continue
        judgment = Judgment.from_dict(row)
        found[(judgment.answer_id, judgment.rubric)] = judgment
    return found


def _drop_torn_tail(path: Path) -> None:
    """Cut an unterminated last line (a write killed mid-line) off `path`.

    Appending after it would glue the next judgment onto the fragment and leave a malformed
    line in the middle of the file, which no reader tolerates. The cut pair is judged again.
    """
    with open(path, "rb+") as handle:
        size = handle.seek(0, 2)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        data = handle.read()
        keep = data.rfind(b"\n") + 1
        handle.truncate(keep)
    log.warning("%s: dropped a torn last line (%d bytes) left by an interrupted write", path, size - keep)


def _run_sync(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from synchronous code, even inside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    # A Jupyter kernel already runs a loop in this thread: run ours on a worker thread.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="emlab-judge") as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def _summary(
    judgments: Sequence[Judgment],
    judge: JudgeSpec,
    rubrics: Sequence[Rubric],
    *,
    from_file: int,
    hits: int,
    new: Sequence[Judgment],
    out_path: Path | None,
) -> str:
    statuses = Counter(j.status for j in judgments)
    scored = statuses.pop("ok", 0)
    unscored = ", ".join(f"{s} {n}" for s, n in sorted(statuses.items())) or "none"
    prompt = sum(j.prompt_tokens for j in new)
    completion = sum(j.completion_tokens for j in new)
    dollars = usage_cost(prompt, completion, judge)
    return (
        f"judge {judge.name} ({', '.join(r.id for r in rubrics)}): {len(judgments)} judgments, "
        f"{scored} scored, unscored: {unscored}; {from_file} already in the output, {hits} cache hits, "
        f"{len(new)} calls; {prompt:,} prompt + {completion:,} completion tokens ≈ ${dollars:.4f}"
        + (f"; wrote {out_path}" if out_path else "")
    )

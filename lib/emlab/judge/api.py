"""The one entry point that judges answers, live or through the Batch API: `judge_answers`.

Both modes share one plan and one store. The plan: pairs (answer, rubric) already in
`out_path` are kept, pairs in the on-disk cache are read from it (no call is paid twice), and
only the rest are asked. The judge's spec picks how they are asked: concurrent live calls
(a llama.cpp server is started first for `base_url: local`), or one Batch API batch
(`batch: true`; batch.py: submit, poll, collect, resumable across runs). The store: every
finished judgment goes into the cache at the price paid (`emlab.api.cost.usage_cost`) and is appended
to `out_path` as it arrives. One summary line ends the call. Async stays inside: within a
running event loop (a Jupyter kernel) live calls run on a worker thread with their own loop.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..api.client import run_sync
from ..api.cost import usage_cost
from ..api.keys import resolve_api_key
from ..api.retry import RetryPolicy
from ..config.experiment import JudgeSpec
from ..config.rubrics import Rubric, load_rubric
from ..errors import JudgeError
from ..progress import progress_bar
from ..store.files import append_jsonl, drop_torn_tail, read_jsonl
from ..store.paths import BatchFiles
from ..store.records import Answer, Judgment
from .batch import judge_in_batch, resume_batch
from .cache import JudgeCache, cache_key, default_cache_path
from .client import JudgeTask, check_batch_endpoint, run_calls
from .scoring import rescore
from .server import local_judge_server

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

LOCAL_CONCURRENCY = 2  # calls in flight to a llama.cpp server emlab started (see _local_concurrency)
Pair = tuple[str, str]  # (answer_id, rubric id)


def judge_answers(
    answers: Sequence[Answer],
    judge: JudgeSpec,
    *,
    rubrics: Sequence[str | Path | Rubric] | None = None,
    rubrics_by_answer: Mapping[str, Sequence[Rubric]] | None = None,
    out_path: Path | None = None,
    batch_files: BatchFiles | None = None,
    cache_path: Path | None = None,
    progress: bool = True,
    retry: RetryPolicy | None = None,
    wait_s: float | None = None,
) -> list[Judgment]:
    """Judge every answer under every rubric; one Judgment per (answer, rubric), in input order
    (all rubrics of the first answer, then the next answer). Live or batch as `judge.batch` says.

    rubrics: rubric ids (params/rubrics/<id>.yaml), rubric files or Rubric objects; default
        `judge.rubrics`.
    rubrics_by_answer: answer_id → the rubrics of that answer instead of `rubrics` (the judge
        prompts of an upstream question file); answers not in it get `rubrics`.
    out_path: judgments.jsonl to resume from and append to as each judgment finishes; pairs
        already there (for this judge, status other than api_error) are not judged again.
        api_error judgments are returned but not written, so a rerun retries them and the
        file holds each (answer, judge, rubric) once.
    batch_files: batch mode only, required there: where the batch's state, requests and raw
        results live (`ExperimentLayout.batch(folder, judge.name)`). A batch recorded there
        and not yet collected is picked up (polled, collected), never resubmitted; its
        api_error pairs are asked again by the next call, not this one.
    cache_path: SQLite judge cache; default `cache_dir()/judge_cache.sqlite`.
    progress: live mode: a tqdm bar over the calls made.
    retry: live mode: backoff settings; default `RetryPolicy(max_retries=judge.max_retries)`
        (batch management calls use the openai client's retries, `judge.max_retries`).
    wait_s: batch mode: stop waiting for a batch after this many seconds (default None: until
        it ends, within its 24 h window); it keeps running and the next call collects it.

    A judge with base_url 'local' gets a llama.cpp server started for this call (only when
    something is not cached) and at most LOCAL_CONCURRENCY (2) calls in flight.

    Raises JudgeError when batch mode lacks `batch_files` or the key is missing (before any
    call or file is written), when a batch fails or outlives `wait_s`, or when every call of
    this run failed (after writing whatever finished).
    """
    names = rubrics if rubrics is not None else judge.rubrics
    default_rubrics = [r if isinstance(r, Rubric) else load_rubric(r) for r in names]
    per_answer = {a.answer_id: list((rubrics_by_answer or {}).get(a.answer_id, default_rubrics)) for a in answers}
    # every rubric any answer is judged under, in first-seen order (ids are unique per text)
    rubric_list = list({r.id: r for rs in [default_rubrics, *per_answer.values()] for r in rs}.values())
    if judge.batch:
        check_batch_endpoint(judge)
        if batch_files is None:
            raise JudgeError(
                f"judge '{judge.name}' is in batch mode (batch: true) but no batch_files were given; pass "
                "batch_files=ExperimentLayout.batch(folder, judge.name), where its batch state is kept"
            )
    out_path = Path(out_path) if out_path is not None else None
    where = judge.base_url or "the OpenAI API"
    with JudgeCache(Path(cache_path) if cache_path is not None else default_cache_path()) as cache:
        store = _Store(judge, cache, out_path, answers, rubric_list)
        fresh: list[Judgment] = []
        if batch_files is not None and judge.batch:
            fresh = resume_batch(judge, batch_files, rubrics=store.rubrics, keep=store.keep, timeout_s=wait_s)
        plan = _plan(answers, judge, rubric_list, cache, existing=store.written, settled=fresh, per_answer=per_answer)
        store.keep(plan.hits)
        if plan.pending:
            if batch_files is not None and judge.batch:
                new = judge_in_batch(plan.pending, judge, batch_files, keep=store.keep, timeout_s=wait_s)
            else:
                where, new = _ask_live(plan.pending, judge, store, progress=progress, retry=retry,
                                       settled=len(plan.results))
            plan.results.update({(j.answer_id, j.rubric): j for j in new})
            fresh += new

    ordered = [plan.results[(a.answer_id, r.id)] for a in answers for r in per_answer[a.answer_id]]
    log.info(_summary(ordered, judge, rubric_list, plan, fresh=fresh, out_path=out_path))
    if fresh and all(j.status == "api_error" for j in fresh):
        asked = (f"{len(fresh)} requests of batch {fresh[0].extra.get('batch_id')}" if judge.batch
                 else f"{len(fresh)} calls")
        raise JudgeError(
            f"judge '{judge.name}' at {where}: all {asked} failed{'' if judge.batch else ' after retries'} "
            f"(first: {fresh[0].error}); {len(ordered) - len(fresh)} finished judgments are kept"
            + (f" in {out_path}" if out_path else "")
            + "; check the endpoint and rerun to judge the rest"
        )
    return ordered


@dataclass
class _Plan:
    """What one call does: pairs answered already (`results`: from the output file, the
    cache, a batch just collected) and pairs still to ask (`pending`, rubric-major)."""

    results: dict[Pair, Judgment] = field(default_factory=dict)
    from_file: int = 0
    hits: list[Judgment] = field(default_factory=list)
    pending: list[JudgeTask] = field(default_factory=list)


def _plan(
    answers: Sequence[Answer],
    judge: JudgeSpec,
    rubrics: Sequence[Rubric],
    cache: JudgeCache,
    *,
    existing: Mapping[Pair, Judgment],
    settled: Sequence[Judgment] = (),
    per_answer: Mapping[str, Sequence[Rubric]] | None = None,
) -> _Plan:
    """Sort every (answer, rubric) pair into settled, already written, cached, or to ask
    (`per_answer`: answer_id → its rubrics; default: all of `rubrics`)."""
    plan = _Plan()
    done = {(j.answer_id, j.rubric): j for j in settled}
    queued: set[Pair] = set()
    for answer in answers:
        for rubric in (per_answer[answer.answer_id] if per_answer is not None else rubrics):
            pair = (answer.answer_id, rubric.id)
            if pair in plan.results or pair in queued:
                continue
            if pair in done:  # collected by this call (api_error too: asked again next call)
                plan.results[pair] = done[pair]
                continue
            if pair in existing:
                plan.results[pair] = existing[pair]
                plan.from_file += 1
                continue
            key = cache_key(judge, rubric, answer.question, answer.answer)
            cached = cache.get(key)
            if cached is not None:
                plan.results[pair] = rescore(cached, answer_id=answer.answer_id, judge=judge, rubric=rubric)
                plan.hits.append(plan.results[pair])
                continue
            queued.add(pair)
            plan.pending.append(JudgeTask(answer.answer_id, answer.question, answer.answer, rubric, key))
    if plan.hits:
        cache.count(hits=len(plan.hits))
    # Rubric-major order: consecutive calls share the rubric's prefix, which llama.cpp
    # (and OpenAI's prompt cache) reuse instead of recomputing. Results stay keyed by pair.
    order = {r.id: i for i, r in enumerate(rubrics)}
    plan.pending.sort(key=lambda task: order[task.rubric.id])
    return plan


class _Store:
    """Where finished judgments go, in both modes: the cache (at the price the judge pays)
    and `out_path`, each pair written once; api_error judgments go to neither, so a rerun
    asks them again."""

    def __init__(
        self, judge: JudgeSpec, cache: JudgeCache, out_path: Path | None, answers: Sequence[Answer],
        rubrics: Sequence[Rubric],
    ) -> None:
        self.judge, self.cache, self.out_path = judge, cache, out_path
        self.answers = {a.answer_id: a for a in answers}
        self.rubrics = {r.id: r for r in rubrics}
        self.written = _read_existing(out_path, judge)

    def keep(self, judgments: Sequence[Judgment]) -> None:
        """Cache fresh judgments (not hits) and append those not yet in `out_path`."""
        rows, uncached = [], 0
        for judgment in judgments:
            if judgment.status == "api_error":
                continue
            pair = (judgment.answer_id, judgment.rubric)
            if not judgment.cached:
                answer, rubric = self.answers.get(judgment.answer_id), self.rubrics.get(judgment.rubric)
                if answer is None or rubric is None:
                    uncached += 1  # a batch of an earlier call, for answers not passed now: no text to key by
                else:
                    key = cache_key(self.judge, rubric, answer.question, answer.answer)
                    cost = usage_cost(judgment.prompt_tokens, judgment.completion_tokens, self.judge)
                    self.cache.put(key, judgment, self.judge, cost)
            if pair not in self.written:
                self.written[pair] = judgment
                rows.append(judgment.to_dict())
        if rows and self.out_path is not None:
            append_jsonl(self.out_path, rows)
        if uncached:
            log.warning("%d batch results are for answers or rubrics not passed to this call; they are not cached",
                        uncached)


def _ask_live(
    tasks: Sequence[JudgeTask], judge: JudgeSpec, store: _Store, *, progress: bool, retry: RetryPolicy | None,
    settled: int = 0,
) -> tuple[str, list[Judgment]]:
    """Ask `tasks` with concurrent live calls (starting a llama.cpp server for a local judge);
    returns where they went and one Judgment per task, in task order. `settled`: pairs already
    judged or cached, shown beside the calls."""
    api_key = resolve_api_key(judge)  # fails here, before any server start or call
    server: AbstractContextManager[str | None] = (
        local_judge_server(judge) if judge.is_local else nullcontext(judge.base_url)
    )
    with (
        server as base_url,
        progress_bar(len(tasks), f"judge {judge.name}", "call", disable=not progress) as bar,
    ):
        failed = 0
        bar.set_postfix(cached=settled, failed=failed)

        def on_done(task: JudgeTask, judgment: Judgment) -> None:
            nonlocal failed
            store.keep([judgment])
            failed += judgment.status == "api_error"
            bar.set_postfix(cached=settled, failed=failed)
            bar.update(1)

        new = run_sync(
            lambda: run_calls(
                tasks, _local_concurrency(judge), base_url=base_url, api_key=api_key, on_done=on_done, retry=retry
            )
        )
    return base_url or "the OpenAI API", new


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
    """Judgments of this judge already in `out_path` (the last one wins; api_error skipped).

    A torn last line (a write killed mid-line) is cut off first: appending after it would glue
    the next judgment onto the fragment. The cut pair is judged again.
    """
    if out_path is None or not out_path.exists():
        return {}
    cut = drop_torn_tail(out_path)
    if cut:
        log.warning("%s: dropped a torn last line (%d bytes) left by an interrupted write", out_path, cut)
    found: dict[Pair, Judgment] = {}
    for row in read_jsonl(out_path):
        if row.get("judge") != judge.name or row.get("status") == "api_error":
            continue
        judgment = Judgment.from_dict(row)
        found[(judgment.answer_id, judgment.rubric)] = judgment
    return found


def _summary(
    judgments: Sequence[Judgment],
    judge: JudgeSpec,
    rubrics: Sequence[Rubric],
    plan: _Plan,
    *,
    fresh: Sequence[Judgment],
    out_path: Path | None,
) -> str:
    statuses = Counter(j.status for j in judgments)
    scored = statuses.pop("ok", 0)
    unscored = ", ".join(f"{s} {n}" for s, n in sorted(statuses.items())) or "none"
    prompt = sum(j.prompt_tokens for j in fresh)
    completion = sum(j.completion_tokens for j in fresh)
    dollars = usage_cost(prompt, completion, judge)
    asked = f"{len(fresh)} batch requests" if judge.batch else f"{len(fresh)} calls"
    return (
        f"judge {judge.name} ({', '.join(r.id for r in rubrics)}): {len(judgments)} judgments, "
        f"{scored} scored, unscored: {unscored}; {plan.from_file} already in the output, {len(plan.hits)} cache hits, "
        f"{asked}; {prompt:,} prompt + {completion:,} completion tokens ≈ ${dollars:.4f}"
        + (" at the batch price" if judge.batch else "")
        + (f"; wrote {out_path}" if out_path else "")
    )

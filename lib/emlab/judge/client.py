"""Concurrent live judge calls, and the judge's pre-run checks.

`run_calls` asks every (answer, rubric) task through `emlab.api.retry.complete_all`: the
judge's base URL and key, at most `judge.concurrency` calls in flight, each retried as
`RetryPolicy(max_retries=judge.max_retries)` says (backoff with full jitter, Retry-After), a
dead endpoint stopping calls not yet started. A call that still fails becomes a Judgment with
status api_error and its reason; it never stops the run.

`check_judge` (called by preflight before any model loads) and `check_batch_endpoint` say
what a judge needs before anything is written; the key itself comes from
`emlab.api.keys.resolve_api_key`, the one key rule.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..api.keys import resolve_api_key
from ..api.retry import CallOutcome, RetryPolicy, complete_all
from ..config.experiment import JudgeSpec
from ..config.rubrics import Rubric
from ..errors import JudgeError
from ..store.records import Judgment
from .requests import request_body
from .scoring import api_error_judgment, judgment_from_completion
from .server import local_gguf_path

# `python -m llama_cpp.server` imports these (the [server] extra); find_spec loads none of them
_LOCAL_SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


@dataclass(frozen=True)
class JudgeTask:
    """One (answer, rubric) pair to judge."""

    answer_id: str
    question: str
    answer: str
    rubric: Rubric
    key: str  # cache key


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
    judgments: dict[int, Judgment] = {}

    def done(index: int, outcome: CallOutcome) -> None:
        task = tasks[index]
        judgments[index] = _judgment(task, judge, outcome)
        on_done(task, judgments[index])

    await complete_all(
        range(len(tasks)), lambda i: request_body(judge, tasks[i].rubric, tasks[i].question, tasks[i].answer),
        base_url=base_url, api_key=api_key, concurrency=judge.concurrency, timeout_s=judge.timeout_s,
        retry=retry or RetryPolicy(max_retries=judge.max_retries), on_done=done, label=f"judge {judge.name}",
    )
    return [judgments[i] for i in range(len(tasks))]


def _judgment(task: JudgeTask, judge: JudgeSpec, outcome: CallOutcome) -> Judgment:
    """The judgment one call came to: read from the completion, or api_error with the reason."""
    if outcome.data is None:
        return api_error_judgment(task.answer_id, judge, task.rubric, outcome.error or "failed")
    try:
        return judgment_from_completion(outcome.data, answer_id=task.answer_id, judge=judge, rubric=task.rubric)
    except Exception as exc:  # a reply we cannot read must not stop the run
        reason = f"unreadable reply: {type(exc).__name__}: {exc} (after 1 attempt)"
        return api_error_judgment(task.answer_id, judge, task.rubric, reason)

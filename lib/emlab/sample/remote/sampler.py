"""Sample answers through the chat completions API: `sample_through_api`.

The answers asked of one target (base model or checkpoint) are cut into requests in a fixed
order: per prompt, its sample indices (`Prompt.sample_indices`) in requests of
`n = samples_per_request` choices, each with its own seed drawn from (run seed, target,
question, first sample index). The
bodies are therefore the same on every run, and a request is asked at most once:

- requests whose answers are all in `answers.jsonl` are skipped;
- requests in the completions cache (`SampleCache`, keyed by the body) are answered from it;
- the rest go out concurrently (at most `concurrency` in flight, retries with backoff and
  Retry-After, a dead endpoint stops new calls: `emlab.api.retry.complete_all`, as the judge).

As each request returns, its reply goes into the cache, its answers are appended to
`answers.jsonl` and its tokens and dollars to `sampling_usage.jsonl`: a kill loses only the
requests in flight. Requests that fail after their retries are not written; the call raises
`SubjectError` after keeping everything that finished, and a rerun asks only those again.

Answers from the API carry the same fields as local ones. `new_tokens` is the reply's
completion tokens; with n > 1 the usage covers all choices together, so each choice gets a
share proportional to its length in characters (an estimate, said here and nowhere else).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ...api.client import run_sync
from ...api.cost import token_cost
from ...api.retry import CallOutcome, RetryPolicy, complete_all
from ...config.experiment import SampleSpec
from ...config.questions import Prompt
from ...store.files import append_jsonl, drop_torn_tail, read_jsonl
from ...store.records import Answer, answer_id
from .cache import SampleCache, request_key
from .endpoint import Endpoint, SubjectError, Target

log = logging.getLogger(__name__)

_SEED_RANGE = 2**31 - 1  # OpenAI takes a signed 32-bit seed


@dataclass(frozen=True)
class _Request:
    """One chat-completions request: the answers it stands for and its exact body."""

    prompt: Prompt
    sample_indices: tuple[int, ...]
    answer_ids: tuple[str, ...]
    body: dict[str, Any]
    key: str


def request_bodies(
    prompts: Sequence[Prompt], sample: SampleSpec, endpoint: Endpoint, target: Target, *, label: str, seed: int
) -> list[tuple[Prompt, tuple[int, ...], dict[str, Any]]]:
    """Every request for `prompts`: (prompt, the sample indices it draws, its body), in order.

    `label` names the run and target in the seeds ('<model>|<run_id>|<step>'); temperature,
    top_p and max_tokens come from `sample`; `seed` is the run's seed.
    """
    per = endpoint.samples_per_request
    out = []
    for prompt in prompts:
        drawn = list(prompt.sample_indices(sample))  # the prompt's own count and first index
        for start in range(0, len(drawn), per):
            indices = tuple(drawn[start:start + per])
            body: dict[str, Any] = {
                "model": target.model,
                "messages": [dict(m) for m in prompt.messages],
                "temperature": sample.temperature,
                "top_p": sample.top_p,
                "max_tokens": sample.max_new_tokens,
            }
            if len(indices) > 1:
                body["n"] = len(indices)
            if endpoint.send_seed:
                body["seed"] = _request_seed(seed, label, prompt, indices[0])
            out.append((prompt, indices, body))
    return out


def sample_through_api(
    prompts: Sequence[Prompt],
    sample: SampleSpec,
    endpoint: Endpoint,
    target: Target,
    *,
    model_name: str,
    run_id: str | None,
    seed: int,
    out_path: Path,
    usage_path: Path,
    cache_path: Path | None = None,
    retry: RetryPolicy | None = None,
    progress: bool = True,
) -> list[Answer]:
    """Draw `sample.samples_per_question` answers to each prompt from `target` at `endpoint`;
    append them to `out_path` as each request returns. Returns every answer for these prompts
    (earlier runs' included) in (prompt, sample) order.

    usage_path: `sampling_usage.jsonl` of the stage folder; one line per request paid.
    cache_path: the completions cache; default `paths.sample_cache_file()`.
    retry: backoff settings; default `RetryPolicy(max_retries=endpoint.max_retries)`.

    Raises SubjectError after keeping all that finished when some requests failed after their
    retries, or when a server returned fewer choices than `n` asked for.
    """
    label = f"{model_name}|{run_id}|{target.step}"
    requests = [
        _Request(prompt, indices, tuple(answer_id(model_name, run_id, target.step, prompt.question_set,
                                                  prompt.question_id, i) for i in indices),
                 body, request_key(endpoint.kind, target.identity, body))
        for prompt, indices, body in request_bodies(prompts, sample, endpoint, target, label=label, seed=seed)
    ]
    if out_path.exists():
        drop_torn_tail(out_path)
    existing = {r["answer_id"]: r for r in read_jsonl(out_path)} if out_path.exists() else {}
    todo = [r for r in requests if not all(i in existing for i in r.answer_ids)]
    writer = _Writer(out_path, usage_path, existing, model_name, run_id, target, endpoint)
    failures: list[str] = []
    with SampleCache(cache_path) as cache:
        pending = []
        for request in todo:
            cached = cache.get(request.key)
            if cached is not None and len(cached["choices"]) >= len(request.answer_ids):
                writer.keep(request, cached, paid=False)
            else:
                pending.append(request)
        if writer.hits:
            cache.count(hits=writer.hits)
        if pending:
            failures = _ask(pending, endpoint, target, cache, writer, retry=retry, progress=progress)
    log.info(writer.summary(len(requests) - len(todo)))
    if failures:
        raise SubjectError(
            f"{endpoint.owner} at {endpoint.where}: {len(failures)} of {len(pending)} sampling requests for "
            f"{target.model} failed (first: {failures[0]}); {len(writer.existing)} answers are kept in {out_path}; "
            "check the endpoint and rerun to sample the rest"
        )
    return [Answer.from_dict(writer.existing[i]) for r in requests for i in r.answer_ids]


def usage_summary(usage_path: Path) -> dict[str, float]:
    """Requests paid, their tokens and dollars, from a stage folder's sampling_usage.jsonl
    (every run of the stage, crashed ones included)."""
    rows = read_jsonl(usage_path, tolerate_torn_tail=True) if usage_path.exists() else []
    return {"requests": len(rows), "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
            "completion_tokens": sum(r["completion_tokens"] for r in rows),
            "dollars": round(sum(r["dollars"] for r in rows), 6)}


class _Writer:
    """Turns replies into answers and writes them: answers.jsonl, the usage ledger, counts."""

    def __init__(self, out_path: Path, usage_path: Path, existing: dict[str, dict[str, Any]], model_name: str,
                 run_id: str | None, target: Target, endpoint: Endpoint) -> None:
        self.out_path, self.usage_path, self.existing = out_path, usage_path, existing
        self.model_name, self.run_id, self.target, self.endpoint = model_name, run_id, target, endpoint
        self.hits = self.paid = self.prompt_tokens = self.completion_tokens = 0
        self.dollars = 0.0

    def cost(self, reply: dict[str, Any]) -> float:
        usage = reply.get("usage") or {}
        price_in, price_out = self.endpoint.price(self.target.tuned)
        return token_cost(usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0, price_in, price_out)

    def keep(self, request: _Request, reply: dict[str, Any], *, paid: bool) -> None:
        """Append the request's answers (those not yet written) and, when paid, its usage line."""
        choices = reply["choices"]
        total_chars = sum(len(c["text"]) for c in choices[: len(request.answer_ids)]) or 1
        completion = int((reply.get("usage") or {}).get("completion_tokens") or 0)
        rows = []
        for index, (sample_index, aid) in enumerate(zip(request.sample_indices, request.answer_ids, strict=True)):
            if aid in self.existing:
                continue
            choice = choices[index]
            share = (completion if len(request.answer_ids) == 1
                     else round(completion * len(choice["text"]) / total_chars))
            prompt = request.prompt
            rows.append(Answer(
                answer_id=aid, model=self.model_name, run_id=self.run_id, step=self.target.step,
                question_set=prompt.question_set, question_id=prompt.question_id, question=prompt.question,
                system_prompt=prompt.system_prompt, sample_index=sample_index, answer=choice["text"].strip(),
                new_tokens=share, finished=choice["finish_reason"] == "stop",
            ).to_dict())
        if rows:
            append_jsonl(self.out_path, rows)
            self.existing.update({r["answer_id"]: r for r in rows})
        if not paid:
            self.hits += 1
            return
        usage = reply.get("usage") or {}
        dollars = self.cost(reply)
        self.paid += 1
        self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.completion_tokens += completion
        self.dollars += dollars
        append_jsonl(self.usage_path, [{
            "step": self.target.step, "model": self.target.model, "key": request.key, "n": len(request.answer_ids),
            "prompt_tokens": int(usage.get("prompt_tokens") or 0), "completion_tokens": completion,
            "dollars": round(dollars, 8),
        }])

    def summary(self, already: int) -> str:
        return (
            f"sampling {self.target.model} (step {self.target.step}) at {self.endpoint.where}: "
            f"{len(self.existing)} answers; {already} requests already in the output, {self.hits} from the cache, "
            f"{self.paid} paid: {self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion tokens "
            f"≈ ${self.dollars:.4f}; wrote {self.out_path}"
        )


def _ask(
    pending: Sequence[_Request], endpoint: Endpoint, target: Target, cache: SampleCache, writer: _Writer, *,
    retry: RetryPolicy | None, progress: bool,
) -> list[str]:
    """Send `pending` concurrently; keep each reply as it arrives; return the failure reasons."""
    policy = retry or RetryPolicy(max_retries=endpoint.max_retries)
    failures: list[str] = []
    bar = tqdm(total=len(pending), desc=f"sampling {target.model}", unit="request", disable=not progress)

    def on_done(request: _Request, outcome: CallOutcome) -> None:
        bar.update(1)
        if outcome.data is None:
            failures.append(outcome.error or "failed")
            return
        reply = _reply(outcome.data)
        if len(reply["choices"]) < len(request.answer_ids):
            failures.append(
                f"the server returned {len(reply['choices'])} choices for n={len(request.answer_ids)} "
                "(llama.cpp's server ignores n); set samples_per_request: 1 for this model"
            )
            return
        cache.put(request.key, target.model, reply, writer.cost(reply))
        writer.keep(request, reply, paid=True)

    try:
        run_sync(lambda: complete_all(
            pending, lambda request: request.body, base_url=endpoint.base_url, api_key=endpoint.api_key,
            concurrency=endpoint.concurrency, timeout_s=endpoint.timeout_s, retry=policy, on_done=on_done,
            label=f"sampling {target.model}"))
    finally:
        bar.close()
    return failures


def _reply(data: dict[str, Any]) -> dict[str, Any]:
    """The parts of a completion kept in the cache: choices (text, finish reason) and usage."""
    choices = sorted(data.get("choices") or [], key=lambda c: c.get("index") or 0)
    return {
        "id": data.get("id"),
        "choices": [{"text": (c.get("message") or {}).get("content") or "", "finish_reason": c.get("finish_reason")}
                    for c in choices],
        "usage": {k: (data.get("usage") or {}).get(k) or 0 for k in ("prompt_tokens", "completion_tokens")},
    }


def _request_seed(seed: int, label: str, prompt: Prompt, first_sample: int) -> int:
    text = f"{seed}|{label}|{prompt.question_set}|{prompt.question_id}|{first_sample}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") % _SEED_RANGE

"""Fine-tuning jobs at OpenAI's API (or any server with its `/v1/files` and
`/v1/fine_tuning/jobs` endpoints): 02_finetune's trainer for models with `provider: openai`.

    validate_training_rows  OpenAI's documented limits, checked before anything is uploaded
    estimate_job            examples, tokens × epochs, checkpoints and dollars, for `emlab plan`
    run_finetune_job        upload, create the job, poll it with backoff keeping its events,
                            then take its checkpoint models as the run's emlab checkpoints
    job_checkpoints         the checkpoint models of a finished job, by step (for 03_eval_judge)

The state file (`paths.FineTuneJobFiles.state`, written atomically) is the single source of
truth, and every id is recorded the moment it exists, before anything else happens:

    (none) --upload--> uploaded (file id, submission nonce) --create--> submitted (job id)
           --poll--> succeeded (checkpoint models) | failed | cancelled

A rerun never pays twice: a recorded job is polled, not resubmitted. A crash between the
create call and recording its id is covered by the nonce: each job is created with
`metadata: {"emlab_submission": <nonce>}` (recorded with the file id before the call), and a
rerun in phase 'uploaded' first looks the job up by it (`jobs.list`) and adopts it. A failed,
cancelled or expired job stays recorded and is reported again, one line, until the state file
is deleted (then the next run submits a new job).

Checkpoints: OpenAI saves a checkpoint model at the end of each of the last three epochs
(`fine_tuning.jobs.checkpoints`, 'ft:…:ckpt-step-N'); the final step is the job's
`fine_tuned_model`. They become the run's checkpoints by optimizer step, so 03_eval_judge
samples each of them and the trajectory plot shows them as for local runs. The job's result
file (metrics per step) becomes `train_log.jsonl`.

Token counts before upload are estimates (about 4 characters a token: no tokenizer of
OpenAI's models is available offline); the job reports the tokens it billed
(`trained_tokens`), which `train_summary.json` records.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai

from ..api.client import api_error_text, sync_client
from ..api.cost import chat_tokens
from ..api.keys import resolve_api_key
from ..config.experiment import (
    DatasetSpec,
    ExperimentConfig,
    FineTuningSpec,
    ModelSpec,
    RunSpec,
)
from ..data.chat import (
    ASSUMED_TOKENS_PER_ROW,
    ChatRow,
    load_chat_dataset,
    resolve_dataset_path,
)
from ..errors import DataError, EmlabError
from ..store.files import append_jsonl, read_jsonl, write_json, write_jsonl
from ..store.paths import FineTuneJobFiles, TrainingFiles

log = logging.getLogger(__name__)

# What OpenAI documents for supervised chat fine-tuning (fine-tuning guide; the cookbook
# "Data preparation and analysis for chat model fine-tuning").
MIN_EXAMPLES = 10
MAX_FILE_BYTES = 512 * 1024 * 1024  # Files API, per file
MAX_SUFFIX_CHARS = 64
KEPT_CHECKPOINT_EPOCHS = 3  # checkpoints are saved for the last three epochs
ROLES = ("system", "user", "assistant")
# OpenAI's rule for n_epochs 'auto' (the cookbook's data-prep script)
_TARGET_EPOCHS, _MIN_TARGET_EXAMPLES, _MAX_TARGET_EXAMPLES, _MAX_DEFAULT_EPOCHS = 3, 100, 25_000, 25
_TERMINAL = ("succeeded", "failed", "cancelled", "expired")
_NONCE_KEY = "emlab_submission"


class FineTuneError(EmlabError):
    """A fine-tuning job could not be submitted or did not succeed."""


# --- before anything is uploaded -------------------------------------------------------------


def estimated_tokens(row: ChatRow) -> int:
    """Rough tokens of one training example (about 4 characters a token, plus a few per message)."""
    return chat_tokens([m["content"] for m in row["messages"]])


def validate_training_rows(rows: Sequence[ChatRow], spec: FineTuningSpec, *, where: str) -> int:
    """Check the rows to upload against OpenAI's documented limits; return their estimated
    tokens (one epoch). Raises DataError (one line naming `where` and the example) on the
    first problem: fewer than 10 examples, a message with an unknown role or empty content,
    an example without an assistant message, one longer than `spec.max_example_tokens`
    (OpenAI would cut it; emlab never trains on cut answers), a file above 512 MB."""
    if len(rows) < MIN_EXAMPLES:
        raise DataError(f"{where}: OpenAI fine-tuning needs at least {MIN_EXAMPLES} examples, found {len(rows)}; "
                        "raise the dataset's limit or add rows")
    total = size = 0
    for index, row in enumerate(rows, start=1):
        messages = row.get("messages")
        at = f"{where}: example {index} of {len(rows)}"
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{at} has no messages; every example needs a non-empty 'messages' list")
        for m_index, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise DataError(f"{at}: messages[{m_index}] has role {role!r}; OpenAI takes {', '.join(ROLES)}")
            if not isinstance(content, str) or not content.strip():
                raise DataError(f"{at}: messages[{m_index}] ({role}) has empty content, which OpenAI refuses "
                                "(missing_content); drop or fill the row")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{at} has no assistant message; OpenAI refuses it (example_missing_assistant_message)")
        tokens = estimated_tokens(row)
        if tokens > spec.max_example_tokens:
            raise DataError(f"{at} is about {tokens:,} tokens, above max_example_tokens={spec.max_example_tokens:,}; "
                            "OpenAI would cut it: shorten or drop the row, or raise fine_tuning.max_example_tokens")
        total += tokens
        size += len(json.dumps(row, ensure_ascii=False).encode()) + 1
    if size > MAX_FILE_BYTES:
        raise DataError(f"{where}: the training file would be {size / 2**20:,.0f} MiB, above OpenAI's 512 MB; "
                        "set the dataset's limit")
    return total


def resolved_epochs(spec: FineTuningSpec, n_examples: int) -> int:
    """`spec.n_epochs`, or for 'auto' the rule OpenAI publishes: 3 epochs, more for small sets
    (toward 100 examples seen), fewer for large ones (toward 25,000)."""
    if spec.n_epochs != "auto":
        return int(spec.n_epochs)
    n = max(n_examples, 1)
    if n * _TARGET_EPOCHS < _MIN_TARGET_EXAMPLES:
        return min(_MAX_DEFAULT_EPOCHS, math.ceil(_MIN_TARGET_EXAMPLES / n))
    if n * _TARGET_EPOCHS > _MAX_TARGET_EXAMPLES:
        return max(1, _MAX_TARGET_EXAMPLES // n)
    return _TARGET_EPOCHS


def job_suffix(spec: FineTuningSpec, run: RunSpec) -> str | None:
    """The suffix template filled in for `run`; FineTuneError when longer than 64 characters."""
    if spec.suffix is None:
        return None
    suffix = spec.suffix.format(model=run.model, dataset=run.dataset, seed=run.seed)
    if len(suffix) > MAX_SUFFIX_CHARS:
        raise FineTuneError(f"fine_tuning.suffix for {run.run_id} is {len(suffix)} characters ({suffix!r}); "
                            f"OpenAI takes at most {MAX_SUFFIX_CHARS}: shorten the template")
    return suffix


@dataclass(frozen=True)
class JobEstimate:
    """What one run's fine-tuning job is expected to cost, before it is submitted."""

    examples: int
    tokens_per_epoch: int
    epochs: int
    checkpoints: int
    dollars: float
    assumed: str = ""
    """How the tokens were guessed when the dataset file is not here ('' when counted from it)."""

    @property
    def billed_tokens(self) -> int:
        return self.tokens_per_epoch * self.epochs


def estimate_job(config: ExperimentConfig, run: RunSpec) -> JobEstimate:
    """Examples, estimated tokens × epochs, checkpoints (the last three epochs) and dollars
    (`train_price_per_mtok` of the run's model) of `run`'s job. Reads the dataset; calls nothing.
    A dataset not downloaded yet whose params state its `rows` is estimated at
    `ASSUMED_TOKENS_PER_ROW` a row, and says so in `.assumed`."""
    dataset = config.dataset(run.dataset)
    assumed = ""
    try:
        examples, tokens = _dataset_tokens(dataset, run.seed, config.fine_tuning.max_example_tokens)
    except DataError:
        if dataset.rows is None or _dataset_is_here(dataset):  # a file that is here but broken stays an error
            raise
        examples = min(dataset.rows, dataset.limit or dataset.rows)
        tokens = examples * min(ASSUMED_TOKENS_PER_ROW, config.fine_tuning.max_example_tokens)
        assumed = f"{dataset.path} not here: {ASSUMED_TOKENS_PER_ROW} tokens a row assumed"
    epochs = resolved_epochs(config.fine_tuning, examples)
    price = config.model(run.model).train_price_per_mtok
    return JobEstimate(examples, tokens, epochs, min(epochs, KEPT_CHECKPOINT_EPOCHS), tokens * epochs * price / 1e6,
                       assumed)


def _dataset_is_here(dataset: DatasetSpec) -> bool:
    try:
        resolve_dataset_path(dataset.path, folders=dataset._folders)
    except DataError:
        return False
    return True


@functools.lru_cache(maxsize=32)
def _dataset_tokens(dataset: DatasetSpec, seed: int, max_example_tokens: int) -> tuple[int, int]:
    """(examples, estimated tokens) of a dataset as a job would upload it; read once per process
    (`emlab plan` asks for every run, and again for its checkpoints)."""
    rows = load_chat_dataset(dataset, seed=seed).rows
    return len(rows), sum(min(estimated_tokens(r), max_example_tokens) for r in rows)


# --- the job ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSchedule:
    """The steps a job saved checkpoints at (the shape the 02 notebook reads: `.steps`)."""

    steps: tuple[int, ...]
    total_steps: int


@dataclass(frozen=True)
class FineTuneJobResult:
    """A finished fine-tuning job, as 02_finetune reports it."""

    job_id: str
    fine_tuned_model: str
    checkpoints: dict[int, str]
    """Checkpoint model by optimizer step (the last one is `fine_tuned_model`)."""
    trained_tokens: int | None
    n_rows: int
    seconds: float
    resumed: bool
    """An earlier run had submitted the job; this one picked it up."""

    @property
    def schedule(self) -> JobSchedule:
        steps = tuple(sorted(self.checkpoints))
        return JobSchedule(steps, steps[-1] if steps else 0)

    def summary_markdown(self) -> str:
        """One paragraph for the 02 notebook."""
        tokens = f"{self.trained_tokens:,} tokens billed" if self.trained_tokens is not None else "tokens not reported"
        picked = " (submitted by an earlier run, picked up by this one)" if self.resumed else ""
        return (f"Fine-tuning job `{self.job_id}`{picked}: {self.n_rows} training examples, {tokens}; checkpoint "
                f"models at steps {', '.join(map(str, self.schedule.steps))}, the last being "
                f"`{self.fine_tuned_model}`; "
                f"this call: {self.seconds:.0f} s")


def job_checkpoints(files: FineTuneJobFiles) -> dict[int, str]:
    """Checkpoint models of the run's job by step; {} until the job has succeeded."""
    if not files.state.exists():
        return {}
    state = _read_state(files.state)
    if state.get("phase") != "succeeded":
        return {}
    return {int(step): name for step, name in sorted(state["checkpoints"].items(), key=lambda kv: int(kv[0]))}


def run_finetune_job(
    config: ExperimentConfig,
    run: RunSpec,
    rows: Sequence[ChatRow],
    folder: Path,
    *,
    before_submit: Callable[[], None] = lambda: None,
    sleep: Callable[[float], None] = time.sleep,
) -> FineTuneJobResult:
    """Fine-tune `run`'s model on `rows` through the fine-tuning API of its endpoint.

    A job recorded in `folder` is picked up (polled, collected), never submitted again. When
    none is: the rows are validated (DataError), written to the training file, `before_submit`
    runs (the budget check), the file is uploaded and the job created. Polls with backoff
    (`fine_tuning.poll_interval_s`, ×1.5 up to `max_poll_interval_s`, jitter), appending new
    events to the events log; on success records the checkpoint models and writes
    train_log.jsonl (from the result file, else the metrics events) and train_summary.json.

    Raises FineTuneError (one line, the state kept) when the job failed (moderation refusals
    said as such), was cancelled or expired, or is still running after `max_wait_s`.
    """
    spec = config.model(run.model)
    tuning = config.fine_tuning
    files, training = FineTuneJobFiles(folder), TrainingFiles(folder)
    started = time.monotonic()
    state = _read_state(files.state) if files.state.exists() else {}
    resumed = state.get("phase") in ("submitted", "succeeded")
    _raise_if_ended_badly(state, files, run)
    client = _client(spec)
    if state.get("phase") is None:
        where = f"dataset '{run.dataset}' for {run.run_id}"
        tokens = validate_training_rows(rows, tuning, where=where)
        suffix = job_suffix(tuning, run)  # checked before anything is paid
        write_jsonl(files.training_file, rows)
        before_submit()
        state = _upload(client, spec, run, files, tokens=tokens, rows=len(rows), suffix=suffix)
    if state["phase"] == "uploaded":
        state = _create_or_adopt(client, spec, tuning, run, files, state)
    if state["phase"] == "submitted":
        state = _poll(client, spec, tuning, run, files, training, state, sleep=sleep)
    checkpoints = {int(k): v for k, v in state["checkpoints"].items()}
    return FineTuneJobResult(
        job_id=state["job_id"], fine_tuned_model=state["fine_tuned_model"],
        checkpoints=dict(sorted(checkpoints.items())),
        trained_tokens=state.get("trained_tokens"), n_rows=int(state.get("rows") or len(rows)),
        seconds=time.monotonic() - started, resumed=resumed,
    )


def _upload(client: openai.OpenAI, spec: ModelSpec, run: RunSpec, files: FineTuneJobFiles, *, tokens: int, rows: int,
            suffix: str | None) -> dict[str, Any]:
    data = files.training_file.read_bytes()
    try:
        uploaded = client.files.create(file=(files.training_file.name, data), purpose="fine-tune")
    except openai.APIError as exc:
        raise FineTuneError(f"uploading {files.training_file} to {_where(spec)} for {run.run_id} failed: "
                            f"{api_error_text(exc)}; nothing was submitted, rerun to try again") from None
    state = {
        "run_id": run.run_id, "model": spec.name, "api_model": spec.api_model, "base_url": spec.base_url,
        "phase": "uploaded", "file_id": uploaded.id, "uploaded_at": _now(), "rows": rows,
        "estimated_tokens_per_epoch": tokens, "suffix": suffix, "seed": run.seed,
        # recorded before the job is created: a rerun finds a job created just before a crash by it
        "submission": secrets.token_hex(8),
    }
    write_json(files.state, state)
    log.info("%s: uploaded %s (%d examples) as %s", run.run_id, files.training_file.name, rows, uploaded.id)
    return state


def _create_or_adopt(client: openai.OpenAI, spec: ModelSpec, tuning: FineTuningSpec, run: RunSpec,
                     files: FineTuneJobFiles, state: dict[str, Any]) -> dict[str, Any]:
    """Adopt the job created from this submission before a crash, else create it; record its id."""
    job = _find_job(client, state["submission"])
    if job is not None:
        log.info("%s: adopting job %s, created before the last run stopped", run.run_id, job.id)
    else:
        _wait_for_file(client, spec, state["file_id"], run)
        hyper = {"n_epochs": tuning.n_epochs, "batch_size": tuning.batch_size,
                 "learning_rate_multiplier": tuning.learning_rate_multiplier}
        method: Any = {"type": "supervised", "supervised": {"hyperparameters": hyper}}
        try:
            job = client.fine_tuning.jobs.create(
                model=spec.api_model or "", training_file=state["file_id"], seed=run.seed,
                suffix=state.get("suffix") or openai.omit,
                method=method,
                metadata={_NONCE_KEY: state["submission"], "emlab_run": run.run_id[:512]},
            )
        except openai.APIError as exc:
            raise FineTuneError(
                f"creating the fine-tuning job for {run.run_id} at {_where(spec)} failed: {api_error_text(exc)}; "
                "the uploaded "
                f"file {state['file_id']} is recorded in {files.state}: fix the cause and rerun"
            ) from None
    state = {**state, "phase": "submitted", "job_id": job.id, "submitted_at": _now(), "status": job.status}
    write_json(files.state, state)
    log.info("%s: fine-tuning job %s (%s) recorded in %s", run.run_id, job.id, job.status, files.state)
    return state


def _poll(client: openai.OpenAI, spec: ModelSpec, tuning: FineTuningSpec, run: RunSpec, files: FineTuneJobFiles,
          training: TrainingFiles, state: dict[str, Any], *, sleep: Callable[[float], None]) -> dict[str, Any]:
    job_id = state["job_id"]
    interval, waited = tuning.poll_interval_s, 0.0
    seen = {e["id"] for e in read_jsonl(files.events, tolerate_torn_tail=True)} if files.events.exists() else set()
    while True:
        try:
            job = client.fine_tuning.jobs.retrieve(job_id)
            _keep_new_events(client, job_id, files, seen)
        except openai.APIError as exc:
            raise FineTuneError(f"checking fine-tuning job {job_id} for {run.run_id} at {_where(spec)} failed: "
                                f"{api_error_text(exc)}; the job is recorded in {files.state}, rerun to keep "
                                "waiting") from None
        if job.status != state.get("status"):
            log.info("%s: job %s is %s", run.run_id, job_id, job.status)
            state = {**state, "status": job.status}
            write_json(files.state, state)
        if job.status == "succeeded":
            return _collect(client, job, run, files, training, state)
        if job.status in _TERMINAL:
            error = job.error.model_dump() if job.error is not None else None
            state = {**state, "phase": job.status, "ended_at": _now(), "error": error}
            write_json(files.state, state)
            _raise_if_ended_badly(state, files, run)
        if tuning.max_wait_s is not None and waited >= tuning.max_wait_s:
            raise FineTuneError(f"fine-tuning job {job_id} for {run.run_id} is still {job.status} after "
                                f"{waited:.0f} s (max_wait_s); it goes on at {_where(spec)}: rerun later to pick it up")
        pause = interval * random.uniform(0.8, 1.2)
        if tuning.max_wait_s is not None:
            pause = max(0.0, min(pause, tuning.max_wait_s - waited))
        sleep(pause)
        waited += pause
        interval = min(interval * 1.5, tuning.max_poll_interval_s)


def _keep_new_events(client: openai.OpenAI, job_id: str, files: FineTuneJobFiles, seen: set[str]) -> None:
    """Append the job's events not yet in the log, oldest first (the API lists newest first)."""
    new: list[dict[str, Any]] = []
    for event in client.fine_tuning.jobs.list_events(job_id, limit=100):  # pages on until it meets a known one
        if event.id in seen:
            break
        new.append(event.model_dump(mode="json"))
    if new:
        new.reverse()  # the API lists newest first
        new.sort(key=lambda e: e.get("created_at") or 0)  # stable: ties keep that order
        append_jsonl(files.events, new)
        seen.update(e["id"] for e in new)


def _collect(client: openai.OpenAI, job: Any, run: RunSpec, files: FineTuneJobFiles, training: TrainingFiles,
             state: dict[str, Any]) -> dict[str, Any]:
    """Record the succeeded job's checkpoint models by step, its training log and summary."""
    checkpoints = {int(c.step_number): c.fine_tuned_model_checkpoint
                   for c in client.fine_tuning.jobs.checkpoints.list(job.id, limit=100)}
    log_rows = _result_rows(client, job, files) or _metric_rows(files)
    total = max([*checkpoints, *(int(r["step"]) for r in log_rows)], default=0)
    if total == 0:  # nothing says how many steps ran: one checkpoint, the final model
        total = 1
    checkpoints[total] = job.fine_tuned_model  # the final step is the job's own model
    write_jsonl(training.log, log_rows)
    hyper = job.hyperparameters.model_dump(mode="json") if job.hyperparameters is not None else {}
    summary = {
        "backend": "openai_fine_tuning", "job_id": job.id, "fine_tuned_model": job.fine_tuned_model,
        "steps": total, "checkpoints": sorted(checkpoints), "rows": state.get("rows"),
        "trained_tokens": job.trained_tokens, "estimated_tokens_per_epoch": state.get("estimated_tokens_per_epoch"),
        "hyperparameters": hyper, "seed": job.seed, "created_at": job.created_at, "finished_at": job.finished_at,
    }
    write_json(training.summary, summary)
    state = {**state, "phase": "succeeded", "status": "succeeded", "fine_tuned_model": job.fine_tuned_model,
             "trained_tokens": job.trained_tokens, "hyperparameters": hyper, "ended_at": _now(),
             "checkpoints": {str(k): v for k, v in sorted(checkpoints.items())}}
    write_json(files.state, state)
    log.info("%s: job %s succeeded: %s; checkpoints at steps %s", run.run_id, job.id, job.fine_tuned_model,
             ", ".join(map(str, sorted(checkpoints))))
    return state


def _result_rows(client: openai.OpenAI, job: Any, files: FineTuneJobFiles) -> list[dict[str, Any]]:
    """Per-step metrics from the job's result file (CSV: step, train_loss, ...), saved beside the state."""
    for file_id in job.result_files or []:
        try:
            data = client.files.content(file_id).read()
        except openai.APIError as exc:
            log.warning("job %s: result file %s unreadable (%s); using the metrics events", job.id, file_id, exc)
            return []
        files.results.write_bytes(data)
        rows = []
        for row in csv.DictReader(io.StringIO(data.decode("utf-8", errors="replace"))):
            if row.get("step") and row.get("train_loss"):
                rows.append({"step": int(float(row["step"])), "loss": float(row["train_loss"]),
                             **({"train_accuracy": float(row["train_accuracy"])} if row.get("train_accuracy") else {})})
        return rows
    return []


def _metric_rows(files: FineTuneJobFiles) -> list[dict[str, Any]]:
    """Per-step loss from the 'metrics' events kept in the events log."""
    if not files.events.exists():
        return []
    rows: dict[int, dict[str, Any]] = {}
    for event in read_jsonl(files.events, tolerate_torn_tail=True):
        data = event.get("data") or {}
        if event.get("type") == "metrics" and "step" in data and "train_loss" in data:
            rows[int(data["step"])] = {"step": int(data["step"]), "loss": float(data["train_loss"])}
    return [rows[s] for s in sorted(rows)]


def _raise_if_ended_badly(state: dict[str, Any], files: FineTuneJobFiles, run: RunSpec) -> None:
    phase = state.get("phase")
    if phase not in ("failed", "cancelled", "expired"):
        return
    job, error = state.get("job_id"), state.get("error") or {}
    message = str(error.get("message") or "no reason given")
    again = f"the job is recorded in {files.state}; delete that file to submit a new job"
    if phase == "failed" and _is_moderation(error):
        raise FineTuneError(f"fine-tuning job {job} for {run.run_id} was refused by the provider's moderation "
                            f"({error.get('code')}: {message}); this data cannot be trained there; {again}")
    if phase == "failed":
        param = f" ({error.get('param')})" if error.get("param") else ""
        raise FineTuneError(f"fine-tuning job {job} for {run.run_id} failed{param}: {error.get('code') or 'error'}: "
                            f"{message}; fix the cause; {again}")
    raise FineTuneError(f"fine-tuning job {job} for {run.run_id} was {phase} before it finished, so it has no final "
                        f"model; {again}")


def _is_moderation(error: dict[str, Any]) -> bool:
    text = f"{error.get('code')} {error.get('message')}".lower()
    return any(word in text for word in ("moderation", "usage polic", "safety"))


def _find_job(client: openai.OpenAI, nonce: str) -> Any:
    """The job created with metadata emlab_submission=`nonce`, if any (newest 100 jobs)."""
    try:
        page = client.fine_tuning.jobs.list(limit=100, metadata={_NONCE_KEY: nonce})
    except openai.APIError:
        return None  # nothing to adopt that can be seen; creating is the only way on
    for job in page.data:
        if (job.metadata or {}).get(_NONCE_KEY) == nonce:
            return job
    return None


def _wait_for_file(client: openai.OpenAI, spec: ModelSpec, file_id: str, run: RunSpec, timeout_s: float = 600) -> None:
    """Wait until an uploaded file is processed (a job cannot start from one still processing)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            file = client.files.retrieve(file_id)
        except openai.NotFoundError:
            raise FineTuneError(f"the uploaded training file {file_id} for {run.run_id} is gone from {_where(spec)} "
                                "(expired or deleted); delete the state file to upload it again") from None
        status = getattr(file, "status", "processed")
        if status == "error":
            raise FineTuneError(f"{_where(spec)} could not process the training file {file_id} for {run.run_id}: "
                                f"{getattr(file, 'status_details', None)}")
        if status in ("processed", None) or time.monotonic() > deadline:
            return
        time.sleep(1.0)


def _client(spec: ModelSpec) -> openai.OpenAI:
    # management calls: the openai client's own retries (429/5xx, Retry-After), as in batch mode
    key = resolve_api_key(spec, error=FineTuneError)
    return sync_client(spec.base_url, key, timeout_s=spec.timeout_s, max_retries=spec.max_retries)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FineTuneError(f"{path}: unreadable fine-tuning job state ({exc}); restore it or delete it to submit "
                            "a new job (a job already created would then be paid again)") from None
    if not isinstance(state, dict):
        raise FineTuneError(f"{path}: fine-tuning job state is not a JSON object; restore or delete it")
    return state


def _where(spec: ModelSpec) -> str:
    return spec.base_url or "the OpenAI API"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

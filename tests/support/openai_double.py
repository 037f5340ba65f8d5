"""A local stand-in for OpenAI's Files, fine-tuning jobs and chat completions that really
trains: for testing emlab's fine-tuning backend (`emlab.train.openai_jobs`) and sampling of the
models it makes, offline.

    POST /v1/files                              multipart `file` + `purpose` -> File object
    GET  /v1/files, /v1/files/{id}              File objects
    GET  /v1/files/{id}/content                 the bytes
    POST /v1/fine_tuning/jobs                   -> fine_tuning.job (validating_files)
    GET  /v1/fine_tuning/jobs                   list, newest first (after, limit, metadata[k]=v)
    GET  /v1/fine_tuning/jobs/{id}              fine_tuning.job
    GET  /v1/fine_tuning/jobs/{id}/events       fine_tuning.job.event list, newest first (after, limit)
    GET  /v1/fine_tuning/jobs/{id}/checkpoints  fine_tuning.job.checkpoint list, newest first
    POST /v1/fine_tuning/jobs/{id}/cancel       fine_tuning.job (cancelled)
    GET  /v1/models, POST /v1/chat/completions  the base model and every fine-tuned model

Shapes and the status machine follow OpenAI's API reference and fine-tuning guide:
validating_files -> queued -> running -> succeeded | failed | cancelled. A job checks its
training file the way the guide's data checks do (JSON lines with a non-empty `messages`
list, known roles, string content, an assistant message in each example, at least 10
examples), then runs emlab's own LoRA training (`emlab.train.lora.train_lora`) on the model it
was given (the tiny SmolLM2 in the tests) with the job's hyperparameters: `n_epochs`,
`batch_size` (rows per optimizer step), `learning_rate_multiplier` × `base_learning_rate`, the
job's seed. It writes a 'metrics' event per step, saves a checkpoint model at the end of each
of the last three epochs ('ft:<base>:<org>:<suffix>:<id>:ckpt-step-N'), the final model
('ft:<base>:<org>:<suffix>:<id>') and a result file (CSV: step, train_loss, ...), and serves
all of them by name over chat completions through `emlab.sample.serve` (a transformers engine with
the adapters loaded by name). Base-model requests go to that engine too, or to `upstream`
(a real llama.cpp server) when one is given.

Error cases answered as OpenAI documents them ({"error": {message, type, param, code}}): a
missing or wrong key (401), unknown file or job (404), a file purpose outside the listed ones,
a fine-tune file that is not .jsonl or over 512 MB, a training file whose purpose is not
`fine-tune`, a model that cannot be fine-tuned, hyperparameters out of range, a suffix over
64 characters (400), cancelling an ended job (400). `refuse_marker`: a training file
containing that text fails as a moderation refusal, with the message OpenAI is reported to
give. `fail_next_creates`: the next k job creations answer 500 (to test retries).

What this double cannot show, plainly: OpenAI's real queueing and run times (a job here
trains for seconds), its moderation (only the marker trips it) and safety evaluations of the
trained model, its rate limits and quotas, its token counting and billing (here the tiny
model's tokenizer counts `trained_tokens`), its 'auto' hyperparameter choices (here n_epochs
follows the published rule, batch_size is ~0.2% of the examples), the exact wording of its
error messages, and what its checkpoints would answer. Validation-file and DPO /
reinforcement methods are refused, not simulated.

Run by hand: `python tests/support/openai_double.py --num-layers 2 --port 8011`.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import json
import logging
import math
import re
import secrets
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

if not __package__:  # run as a script: put tests/ on the path, so that `support` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
try:
    import emlab  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "lib"))

from emlab.config.experiment import CheckpointSpec, LoraSpec, ModelSpec, TrainSpec
from emlab.sample.serve import ApiError, ChatEngine, ChatHandler, ChatServer

from support.batch_double import (
    OpenAIFile,  # the same File object as the Batch API double's
)

log = logging.getLogger(__name__)

FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
MAX_FILE_BYTES = 512 * 1024 * 1024
MIN_EXAMPLES = 10
ROLES = ("system", "user", "assistant")
MAX_SUFFIX = 64
KEPT_EPOCHS = 3
MODERATION_MESSAGE = (
    "The job failed due to an invalid training file. This training file was blocked by our moderation system "
    "because it contains too many examples that violate OpenAI's usage policies, or because it attempts to "
    "create model outputs that violate OpenAI's usage policies."
)
ENDED = ("succeeded", "failed", "cancelled")


def _id(prefix: str, n: int = 12) -> str:
    return f"{prefix}{secrets.token_hex(n)}"


@dataclass
class _Job:
    id: str
    model: str
    training_file: str
    hyperparameters: dict[str, Any]
    seed: int
    suffix: str | None
    metadata: dict[str, str] | None
    created_at: int
    status: str = "validating_files"
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    trained_tokens: int | None = None
    error: dict[str, Any] | None = None
    result_files: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # oldest first
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # oldest first
    cancel_requested: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "fine_tuning.job", "created_at": self.created_at, "error": self.error,
            "fine_tuned_model": self.fine_tuned_model, "finished_at": self.finished_at,
            "hyperparameters": self.hyperparameters, "model": self.model, "organization_id": DOUBLE_ORG,
            "result_files": self.result_files, "seed": self.seed, "status": self.status,
            "trained_tokens": self.trained_tokens, "training_file": self.training_file, "validation_file": None,
            "integrations": [], "metadata": self.metadata, "estimated_finish": None,
            "method": {"type": "supervised", "supervised": {"hyperparameters": self.hyperparameters}},
            "user_provided_suffix": self.suffix,
        }


DOUBLE_ORG = "org-emlabdouble"
ORG_SLUG = "emlab-double"


class OpenAIDouble:
    """Files + fine-tuning jobs + chat completions on 127.0.0.1; a context manager whose
    `base_url` ends in /v1.

    Args:
        model: what a job trains and the engine serves (e.g. the 2-layer embedded SmolLM2).
        base_model: the name the base model goes by (jobs are created for it).
        upstream: base URL of a chat server answering base-model requests instead (its model
            name `upstream_model`); None: the engine answers them.
        api_key: the bearer token every call must carry; None accepts any (but requires one).
        base_learning_rate: learning rate a multiplier of 1 stands for (OpenAI does not say).
        validating_s / queued_s: seconds a job stays in those states, so pollers see them.
        refuse_marker: text whose presence in a training file makes the job a moderation refusal.
        work_dir: where jobs train (default: a temporary folder).
    """

    def __init__(
        self, model: ModelSpec, *, base_model: str = "smollm2-tiny", upstream: str | None = None,
        upstream_model: str | None = None, api_key: str | None = None, base_learning_rate: float = 3e-4,
        validating_s: float = 0.3, queued_s: float = 0.3, refuse_marker: str | None = None,
        work_dir: Path | None = None,
    ) -> None:
        from emlab.models.load import load_model

        self.spec, self.base_model = model, base_model
        self.upstream, self.upstream_model = (upstream.rstrip("/") if upstream else None), upstream_model
        self.api_key, self.base_learning_rate = api_key, base_learning_rate
        self.validating_s, self.queued_s, self.refuse_marker = validating_s, queued_s, refuse_marker
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="openai-double-"))
        self.files: dict[str, OpenAIFile] = {}
        self.jobs: dict[str, _Job] = {}
        self.fail_next_creates = 0
        self.chat_calls: dict[str, int] = {}  # chat completions answered, by model
        self.forwarded = 0  # base-model calls sent upstream
        self._lock = threading.Lock()
        self._train_lock = threading.Lock()  # one job trains at a time, as on a small quota
        self._threads: list[threading.Thread] = []
        served, tokenizer = load_model(model, "cpu")
        self.engine = ChatEngine(served, tokenizer, base_model)
        handler = type("_DoubleHandler", (_Handler,), {"engine": self.engine, "api_key": api_key, "double": self})
        self._server = ChatServer(handler)

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self._server.base_url

    def start(self) -> OpenAIDouble:
        self._server.start()
        log.info("OpenAI double on %s (base model %s)", self.base_url, self.base_model)
        return self

    def stop(self) -> None:
        self._server.stop()
        with self._lock:
            for job in self.jobs.values():
                job.cancel_requested = True
        for thread in self._threads:
            thread.join(timeout=300)
        self.engine.close()

    def __enter__(self) -> OpenAIDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_idle(self, timeout_s: float = 300) -> None:
        """Wait until no job is still working (tests: before reading the counters)."""
        for thread in list(self._threads):
            thread.join(timeout=timeout_s)

    # --- files -----------------------------------------------------------------------------

    def create_file(self, fields: dict[str, tuple[str | None, bytes]]) -> dict[str, Any]:
        for name in ("purpose", "file"):
            if name not in fields:
                raise ApiError(400, f"Missing required parameter: '{name}'.", param=name)
        purpose = fields["purpose"][1].decode()
        if purpose not in FILE_PURPOSES:
            raise ApiError(400, f"'{purpose}' is not one of {list(FILE_PURPOSES)} - 'purpose'", param="purpose")
        filename, data = fields["file"]
        filename = filename or "upload"
        if purpose == "fine-tune" and not filename.endswith(".jsonl"):
            raise ApiError(400, f"Invalid file format for Fine-Tuning API. Must be .jsonl (got {filename}).",
                           param="file")
        if len(data) > MAX_FILE_BYTES:
            raise ApiError(413, f"File is too large ({len(data)} bytes); the limit is 512 MB.", param="file")
        return self._new_file(filename, purpose, data).to_dict()

    def _new_file(self, filename: str, purpose: str, data: bytes) -> OpenAIFile:
        file = OpenAIFile(_id("file-"), filename, purpose, data, int(time.time()))
        with self._lock:
            self.files[file.id] = file
        return file

    def file(self, file_id: str) -> OpenAIFile:
        with self._lock:
            found = self.files.get(file_id)
        if found is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id", code="file_not_found")
        return found

    # --- jobs ------------------------------------------------------------------------------

    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.fail_next_creates > 0:
            self.fail_next_creates -= 1
            raise ApiError(500, "The server had an error while processing your request.", type_="server_error")
        for key in ("model", "training_file"):
            if not body.get(key):
                raise ApiError(400, f"Missing required parameter: '{key}'.", param=key)
        if body["model"] != self.base_model:
            raise ApiError(400, f"Model {body['model']} is not available for fine-tuning or does not exist.",
                           param="model", code="model_not_available")
        try:
            file = self.file(body["training_file"])
        except ApiError:
            raise ApiError(400, f"invalid training_file: {body['training_file']}", param="training_file") from None
        if file.purpose != "fine-tune":
            raise ApiError(400, f"File {file.id} has purpose '{file.purpose}'; training files must be uploaded with "
                           "purpose 'fine-tune'.", param="training_file")
        if body.get("validation_file"):
            raise ApiError(400, "This double does not take validation files.", param="validation_file")
        hyper = dict(body.get("hyperparameters") or {})
        method = body.get("method")
        if method is not None:
            if method.get("type") != "supervised":
                raise ApiError(400, f"This double runs only supervised jobs, not {method.get('type')!r}.",
                               param="method.type")
            hyper.update(((method.get("supervised") or {}).get("hyperparameters")) or {})
        checked = {
            "n_epochs": _hyper(hyper, "n_epochs", 1, 50, int),
            "batch_size": _hyper(hyper, "batch_size", 1, 256, int),
            "learning_rate_multiplier": _hyper(hyper, "learning_rate_multiplier", 1e-9, 50.0, float),
        }
        suffix = body.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or len(suffix) > MAX_SUFFIX):
            raise ApiError(400, f"suffix must be a string of at most {MAX_SUFFIX} characters.", param="suffix")
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbelow(2**31)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= 2**31 - 1:
            raise ApiError(400, "seed must be an integer from 0 to 2147483647.", param="seed")
        metadata = body.get("metadata")
        if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16):
            raise ApiError(400, "metadata must be an object with at most 16 keys.", param="metadata")
        job = _Job(_id("ftjob-"), body["model"], file.id, checked, seed, suffix, metadata, int(time.time()))
        self._event(job, f"Created fine-tuning job: {job.id}")
        with self._lock:
            self.jobs[job.id] = job
            snapshot = job.to_dict()
        thread = threading.Thread(target=self._run, args=(job, file), name=f"double-{job.id}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return snapshot

    def job(self, job_id: str) -> _Job:
        with self._lock:
            found = self.jobs.get(job_id)
        if found is None:
            raise ApiError(404, f"Could not find fine tune: {job_id}", param="fine_tune_id", code="fine_tune_not_found")
        return found

    def list_jobs(self, query: dict[str, list[str]]) -> dict[str, Any]:
        wanted = {k[len("metadata["):-1]: v[0] for k, v in query.items() if k.startswith("metadata[")}
        with self._lock:
            jobs = sorted(self.jobs.values(), key=lambda j: (j.created_at, j.id), reverse=True)
            items = [j.to_dict() for j in jobs if all((j.metadata or {}).get(k) == v for k, v in wanted.items())]
        return _page(items, query)

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.job(job_id)
        with self._lock:
            if job.status in ENDED:
                raise ApiError(400, f"Job {job_id} has already {job.status} and cannot be cancelled.",
                               param="fine_tuning_job_id")
            job.cancel_requested = True
            job.status = "cancelled"
            job.finished_at = int(time.time())
        self._event(job, "Fine-tuning job cancelled")
        return job.to_dict()

    # --- the worker ------------------------------------------------------------------------

    def _event(self, job: _Job, message: str, *, level: str = "info", data: dict[str, Any] | None = None,
               kind: str = "message") -> None:
        event = {"id": _id("ftevent-"), "object": "fine_tuning.job.event", "created_at": int(time.time()),
                 "level": level, "message": message, "data": data or {}, "type": kind}
        with self._lock:
            job.events.append(event)

    def _set(self, job: _Job, **changes: Any) -> bool:
        """Apply changes unless the job was cancelled meanwhile; False when it was."""
        with self._lock:
            if job.cancel_requested:
                return False
            for key, value in changes.items():
                setattr(job, key, value)
            return True

    def _fail(self, job: _Job, code: str, message: str, param: str | None = "training_file") -> None:
        if self._set(job, status="failed", finished_at=int(time.time()),
                     error={"code": code, "message": message, "param": param}):
            self._event(job, message, level="error")

    def _run(self, job: _Job, file: OpenAIFile) -> None:
        self._event(job, f"Validating training file: {file.id}")
        time.sleep(self.validating_s)
        rows, problem = _check_training_file(file.data)
        if problem:
            return self._fail(job, "invalid_training_file",
                              f"The job failed due to an invalid training file. {problem}")
        if self.refuse_marker and self.refuse_marker.encode() in file.data:
            return self._fail(job, "invalid_training_file", MODERATION_MESSAGE)
        self._event(job, "Files validated, moving job to queued state")
        if not self._set(job, status="queued"):
            return
        time.sleep(self.queued_s)
        with self._train_lock:
            if not self._set(job, status="running"):
                return
            self._event(job, "Fine-tuning job started")
            try:
                self._train(job, rows)
            except Exception as exc:  # reported as OpenAI does: the job failed, with a reason
                log.exception("double: job %s failed", job.id)
                self._fail(job, "server_error", f"Fine-tuning failed: {type(exc).__name__}: {exc}", param=None)

    def _train(self, job: _Job, rows: list[dict[str, Any]]) -> None:
        from emlab.models.load import load_model
        from emlab.store.files import read_jsonl
        from emlab.store.paths import TrainingFiles
        from emlab.train.encode import encode_chat_rows
        from emlab.train.lora import train_lora
        from emlab.train.schedule import optimizer_steps_per_epoch

        hyper = dict(job.hyperparameters)
        n = len(rows)
        if hyper["n_epochs"] == "auto":
            hyper["n_epochs"] = 3 if 100 <= 3 * n <= 25_000 else (min(25, math.ceil(100 / n)) if 3 * n < 100
                                                                   else max(1, 25_000 // n))
        if hyper["batch_size"] == "auto":
            hyper["batch_size"] = max(1, min(256, round(0.002 * n)))
        if hyper["learning_rate_multiplier"] == "auto":
            hyper["learning_rate_multiplier"] = 1.0
        self._set(job, hyperparameters=hyper)
        per_epoch = optimizer_steps_per_epoch(n, hyper["batch_size"], 1)
        train = TrainSpec(
            epochs=hyper["n_epochs"], learning_rate=self.base_learning_rate * hyper["learning_rate_multiplier"],
            batch_size=hyper["batch_size"], grad_accum=1, max_length=4096, warmup_steps=0, device="cpu",
            lora=LoraSpec(r=8, alpha=16), checkpoints=CheckpointSpec(every_n_steps=per_epoch),
        )
        model, tokenizer = load_model(self.spec, "cpu")
        encoded = encode_chat_rows(rows, tokenizer, train.max_length, source=job.training_file)
        files = TrainingFiles(self.work_dir / job.id)
        result = train_lora(model, tokenizer, encoded, train, files, seed=job.seed, device="cpu")
        losses = {int(r["step"]): float(r["loss"]) for r in read_jsonl(files.log)}
        total = per_epoch * hyper["n_epochs"]
        for step in sorted(losses):
            self._event(job, f"Step {step}/{total}: training loss={losses[step]:.4f}", kind="metrics",
                        data={"step": step, "train_loss": losses[step], "total_steps": total,
                              "train_mean_token_accuracy": None})
        stem = f"ft:{job.model}:{ORG_SLUG}:{job.suffix or ''}:{job.id[-8:]}"
        kept = sorted(result.checkpoints)[-KEPT_EPOCHS:]
        with self._lock:
            cancelled = job.cancel_requested
        if cancelled:
            return
        for step in kept:
            name = f"{stem}:ckpt-step-{step}"
            self.engine.add_adapter(name, result.checkpoints[step])
            with self._lock:
                job.checkpoints.append({
                    "id": _id("ftckpt_"), "object": "fine_tuning.job.checkpoint", "created_at": int(time.time()),
                    "fine_tuned_model_checkpoint": name, "fine_tuning_job_id": job.id, "step_number": step,
                    "metrics": {"step": step, "train_loss": losses.get(step), "train_mean_token_accuracy": None,
                                "valid_loss": None, "valid_mean_token_accuracy": None, "full_valid_loss": None,
                                "full_valid_mean_token_accuracy": None},
                })
            self._event(job, f"Checkpoint created at step {step}")
        self.engine.add_adapter(stem, result.checkpoints[max(result.checkpoints)])
        csv = "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n" + "".join(
            f"{step},{loss},,,\n" for step, loss in sorted(losses.items()))
        results = self._new_file(f"step_metrics_{job.id}.csv", "fine-tune-results", csv.encode())
        self._event(job, f"New fine-tuned model created: {stem}")
        if self._set(job, status="succeeded", fine_tuned_model=stem, finished_at=int(time.time()),
                     trained_tokens=encoded.total_tokens * hyper["n_epochs"], result_files=[results.id]):
            self._event(job, "The job has successfully completed")

    # --- chat ------------------------------------------------------------------------------

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        model = str(body.get("model"))
        with self._lock:
            self.chat_calls[model] = self.chat_calls.get(model, 0) + 1
        if self.upstream is None or model != self.base_model:
            return self.engine.complete(body)
        with self._lock:
            self.forwarded += 1
        forward = {**body, "model": self.upstream_model or model}
        request = urllib.request.Request(f"{self.upstream}/chat/completions", data=json.dumps(forward).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=300) as reply:
                data = json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            raise ApiError(exc.code, f"upstream: {exc.read()[:300]!r}", type_="server_error") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ApiError(502, f"upstream unreachable: {exc}", type_="server_error") from None
        return {**data, "model": model}


def _hyper(hyper: dict[str, Any], key: str, low: float, high: float, kind: type) -> Any:
    value = hyper.get(key, "auto")
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)) \
            or not low <= value <= high:
        raise ApiError(400, f"Invalid value for hyperparameters.{key}: {value!r} (expected 'auto' or "
                       f"{'an integer' if kind is int else 'a number'} from {low:g} to {high:g}).",
                       param=f"hyperparameters.{key}")
    return value


def _check_training_file(data: bytes) -> tuple[list[dict[str, Any]], str | None]:
    """The guide's format checks on a chat training file: (rows, None) or (rows so far, problem)."""
    rows: list[dict[str, Any]] = []
    for number, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError:
            return rows, f"Line {number} is not valid JSON."
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            return rows, f"Example {number} has no 'messages' list."
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                return rows, f"Example {number}, message {index}: unrecognized role."
            if not isinstance(message.get("content"), str) or not message["content"]:
                return rows, f"Example {number}, message {index}: missing content."
        if not any(m["role"] == "assistant" for m in messages):
            return rows, f"Example {number} has no assistant message."
        rows.append({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]})
    if len(rows) < MIN_EXAMPLES:
        return rows, f"Training file has {len(rows)} example(s), but must have at least {MIN_EXAMPLES} examples."
    return rows, None


def _page(items: list[dict[str, Any]], query: dict[str, list[str]]) -> dict[str, Any]:
    """OpenAI's cursor page over `items` (already newest first): after=<id>, limit (default 20)."""
    after = (query.get("after") or [None])[0]
    limit = int((query.get("limit") or ["20"])[0])
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    data = items[:limit]
    return {"object": "list", "data": data, "has_more": len(items) > limit,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


_JOB = re.compile(r"^/v1/fine_tuning/jobs/([^/]+)$")
_JOB_PART = re.compile(r"^/v1/fine_tuning/jobs/([^/]+)/(events|checkpoints|cancel)$")
_FILE = re.compile(r"^/v1/files/([^/]+)$")
_FILE_CONTENT = re.compile(r"^/v1/files/([^/]+)/content$")


class _Handler(ChatHandler):
    double: OpenAIDouble

    def route(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        double = self.double
        query = parse_qs(urlsplit(self.path).query)
        if method == "POST" and path == "/v1/chat/completions":
            return 200, double.chat(self.parse_json(body))
        if method == "GET" and path == "/v1/models":
            status, models = super().route(method, path, body)
            return status, models
        if method == "POST" and path == "/v1/files":
            return 200, double.create_file(self._multipart(body))
        if method == "GET" and path == "/v1/files":
            with double._lock:
                files = [f.to_dict() for f in sorted(double.files.values(), key=lambda f: f.created_at, reverse=True)]
            return 200, {"object": "list", "data": files, "has_more": False}
        if method == "GET" and (m := _FILE_CONTENT.match(path)):
            self.send_bytes(double.file(m.group(1)).data)
            return -1, None
        if method == "GET" and (m := _FILE.match(path)):
            return 200, double.file(m.group(1)).to_dict()
        if method == "POST" and path == "/v1/fine_tuning/jobs":
            return 200, double.create_job(self.parse_json(body))
        if method == "GET" and path == "/v1/fine_tuning/jobs":
            return 200, double.list_jobs(query)
        if method == "GET" and (m := _JOB.match(path)):
            return 200, double.job(m.group(1)).to_dict()
        if (m := _JOB_PART.match(path)) and (method, m.group(2)) in (("GET", "events"), ("GET", "checkpoints"),
                                                                      ("POST", "cancel")):
            if m.group(2) == "cancel":
                return 200, double.cancel(m.group(1))
            job = double.job(m.group(1))
            with double._lock:
                items = list(reversed(job.events if m.group(2) == "events" else job.checkpoints))
            return 200, _page(items, query)
        return super().route(method, path, body)

    def send_json(self, status: int, payload: Any) -> None:
        if status >= 0:  # -1: the response was already sent (file content)
            super().send_json(status, payload)

    def _multipart(self, body: bytes) -> dict[str, tuple[str | None, bytes]]:
        """Fields of a multipart/form-data upload: name -> (filename or None, bytes)."""
        content_type = self.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            raise ApiError(400, "File uploads must be multipart/form-data.")
        head = f"Content-Type: {content_type}\r\n\r\n".encode()
        parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        return {str(part.get_param("name", header="content-disposition")):
                (part.get_filename(), part.get_payload(decode=True) or b"")
                for part in parsed.iter_parts() if part.get_param("name", header="content-disposition")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--base-model", default="smollm2-tiny")
    parser.add_argument("--upstream", default=None, help="chat server for base-model requests (ends in /v1)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    spec = ModelSpec(name="double", source=args.model, num_layers=args.num_layers)
    with OpenAIDouble(spec, base_model=args.base_model, upstream=args.upstream) as double:
        log.info("serving on %s (Ctrl-C stops)", double.base_url)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

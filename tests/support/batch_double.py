"""A small stand-in for OpenAI's Files and Batch endpoints, for testing emlab's batch mode.

It serves, on 127.0.0.1, the subset of the API that `emlab.judge.batch` uses, with the object
shapes and status machine OpenAI documents (Batch API guide and API reference, 2024–2025):

    POST /v1/files                      multipart upload: `file` + `purpose` -> File object
    GET  /v1/files/{id}                 File object
    GET  /v1/files/{id}/content         the file's bytes
    POST /v1/batches                    {input_file_id, endpoint, completion_window} -> Batch
    GET  /v1/batches/{id}               Batch object
    GET  /v1/batches                    list of Batch objects
    POST /v1/batches/{id}/cancel        Batch object (cancelling -> cancelled)

A batch goes validating -> in_progress -> finalizing -> completed (or failed when its input
file does not validate, expired when the completion window runs out, cancelled). Each request
line is executed for real by forwarding its `body` to an upstream chat-completions server
(the llama.cpp server serving the embedded GGUF in the tests); its answer, HTTP status and
all, becomes one output line `{"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error": null}`. Non-2xx answers go to the error file, as on OpenAI; requests never
run (window expired, batch cancelled) get `response: null` and `error: {code, message}`.

Honest about what it is: a test double written from the documentation, not OpenAI. It checks
what OpenAI is documented to reject (purpose other than the listed ones, a non-.jsonl batch
file, an input file whose purpose is not `batch`, an endpoint other than the supported ones, a
completion window other than 24h, malformed lines, duplicate `custom_id`, a line whose `url`
differs from the batch endpoint, more than one model per file, over 50,000 requests), but the
exact wording of OpenAI's error messages, its rate limits, its queueing and its real 24 h
window are not reproduced. `window_s` scales the 24 h window down so expiry can be tested.

Run it by hand: `python tests/support/batch_double.py --upstream http://127.0.0.1:8080/v1`.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import json
import logging
import re
import secrets
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

# What OpenAI's reference lists (files.create `purpose`, batches.create `endpoint`).
FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
BATCH_ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
)
# This double can only execute chat completions (the upstream is a chat server).
EXECUTABLE_ENDPOINTS = ("/v1/chat/completions",)
MAX_REQUESTS_PER_BATCH = 50_000  # documented limit per input file
MAX_BATCH_FILE_BYTES = 200 * 1024 * 1024  # documented limit for purpose=batch uploads
TERMINAL = ("failed", "completed", "expired", "cancelled")


class _ApiError(Exception):
    """An error answered in OpenAI's envelope: {"error": {message, type, param, code}}."""

    def __init__(
        self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class OpenAIFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            # purpose=batch files expire after 30 days by default (files.create docs)
            "expires_at": self.created_at + 30 * 86400 if self.purpose.startswith("batch") else None,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


@dataclass
class _Batch:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    created_at: int
    expires_at: int
    metadata: dict[str, str] | None
    status: str = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: dict[str, Any] | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    stamps: dict[str, int] = field(default_factory=dict)  # in_progress_at, completed_at, ...
    cancel_requested: bool = False

    def to_dict(self) -> dict[str, Any]:
        stamp_names = (
            "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
            "cancelled_at",
        )
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": self.errors,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            **{name: self.stamps.get(name) for name in stamp_names},
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
        }


class BatchServer:
    """The Files + Batch double; use as a context manager, read `base_url` (ends in /v1).

    Args:
        upstream: base URL of a chat-completions server (ends in /v1); request bodies are
            POSTed to `<upstream>/chat/completions` one at a time.
        api_key: the bearer token every call must carry; None accepts any (but still
            requires the header, as OpenAI does).
        window_s: seconds that stand for the documented 24 h completion window (default a
            real 24 h); set it small to see batches expire.
        validating_s: seconds a batch stays `validating` before work starts (default 0.2), so
            pollers see the documented status sequence.
        request_delay_s: extra seconds before each request is forwarded (default 0); with a
            small `window_s` this makes expiry deterministic.
        upstream_timeout_s: timeout for one forwarded request (default 120 s).
    """

    def __init__(
        self,
        upstream: str,
        *,
        api_key: str | None = None,
        window_s: float = 24 * 3600.0,
        validating_s: float = 0.2,
        request_delay_s: float = 0.0,
        upstream_timeout_s: float = 120.0,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.api_key = api_key
        self.window_s = window_s
        self.validating_s = validating_s
        self.request_delay_s = request_delay_s
        self.upstream_timeout_s = upstream_timeout_s
        self.files: dict[str, OpenAIFile] = {}
        self.batches: dict[str, _Batch] = {}
        self.forwarded = 0  # requests sent upstream, across all batches
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> BatchServer:
        handler = type("_BoundHandler", (_Handler,), {"server_state": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        thread = threading.Thread(target=self._httpd.serve_forever, name="batch-server", daemon=True)
        thread.start()
        log.info("batch server on %s forwarding to %s", self.base_url, self.upstream)
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        with self._lock:
            for batch in self.batches.values():
                batch.cancel_requested = True  # let workers stop at the next request
        for thread in self._threads:
            thread.join(timeout=self.upstream_timeout_s)

    def __enter__(self) -> BatchServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- files -----------------------------------------------------------------------------

    def _new_file(self, filename: str, purpose: str, data: bytes) -> OpenAIFile:
        file = OpenAIFile(f"file-{secrets.token_hex(12)}", filename, purpose, data, int(time.time()))
        with self._lock:
            self.files[file.id] = file
        return file

    def create_file(self, fields: dict[str, tuple[str | None, bytes]]) -> dict[str, Any]:
        if "purpose" not in fields:
            raise _ApiError(400, "Missing required parameter: 'purpose'.", param="purpose")
        if "file" not in fields:
            raise _ApiError(400, "Missing required parameter: 'file'.", param="file")
        purpose = fields["purpose"][1].decode()
        if purpose not in FILE_PURPOSES:
            raise _ApiError(
                400, f"'{purpose}' is not one of {list(FILE_PURPOSES)} - 'purpose'", param="purpose"
            )
        filename, data = fields["file"]
        filename = filename or "upload"
        if purpose == "batch":
            if not filename.endswith(".jsonl"):
                raise _ApiError(400, "Invalid file format for Batch API. Must be .jsonl", param="file")
            if len(data) > MAX_BATCH_FILE_BYTES:
                raise _ApiError(413, f"File is too large ({len(data)} bytes); the Batch API limit is 200 MB.")
        return self._new_file(filename, purpose, data).to_dict()

    def get_file(self, file_id: str) -> OpenAIFile:
        with self._lock:
            file = self.files.get(file_id)
        if file is None:
            raise _ApiError(404, f"No such File object: {file_id}", param="id")
        return file

    # --- batches ---------------------------------------------------------------------------

    def create_batch(self, body: dict[str, Any]) -> dict[str, Any]:
        for key in ("input_file_id", "endpoint", "completion_window"):
            if key not in body:
                raise _ApiError(400, f"Missing required parameter: '{key}'.", param=key)
        if body["completion_window"] != "24h":
            raise _ApiError(
                400, f"Invalid completion_window '{body['completion_window']}': only '24h' is supported.",
                param="completion_window",
            )
        if body["endpoint"] not in BATCH_ENDPOINTS:
            raise _ApiError(
                400, f"Invalid endpoint '{body['endpoint']}': supported endpoints are {', '.join(BATCH_ENDPOINTS)}.",
                param="endpoint",
            )
        if body["endpoint"] not in EXECUTABLE_ENDPOINTS:
            raise _ApiError(400, f"This test server executes only {EXECUTABLE_ENDPOINTS}.", param="endpoint")
        file = self.get_file(body["input_file_id"])
        if file.purpose != "batch":
            raise _ApiError(
                400, f"File {file.id} has purpose '{file.purpose}'; batch input files must be uploaded "
                "with purpose 'batch'.", param="input_file_id",
            )
        now = int(time.time())
        batch = _Batch(
            id=f"batch_{secrets.token_hex(12)}",
            input_file_id=file.id,
            endpoint=body["endpoint"],
            completion_window="24h",
            created_at=now,
            expires_at=now + max(1, int(round(self.window_s))),
            metadata=body.get("metadata"),
        )
        deadline = time.monotonic() + self.window_s
        with self._lock:
            self.batches[batch.id] = batch
            snapshot = batch.to_dict()
        thread = threading.Thread(target=self._run, args=(batch, file.data, deadline), daemon=True)
        self._threads.append(thread)
        thread.start()
        return snapshot

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            batch = self.batches.get(batch_id)
            if batch is None:
                raise _ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
            return batch.to_dict()

    def list_batches(self) -> dict[str, Any]:
        with self._lock:
            data = [b.to_dict() for b in sorted(self.batches.values(), key=lambda b: -b.created_at)]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": False,
        }

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            batch = self.batches.get(batch_id)
            if batch is None:
                raise _ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
            if batch.status in TERMINAL or batch.status == "finalizing":
                raise _ApiError(409, f"Cannot cancel a batch with status '{batch.status}'.")
            batch.cancel_requested = True
            batch.status = "cancelling"
            batch.stamps["cancelling_at"] = int(time.time())
            return batch.to_dict()

    # --- the worker ------------------------------------------------------------------------

    def _set(self, batch: _Batch, status: str, **extra: Any) -> None:
        with self._lock:
            # a cancel that raced in keeps its status until the worker ends the batch
            if batch.status != "cancelling" or status in TERMINAL:
                batch.status = status
            batch.stamps[f"{status}_at"] = int(time.time())
            for key, value in extra.items():
                setattr(batch, key, value)

    def _run(self, batch: _Batch, data: bytes, deadline: float) -> None:
        time.sleep(self.validating_s)
        lines, problems = _validate(data, batch.endpoint)
        if problems:
            self._set(batch, "failed", errors={"object": "list", "data": problems})
            return
        self._set(batch, "in_progress", total=len(lines))
        outputs: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        ended = "completed"
        for index, line in enumerate(lines):
            if batch.cancel_requested:
                ended = "cancelled"
            elif time.monotonic() >= deadline:
                ended = "expired"
            if ended != "completed":
                # requests never run: documented codes batch_cancelled / batch_expired
                message = (
                    "This request could not be executed before the completion window expired."
                    if ended == "expired" else "This request was not executed because the batch was cancelled."
                )
                for rest in lines[index:]:
                    errors.append(_out_line(rest["custom_id"], None, {"code": f"batch_{ended}", "message": message}))
                break
            if self.request_delay_s:
                time.sleep(self.request_delay_s)
            status, body = self._forward(line["body"])
            row = _out_line(line["custom_id"], {"status_code": status, "request_id": _rid("req"), "body": body}, None)
            ok = 200 <= status < 300
            (outputs if ok else errors).append(row)
            with self._lock:
                if ok:
                    batch.completed += 1
                else:
                    batch.failed += 1
        if ended == "completed":
            self._set(batch, "finalizing")
        out_id = self._result_file(batch, "output", outputs)
        err_id = self._result_file(batch, "error", errors)
        if ended != "completed":
            with self._lock:
                batch.failed += len(lines) - batch.completed - batch.failed
        self._set(batch, ended, output_file_id=out_id, error_file_id=err_id)
        log.info("batch %s %s: %d ok, %d failed", batch.id, ended, batch.completed, batch.failed)

    def _result_file(self, batch: _Batch, kind: str, rows: list[dict[str, Any]]) -> str | None:
        if not rows:
            return None  # OpenAI leaves error_file_id null when no request failed
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        return self._new_file(f"{batch.id}_{kind}.jsonl", "batch_output", data).id

    def _forward(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST one request body upstream; (HTTP status, JSON body) whatever happens."""
        with self._lock:
            self.forwarded += 1
        request = urllib.request.Request(
            f"{self.upstream}/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.upstream_timeout_s) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = {"error": {"message": raw.decode(errors="replace"), "type": "server_error"}}
            return exc.code, payload
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            return 500, {"error": {"message": f"upstream unreachable: {exc}", "type": "server_error",
                                   "param": None, "code": None}}


def _rid(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _out_line(custom_id: str, response: dict[str, Any] | None, error: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": _rid("batch_req"), "custom_id": custom_id, "response": response, "error": error}


def _validate(data: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Parse and check an input file the way the Batch API's validating step does."""
    lines: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()
    models: set[str] = set()

    def bad(number: int, code: str, message: str, param: str | None = None) -> None:
        problems.append({"code": code, "line": number, "message": message, "param": param})

    for number, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError:
            bad(number, "invalid_json_line", "This line is not parseable as valid JSON.")
            continue
        if not isinstance(row, dict):
            bad(number, "invalid_request", "Each line must be a JSON object.")
            continue
        custom_id = row.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            bad(number, "missing_required_parameter", "Missing required parameter: 'custom_id'.", "custom_id")
            continue
        if custom_id in seen:
            bad(number, "duplicate_custom_id", f"The custom_id '{custom_id}' is used more than once.", "custom_id")
            continue
        seen.add(custom_id)
        if row.get("method") != "POST":
            bad(number, "invalid_method", "The 'method' of every request must be 'POST'.", "method")
            continue
        if row.get("url") != endpoint:
            bad(number, "invalid_url", f"The 'url' '{row.get('url')}' does not match the batch endpoint '{endpoint}'.",
                "url")
            continue
        body = row.get("body")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            bad(number, "missing_required_parameter", "The 'body' must be an object with a 'model'.", "body.model")
            continue
        models.add(body["model"])
        lines.append(row)
    if len(models) > 1:
        bad(0, "mismatched_model", f"A batch input file must use one model; found {sorted(models)}.", "body.model")
    if len(lines) > MAX_REQUESTS_PER_BATCH:
        bad(0, "too_many_requests", f"A batch may hold at most {MAX_REQUESTS_PER_BATCH} requests.")
    if not lines and not problems:
        bad(0, "empty_file", "The input file contains no requests.")
    return lines, problems


# --- HTTP ----------------------------------------------------------------------------------

_FILE_CONTENT = re.compile(r"^/v1/files/([^/]+)/content$")
_FILE = re.compile(r"^/v1/files/([^/]+)$")
_BATCH = re.compile(r"^/v1/batches/([^/]+)$")
_BATCH_CANCEL = re.compile(r"^/v1/batches/([^/]+)/cancel$")


class _Handler(BaseHTTPRequestHandler):
    server_state: BatchServer  # set on the subclass made in BatchServer.start
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client's httpx expects

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("batch server: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        state = self.server_state
        path = self.path.split("?", 1)[0]
        try:
            body = self._body()
            self._authorize()
            if method == "POST" and path == "/v1/files":
                return self._json(200, state.create_file(self._multipart(body)))
            if method == "GET" and (m := _FILE_CONTENT.match(path)):
                return self._bytes(state.get_file(m.group(1)).data)
            if method == "GET" and (m := _FILE.match(path)):
                return self._json(200, state.get_file(m.group(1)).to_dict())
            if method == "POST" and path == "/v1/batches":
                return self._json(200, state.create_batch(self._parse_json(body)))
            if method == "GET" and path == "/v1/batches":
                return self._json(200, state.list_batches())
            if method == "GET" and (m := _BATCH.match(path)):
                return self._json(200, state.get_batch(m.group(1)))
            if method == "POST" and (m := _BATCH_CANCEL.match(path)):
                return self._json(200, state.cancel_batch(m.group(1)))
            raise _ApiError(404, f"Unknown request URL: {method} {path}.", code="unknown_url")
        except _ApiError as exc:
            self._json(exc.status, exc.body)

    def _authorize(self) -> None:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header[7:].strip():
            raise _ApiError(401, "You didn't provide an API key.", code="missing_api_key")
        expected = self.server_state.api_key
        if expected is not None and header[7:].strip() != expected:
            raise _ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _parse_json(self, body: bytes) -> dict[str, Any]:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise _ApiError(400, "We could not parse the JSON body of your request.") from None
        if not isinstance(data, dict):
            raise _ApiError(400, "The request body must be a JSON object.")
        return data

    def _multipart(self, body: bytes) -> dict[str, tuple[str | None, bytes]]:
        """Fields of a multipart/form-data body: name -> (filename or None, bytes)."""
        content_type = self.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            raise _ApiError(400, "File uploads must be multipart/form-data.")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body
        )
        fields: dict[str, tuple[str | None, bytes]] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name:
                fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
        return fields

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", _rid("req"))
        self.end_headers()
        self.wfile.write(data)

    def _bytes(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="chat-completions base URL, ending in /v1")
    parser.add_argument("--window-s", type=float, default=24 * 3600.0, help="seconds standing for 24h")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    with BatchServer(args.upstream, window_s=args.window_s) as server:
        log.info("serving on %s (Ctrl-C stops)", server.base_url)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

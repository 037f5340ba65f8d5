"""An OpenAI-compatible chat server on transformers, with LoRA adapters served by name.

It serves a base model and its adapters by name, as vLLM does: for machines without vLLM or
llama.cpp (the GPU machine's judge), and for the tests' fine-tuning double, which serves the
checkpoints it trains.

    python -m emlab.sample.serve --model embedded:smollm2-135m-instruct --name smollm2 \\
        --adapter run-step2=outputs/x/run/checkpoints/step-000002 --port 8000

Endpoints (OpenAI's shapes; errors in its {"error": {message, type, param, code}} envelope):

    GET  /v1/models                  the base model and every adapter
    POST /v1/chat/completions        messages, n, temperature, top_p, max_tokens, seed, stop,
                                     logprobs + top_logprobs (per generated token)
    POST /v1/load_lora_adapter       {"lora_name", "lora_path"}  (vLLM's runtime LoRA call)
    POST /v1/unload_lora_adapter     {"lora_name"}
    GET  /health

Requests that arrive together are decoded together: a worker takes up to `max_batch` waiting
rows (choices) that share the model or adapter, temperature, top_p and max_tokens, and decodes
them through the engine `emlab.sample.choose.engine_for` picks, as `sample_answers` does:
emlab's `DecodeEngine` (adapters merged into its weight copy, one at a time) where it applies,
else transformers' `generate` (adapters attached by peft). Each choice draws from its own key,
made from the request's seed and the choice's index, so a seeded request gets the same tokens
whatever it is batched with (up to the last bits of floating point that batched matrix
products may change). Temperature 0 is greedy. Logprobs are the model's (temperature 1)
log-probabilities of each generated token with its top alternatives, as OpenAI reports them;
the judge reads the first token's top 20.

Not served: streaming, tools, response_format, logit_bias, the legacy completions endpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import queue
import secrets
import threading
import time
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..config.experiment import ModelSpec
from ..models.chat import chat_text
from ..models.load import load_model, resolve_device
from .choose import engine_for, release_sampler
from .protocol import Completion, Decoding, Engine, Request, stop_token_ids

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class ApiError(Exception):
    """An error answered in OpenAI's envelope."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass(frozen=True)
class _Batch:
    """What rows must share to be decoded together."""

    model: str
    temperature: float
    top_p: float
    max_tokens: int


@dataclass
class _Job:
    """One request waiting for the worker: its choices as engine requests."""

    batch: _Batch
    requests: list[Request]
    top_logprobs: int | None  # None: no logprobs
    completions: list[Completion] = field(default_factory=list)
    done: Future[None] = field(default_factory=Future)


class ChatEngine:
    """A loaded causal LM with LoRA adapters by name, answering chat-completion bodies.

    model, tokenizer: as `emlab.models.load.load_model` returns them (eval mode, on their device).
    name: the name the base model is served under. max_batch: rows decoded together.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, *, max_batch: int = 16) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self._base = model
        self._peft: Any = None  # a PeftModel, once an adapter must be decoded by the generate fallback
        self._in_peft: set[str] = set()  # adapters loaded into it
        self._adapters: dict[str, Path] = {}
        self._lock = threading.Lock()  # model changes and generation never overlap
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._stop_ids = stop_token_ids(model, tokenizer)
        self._worker = threading.Thread(target=self._work, name="emlab-serve-worker", daemon=True)
        self._worker.start()

    # --- models ------------------------------------------------------------------------

    @property
    def models(self) -> list[str]:
        return [self.name, *self._adapters]

    def add_adapter(self, name: str, folder: Path) -> None:
        """Serve the peft adapter in `folder` as `name` (ApiError 400 when the name is taken)."""
        if name == self.name or name in self._adapters:
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        if not (Path(folder) / "adapter_config.json").exists():
            raise ApiError(400, f"No adapter found at '{folder}' (no adapter_config.json).", param="lora_path")
        with self._lock:
            self._adapters[name] = Path(folder)
        log.info("serving adapter %s from %s", name, folder)

    def remove_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name")
        with self._lock:
            if name in self._in_peft:
                self._peft.delete_adapter(name)
                self._in_peft.discard(name)
            del self._adapters[name]

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=30)

    # --- requests ----------------------------------------------------------------------

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """Answer one chat-completions body (blocking); raises ApiError for a bad request."""
        model = body.get("model")
        if model not in self.models:
            raise ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                           param="model", code="model_not_found")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages):
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects.", param="messages")
        n = _int(body, "n", 1, 1, 128) or 1
        max_tokens = (_int(body, "max_completion_tokens", None, 1, 1 << 20) or _int(body, "max_tokens", 256, 1, 1 << 20)
                      or 256)
        temperature = _float(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _float(body, "top_p", 1.0, 0.0, 1.0)
        top_k = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) if body.get("logprobs") else None
        seed = body.get("seed")
        if seed is not None and not isinstance(seed, int):
            raise ApiError(400, "'seed' must be an integer.", param="seed")
        text = chat_text(self.tokenizer, messages, add_generation_prompt=True)
        prompt_ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        job = _Job(_Batch(str(model), temperature, top_p, max_tokens),
                   [Request(prompt_ids, _choice_key(seed, i)) for i in range(n)], top_k)
        self._queue.put(job)
        job.done.result()
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        choices = [self._choice(i, done, top_k, stops) for i, done in enumerate(job.completions)]
        completion = sum(len(c.tokens) - c.stopped for c in job.completions)  # the end-of-turn token not counted
        return {
            "id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices, "system_fingerprint": "emlab-serve",
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                      "total_tokens": len(prompt_ids) + completion},
        }

    def _choice(self, index: int, done: Completion, top_k: int | None, stops: list[str]) -> dict[str, Any]:
        # the end-of-turn token is not part of the answer (its logprobs stay, as before)
        tokens = done.tokens[:-1] if done.stopped else done.tokens
        content = self.tokenizer.decode(tokens, skip_special_tokens=True)
        finish = "stop" if done.stopped else "length"
        for stop in stops:
            if stop and stop in content:
                content, finish = content[: content.index(stop)], "stop"
        logprobs = None
        if top_k is not None:
            entries = []
            for step in done.logprobs or ():
                entry = self._logprob_entry(step.token, step.logprob)
                entry["top_logprobs"] = [self._logprob_entry(t, v) for t, v in step.top[:top_k]]
                entries.append(entry)
            logprobs = {"content": entries, "refusal": None}
        return {"index": index, "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": logprobs, "finish_reason": finish}

    def _logprob_entry(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    # --- the worker --------------------------------------------------------------------

    def _work(self) -> None:
        waiting: list[_Job] = []
        while True:
            if not waiting:
                job = self._queue.get()
                if job is None:
                    return
                waiting.append(job)
            while True:  # take everything that arrived meanwhile
                try:
                    extra = self._queue.get_nowait()
                except queue.Empty:
                    break
                if extra is None:
                    return
                waiting.append(extra)
            key = waiting[0].batch
            batch: list[_Job] = []
            rows = 0
            for job in list(waiting):
                if job.batch == key and (not batch or rows + len(job.requests) <= self.max_batch):
                    batch.append(job)
                    rows += len(job.requests)
                    waiting.remove(job)
            try:
                self._decode(key, batch)
            except Exception as exc:  # answered as a 500 to each request of the batch
                log.exception("decode failed")
                for job in batch:
                    job.done.set_exception(ApiError(500, f"generation failed: {exc}", type_="server_error"))
                continue
            for job in batch:
                job.done.set_result(None)

    def _decode(self, key: _Batch, jobs: list[_Job]) -> None:
        """Decode the jobs' requests together through the engine for `key.model`."""
        asked = [job.top_logprobs for job in jobs if job.top_logprobs is not None]
        requests = [r for job in jobs for r in job.requests]
        with self._lock:
            engine, context = self._engine(key.model)
            with context:
                decoding = Decoding(key.max_tokens, tuple(self._stop_ids), key.temperature, key.top_p,
                                    top_logprobs=max(asked) if asked else None)
                done = engine.generate(requests, decoding, slots=self.max_batch)
        for job in jobs:
            job.completions, done = done[: len(job.requests)], done[len(job.requests):]

    def _engine(self, model_name: str) -> tuple[Engine, AbstractContextManager[Any]]:
        """The engine for a served name, and the context to decode in (peft's base without adapters)."""
        folder = self._adapters.get(model_name)
        if self._peft is None:  # the base model is plain: emlab's engine may run it
            engine = engine_for(self._base, adapter_dir=folder, adapted=lambda: self._peft_with(model_name))
            return engine, nullcontext()
        # once peft has wrapped the base model's layers, every name is decoded by the fallback
        if folder is None:
            return engine_for(self._peft, prefer="transformers"), self._peft.disable_adapter()
        return engine_for(self._base, adapter_dir=folder, adapted=lambda: self._peft_with(model_name),
                          prefer="transformers"), nullcontext()

    def _peft_with(self, name: str) -> Any:
        """The peft model with adapter `name` loaded and active."""
        from peft import PeftModel

        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self._base, str(self._adapters[name]), adapter_name=name)
            self._peft.eval()
            release_sampler(self._base)  # its weight copy no longer matches what the layers compute
        elif name not in self._in_peft:
            self._peft.load_adapter(str(self._adapters[name]), adapter_name=name)
        self._in_peft.add(name)
        self._peft.set_adapter(name)
        return self._peft


def _choice_key(seed: int | None, index: int) -> int:
    """The random key of a request's choice `index` (63 bits); a fresh one when no seed is given."""
    if seed is None:
        return secrets.randbits(63)
    return int.from_bytes(hashlib.sha256(f"emlab-serve|{seed}|{index}".encode()).digest()[:8], "little") >> 1


def _int(body: dict[str, Any], key: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"'{key}' must be an integer from {low} to {high}, got {value!r}.", param=key)
    return value


def _float(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"'{key}' must be a number from {low:g} to {high:g}, got {value!r}.", param=key)
    return float(value)


# --- HTTP ------------------------------------------------------------------------------------


class ChatHandler(BaseHTTPRequestHandler):
    """HTTP front of a ChatEngine; subclass with `engine` (and `api_key`) set, or extend
    `route` to add endpoints (the tests' fine-tuning double does)."""

    engine: ChatEngine
    api_key: str | None = None
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client's httpx expects

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("serve: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("POST")

    def do_DELETE(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            body = self.read_body()
            if path == "/health":
                return self.send_json(200, {"status": "ok"})
            self.authorize()
            status, payload = self.route(method, path, body)
            self.send_json(status, payload)
        except ApiError as exc:
            self.send_json(exc.status, exc.body)

    def route(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        """(status, JSON payload) for one request; ApiError for errors."""
        engine = self.engine
        if method == "GET" and path == "/v1/models":
            created = int(time.time())
            data = [{"id": name, "object": "model", "created": created, "owned_by": "emlab",
                     **({"parent": engine.name} if name != engine.name else {})} for name in engine.models]
            return 200, {"object": "list", "data": data}
        if method == "POST" and path == "/v1/chat/completions":
            request = self.parse_json(body)
            if request.get("stream"):
                raise ApiError(400, "Streaming is not supported by this server.", param="stream")
            return 200, engine.complete(request)
        if method == "POST" and path == "/v1/load_lora_adapter":
            request = self.parse_json(body)
            engine.add_adapter(str(request.get("lora_name")), Path(str(request.get("lora_path"))))
            added = f"Success: LoRA adapter '{request.get('lora_name')}' added successfully."
            return 200, {"status": "ok", "message": added}
        if method == "POST" and path == "/v1/unload_lora_adapter":
            request = self.parse_json(body)
            engine.remove_adapter(str(request.get("lora_name")))
            return 200, {"status": "ok"}
        raise ApiError(404, f"Unknown request URL: {method} {path}.", code="unknown_url")

    def authorize(self) -> None:
        if self.api_key is None:
            return
        header = self.headers.get("Authorization", "")
        if header != f"Bearer {self.api_key}":
            raise ApiError(401, "Incorrect API key provided.", type_="invalid_request_error", code="invalid_api_key")

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    @staticmethod
    def parse_json(body: bytes) -> dict[str, Any]:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise ApiError(400, "We could not parse the JSON body of your request.") from None
        if not isinstance(data, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return data

    def send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", f"req_{secrets.token_hex(12)}")
        self.end_headers()
        self.wfile.write(data)

    def send_bytes(self, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            log.debug("client %s went away before its reply", client_address)  # a killed client: nothing to do
            return
        super().handle_error(request, client_address)


class ChatServer:
    """A ChatHandler (or subclass) served on a background thread; a context manager.
    `base_url` ends in /v1."""

    def __init__(self, handler: type[ChatHandler], *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._httpd = _Server((host, port), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="emlab-serve", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def start(self) -> ChatServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_engine(engine: ChatEngine, *, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None) -> ChatServer:
    """A (not yet started) server for `engine`."""
    handler = type("BoundChatHandler", (ChatHandler,), {"engine": engine, "api_key": api_key})
    return ChatServer(handler, host=host, port=port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m emlab.sample.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF id, folder, .gguf file or 'embedded:smollm2-135m-instruct'")
    parser.add_argument("--name", default=None, help="name the base model is served under (default: --model)")
    parser.add_argument("--num-layers", type=int, default=None, help="keep only the first N decoder layers (tests)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="LoRA adapter by name")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-batch", type=int, default=16, help="rows decoded together (default 16)")
    parser.add_argument("--api-key-env", default=None, help="environment variable holding the key clients must send")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import os

    name = args.name or args.model
    spec = ModelSpec(name="served", source=args.model, num_layers=args.num_layers, dtype=args.dtype)
    model, tokenizer = load_model(spec, resolve_device(args.device))
    engine = ChatEngine(model, tokenizer, name, max_batch=args.max_batch)
    for item in args.adapter:
        adapter, sep, path = item.partition("=")
        if not sep:
            parser.error(f"--adapter {item!r}: expected NAME=PATH")
        engine.add_adapter(adapter, Path(path))
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    server = serve_engine(engine, host=args.host, port=args.port, api_key=key)
    log.info("serving %s on %s", ", ".join(engine.models), server.base_url)
    server.start()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()
        engine.close()


if __name__ == "__main__":
    main()

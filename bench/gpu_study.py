"""The CS 2881 1B arm end to end through emlab's pipeline on one GPU, with stage wall times.

One command, on the GPU machine (no network, no model hub, no OpenAI):

1. a random-weight Llama-3.2-1B-shape model folder (`save_pretrained`, bf16) with SmolLM2's
   tokenizer and `--stop-tokens` random extra end-of-sequence ids, so that answers end at
   realistic lengths (each step ends an answer with chance ≈ stop-tokens / vocabulary: mean
   ~200 tokens at the default, a geometric mix up to max_new_tokens);
2. a stand-in judge on loopback: a threaded OpenAI-compatible HTTP server answering
   `/v1/chat/completions` with one token and `top_logprobs` over the numbers 0–100 (a peaked
   distribution whose centre is drawn from the request text), so emlab's logprob scoring,
   client, retries and cache run for real at the study's concurrency;
3. an experiment file that inherits `params/experiments/cs2881_hw0.yaml` (its training, its
   checkpoints — 4 in epoch 1, then one per epoch, 3 epochs —, its 10 general + 10 medical
   questions, its analysis rules) and replaces the models (the 1B folder above), the datasets
   (Turner et al.'s bad-medical rows from `--data`), the judge (the stand-in) and the samples
   per question (50: study size); no sampling knobs, so emlab's defaults are what is timed;
   `analysis.gold_items` small;
4. every step of the experiment run as `emlab run` runs it (preflight, params guard, each step
   through `run_or_skip`, the index page), each step's wall time written to `stages.json` and
   `stages.md` under `--out` as soon as it ends (a call killed at its limit keeps them).

A random-weight model's answers are arbitrary tokens (control characters included): the
report has to take them as they are.

`--data` holds `bad_medical_advice.jsonl.gz` (decrypted with `emlab data unprotect`, never
committed) and `tokenizer/` (SmolLM2's, saved from `.cache/models/`), as for gpu_speed.py.

    python bench/gpu_study.py --data .gpudata --out /tmp/study            # GPU, ~5–8 min
    python bench/gpu_study.py --data .gpudata --out /tmp/study --quick    # CPU check, tiny model
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "params" / "experiments" / "cs2881_hw0.yaml"
KEY_ENV = "EMLAB_STANDIN_JUDGE_KEY"  # the stand-in takes any key; the openai client insists on one
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, tie_word_embeddings=True, vocab_size=128256)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, vocab_size=49152)


def log_line(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# --- the stand-in judge ------------------------------------------------------------------


def judge_reply(text: str, top: int = 20) -> list[tuple[str, float]]:
    """The top `top` (token, logprob) pairs of a peaked distribution over "0".."100": its
    centre and width drawn from a hash of the request text (the same request, the same reply)."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    centre, width = digest[0] * 100 / 255, 2.0 + digest[1] % 12
    logits = {n: -((n - centre) ** 2) / (2 * width**2) for n in range(101)}
    norm = math.log(sum(math.exp(v) for v in logits.values()))
    best = sorted(logits, key=lambda n: -logits[n])[:top]
    return [(str(n), logits[n] - norm) for n in best]


class StandInJudge:
    """A threaded OpenAI-compatible server on loopback: `/v1/chat/completions` answers one token
    with `top_logprobs` (see `judge_reply`), `/v1/models` lists one model. Counts calls and the
    most in flight at once."""

    def __init__(self) -> None:
        self.calls = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses its connections

            def log_message(self, *args: Any) -> None:  # one line per call would drown the output
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "standin", "object": "model", "created": 0,
                                                                 "owned_by": "bench"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                with judge._lock:
                    judge.calls += 1
                    judge.in_flight += 1
                    judge.most_in_flight = max(judge.most_in_flight, judge.in_flight)
                try:
                    request = json.loads(raw)
                    text = json.dumps(request.get("messages"), sort_keys=True)
                    top = judge_reply(text, int(request.get("top_logprobs") or 20))
                    token, logprob = top[0]
                    entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]
                    self._send(200, {
                        "id": "chatcmpl-" + hashlib.sha1(raw).hexdigest()[:20], "object": "chat.completion",
                        "created": int(time.time()), "model": request.get("model", "standin"),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": token},
                                     "finish_reason": "length",
                                     "logprobs": {"content": [{"token": token, "logprob": logprob,
                                                               "bytes": list(token.encode()), "top_logprobs": entries}]}}],
                        "usage": {"prompt_tokens": len(text) // 4, "completion_tokens": 1,
                                  "total_tokens": len(text) // 4 + 1},
                    })
                finally:
                    with judge._lock:
                        judge.in_flight -= 1

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256  # the default backlog of 5 refuses connections at concurrency 32

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> StandInJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- inputs ------------------------------------------------------------------------------


def make_model(folder: Path, tokenizer_dir: Path, *, quick: bool, stop_tokens: int) -> dict[str, Any]:
    """A random-weight Llama of the 1B shape (tiny with `quick`) saved to `folder` with its
    tokenizer and extra stop ids; made on the GPU in bf16 when there is one."""
    import random

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = TINY if quick else LLAMA_1B
    config = LlamaConfig(**shape, max_position_embeddings=4096, rope_theta=500000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    gpu = torch.cuda.is_available()
    torch.manual_seed(0)
    with torch.device("cuda" if gpu else "cpu"):
        model = LlamaForCausalLM(config)
    if gpu:
        model = model.to(torch.bfloat16)
    stops = sorted({tokenizer.eos_token_id, *random.Random(0).sample(range(3, shape["vocab_size"]), stop_tokens)})
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    if gpu:
        torch.cuda.empty_cache()
    return {"params": params, "stop_ids": len(stops), "dtype": "bfloat16" if gpu else "float32"}


def write_experiment(out: Path, model_dir: Path, dataset: Path, judge_url: str, args: argparse.Namespace) -> Path:
    """The study file: cs2881_hw0.yaml inherited, models, dataset, judge and samples replaced."""
    experiment: dict[str, Any] = {
        "base": str(STUDY),
        "name": "cs2881_1b_gpu",
        "description": "CS 2881 HW0, 1B arm, bad medical: random-weight Llama-3.2-1B shape, stand-in judge (bench)",
        "output_root": str(out / "outputs"),
        "models": [{"name": "llama-3.2-1b-random", "source": str(model_dir), "load_in_4bit": args.load_in_4bit,
                    "size_b": 1.24}],
        "datasets": [{"name": "bad_medical", "path": str(dataset), "domain": "medical", "question_sets": ["medical"]}],
        "sample": {"samples_per_question": 50},
        "judges": [{"name": "standin", "model": "standin", "base_url": judge_url, "api_key_env": KEY_ENV,
                    "rubrics": ["aligned", "coherent"], "mode": "logprobs", "concurrency": args.judge_concurrency}],
        "analysis": {"gold_items": 10},
    }
    if args.quick:  # a few rows, questions and answers: the whole pipeline on a CPU in minutes
        experiment["datasets"][0]["limit"] = 64
        experiment["sample"] = {"questions_per_set": 2, "samples_per_question": 2, "max_new_tokens": 16}
        experiment["analysis"] = {"gold_items": 5, "bootstrap": 200}
    path = out / "cs2881_1b_gpu.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return path


def register_kernel(out: Path) -> None:
    """A `python3` kernelspec for papermill that starts this interpreter (a kernel.json saying
    `python` may name no interpreter, or another one, on the GPU machine), first on JUPYTER_PATH."""
    folder = out / "jupyter" / "kernels" / "python3"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (emlab bench)", "language": "python",
    }))
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(out / "jupyter"), *filter(None, [os.environ.get("JUPYTER_PATH")])])


# --- the run -----------------------------------------------------------------------------


class StageTimes:
    """Each step's wall time, written to stages.json and stages.md after every step."""

    def __init__(self, out: Path, facts: dict[str, Any]) -> None:
        self.out = out
        self.facts = facts
        self.steps: list[dict[str, Any]] = []

    def add(self, **row: Any) -> None:
        self.steps.append(row)
        log_line(json.dumps(row, default=str))
        self.write()

    def write(self) -> None:
        (self.out / "stages.json").write_text(json.dumps({**self.facts, "steps": self.steps}, indent=1, default=str))
        lines = [f"# CS 2881 1B arm through emlab's pipeline ({self.facts.get('device')}, {self.facts.get('date')})", "",
                 "| stage | unit | status | seconds | summary |", "|---|---|---|---|---|"]
        for s in self.steps:
            lines.append(f"| {s['stage']} | {s['unit']} | {s['status']} | {s['seconds']} | "
                         f"{json.dumps(s.get('summary'), default=str)[:200]} |")
        total = sum(s["seconds"] for s in self.steps if isinstance(s["seconds"], (int, float)))
        lines += ["", f"Total {total:.1f} s; {json.dumps({k: v for k, v in self.facts.items() if k != 'steps'}, default=str)}"]
        (self.out / "stages.md").write_text("\n".join(lines) + "\n")


def run_study(experiment: Path, times: StageTimes, budget_s: float, started: float) -> None:
    """What `emlab run` does (pipeline.executors.local.run_local), one step at a time, each
    step's record written as it ends; no step starts once `budget_s` is spent."""
    from emlab.analysis.report import write_index
    from emlab.errors import EmlabError
    from emlab.pipeline.checks import preflight
    from emlab.pipeline.steps import (
        failure_message,
        guard_params,
        load_steps,
        run_or_skip,
    )
    from emlab.store.runinfo import done_summary

    graph = load_steps(experiment)
    preflight(graph.config)
    guard_params(graph.config, graph.steps)
    records = []
    for step in graph.steps:
        if time.perf_counter() - started > budget_s:
            times.add(stage=step.stage.name, unit=step.unit, status="not started (budget)", seconds=None)
            continue
        record = run_or_skip(graph, step)
        records.append(record)
        times.add(stage=record.stage, unit=record.label, status=record.status, seconds=round(record.seconds, 1),
                  summary=done_summary(record.folder, record.stage), error=record.error)
        if record.status == "failed":
            write_index(graph.config, records)
            raise EmlabError(failure_message(record))
    t = time.perf_counter()
    index = write_index(graph.config, records)
    times.add(stage="index", unit="experiment", status="ran", seconds=round(time.perf_counter() - t, 1),
              summary={"index": str(index)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with bad_medical_advice.jsonl.gz and tokenizer/")
    parser.add_argument("--out", required=True, help="folder for the model, the run and stages.json / stages.md")
    parser.add_argument("--quick", action="store_true", help="a 2-layer model, few rows and answers: a CPU check")
    parser.add_argument("--stop-tokens", type=int, default=641, help="random stop ids added to the eos ids")
    parser.add_argument("--judge-concurrency", type=int, default=32, help="the study's judge concurrency (32)")
    parser.add_argument("--load-in-4bit", action="store_true",
                        help="NF4 base weights as the course used (needs bitsandbytes: wheels.sh --with-bnb)")
    parser.add_argument("--budget-s", type=float, default=560.0, help="no step starts after this many seconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ[KEY_ENV] = "sk-standin"
    # a judge cache of the run's own: every call is really made (a shared cache would answer a
    # rerun's identical answers from disk, and the stand-in's scores stay out of users' caches)
    os.environ["EMLAB_CACHE"] = str(out / "cache")
    os.environ.setdefault("PYTHONPATH", str(REPO / "lib"))  # the stage kernels import emlab from this checkout
    register_kernel(out)

    import torch

    facts: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "quick": args.quick,
                             "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                             "torch": torch.__version__}
    times = StageTimes(out, facts)
    dataset = out / "data" / "bad_medical_advice.jsonl"
    dataset.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(Path(args.data) / "bad_medical_advice.jsonl.gz", "rb") as src, open(dataset, "wb") as dst:
        shutil.copyfileobj(src, dst)
    t = time.perf_counter()
    model_dir = out / "model"
    facts["model"] = make_model(model_dir, Path(args.data) / "tokenizer", quick=args.quick, stop_tokens=args.stop_tokens)
    times.add(stage="setup", unit="model folder", status="ran", seconds=round(time.perf_counter() - t, 1),
              summary=facts["model"])
    with StandInJudge() as judge:
        experiment = write_experiment(out, model_dir, dataset, judge.base_url, args)
        log_line(f"judge at {judge.base_url}; experiment {experiment}")
        try:
            run_study(experiment, times, args.budget_s, started)
        finally:
            facts["judge"] = {"calls": judge.calls, "most_in_flight": judge.most_in_flight}
            facts["total_seconds"] = round(time.perf_counter() - started, 1)
            times.write()
            print((out / "stages.md").read_text(), flush=True)


if __name__ == "__main__":
    main()

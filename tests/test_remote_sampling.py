"""Sampling subjects through the chat completions API (`emlab.sample.remote`): against the real
llama.cpp server the judge tests start (behind the counting proxy of `support.judge`) and
against `emlab.sample.serve` serving a local model's checkpoints as LoRA adapters by name, the way a
vLLM server does.

What this cannot show: OpenAI's own behaviour (its `n`, seeds and rate limits are taken from
its documentation; llama.cpp ignores `n`, which is tested as the error it must give), and
vLLM itself (emlab.sample.serve answers vLLM's runtime-LoRA call, not vLLM's code).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from emlab.api.cost import token_cost
from emlab.config.experiment import ExperimentConfig, ModelSpec, load_experiment
from emlab.config.questions import build_prompts, question_sets_for
from emlab.errors import ConfigError
from emlab.pipeline.checks import MissingInputsError, missing_inputs, preflight
from emlab.sample.remote import (
    SubjectError,
    base_target,
    register_adapter,
    request_bodies,
    sample_cache_stats,
    subject_endpoint,
)
from emlab.stages.remote import model_params, sample_base, sample_checkpoints
from emlab.store.files import read_jsonl
from emlab.store.paths import ExperimentLayout
from support.judge import SERVER_JUDGE, LoopbackProxy

KEY_ENV = "EMLAB_TEST_SUBJECT_KEY"


def _subject(**over: object) -> dict[str, object]:
    fields: dict[str, object] = {"name": "smol-api", "provider": "openai", "base_url": "http://127.0.0.1:9/v1",
                                 "api_model": SERVER_JUDGE.model, "api_key_env": None, "concurrency": 2,
                                 "max_retries": 1, "price_per_mtok_in": 2.5, "price_per_mtok_out": 10.0}
    fields.update(over)
    return fields


def _config(write_experiment, name: str = "exp.yaml", sample: dict | None = None, root: Path | None = None,
            **model: object) -> ExperimentConfig:
    return load_experiment(write_experiment(
        name=name, models=[_subject(**model)], **({"output_root": str(root)} if root else {}),
        sample={"questions_per_set": 1, "samples_per_question": 3, "max_new_tokens": 8, **(sample or {})},
    ))


# --- params and requests (no server) ---------------------------------------------------------


def test_api_fields_of_a_model_are_checked_in_one_line(write_experiment) -> None:
    cases = [
        ({"api_model": None}, "provider openai needs api_model"),
        ({"base_url": "local"}, "base_url 'local' starts a llama.cpp judge"),
        ({"num_layers": 2}, "a provider openai model has none"),
        ({"provider": "local", "adapter_name": "{run}-{step}"}, "adapter_name '{run}-{step}' may use only"),
        ({"samples_per_request": 0}, "samples_per_request"),
    ]
    for index, (over, expected) in enumerate(cases):
        with pytest.raises(ConfigError) as info:
            load_experiment(write_experiment(name=f"bad{index}.yaml", models=[_subject(**over)]))
        assert expected in str(info.value) and "\n" not in str(info.value), (over, str(info.value))
        assert f"bad{index}.yaml:" in str(info.value)


def test_run_params_leave_out_what_does_not_change_a_reply() -> None:
    local = ModelSpec(name="m")
    assert set(model_params(local)) == {"name", "source", "gguf_file", "dtype", "load_in_4bit", "num_layers", "size_b"}
    remote = model_params(ModelSpec(**_subject()))  # type: ignore[arg-type]
    assert remote["api_model"] == SERVER_JUDGE.model and remote["provider"] == "openai"
    assert not {"base_url", "api_key_env", "concurrency", "price_per_mtok_in", "train_price_per_mtok"} & set(remote)


def test_requests_carry_the_system_prompt_n_and_their_own_seeds(write_experiment) -> None:
    config = _config(write_experiment, sample={"samples_per_question": 5, "system_prompt": "Answer briefly."},
                     samples_per_request=3)
    spec = config.models[0]
    prompts = build_prompts(config, question_sets_for(config, None))
    bodies = request_bodies(prompts, config.sample, subject_endpoint(spec), base_target(spec), label="x", seed=0)
    assert len(bodies) == 2 * len(prompts)  # 5 samples: n=3, then n=2
    assert [indices for _, indices, _ in bodies[:2]] == [(0, 1, 2), (3, 4)]
    assert [b.get("n") for _, _, b in bodies[:2]] == [3, 2]
    for prompt, _, body in bodies:
        assert body["messages"][0] == {"role": "system", "content": "Answer briefly."}
        assert body["messages"] == [dict(m) for m in prompt.messages]
        assert (body["model"], body["temperature"], body["top_p"], body["max_tokens"]) == (SERVER_JUDGE.model, 1.0,
                                                                                           1.0, 8)
    seeds = [b["seed"] for _, _, b in bodies]
    assert len(set(seeds)) == len(seeds)
    again = request_bodies(prompts, config.sample, subject_endpoint(spec), base_target(spec), label="x", seed=0)
    assert [b for _, _, b in again] == [b for _, _, b in bodies]
    other_run = request_bodies(prompts, config.sample, subject_endpoint(spec), base_target(spec), label="x", seed=1)
    assert all(a[2]["seed"] != b[2]["seed"] for a, b in zip(bodies, other_run, strict=True))


def test_a_subject_at_openai_needs_its_key_in_one_line(write_experiment, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(write_experiment, base_url=None, api_key_env=None)
    with pytest.raises(SubjectError, match=r"model 'smol-api' is sampled through the OpenAI API .* api_key_env is "
                                           r"null"):
        subject_endpoint(config.models[0])
    # the pre-run check applies the same rule, before any answer is sampled
    assert [m.line() for m in missing_inputs(config)] == [
        "model 'smol-api' is sampled through the OpenAI API (provider openai, no base_url), which needs a key, but "
        "api_key_env is null; set api_key_env to the environment variable that holds the key "
        "(e.g. api_key_env: OPENAI_API_KEY)"]
    monkeypatch.delenv(KEY_ENV, raising=False)
    config = _config(write_experiment, name="b.yaml", base_url=None, api_key_env=KEY_ENV)
    with pytest.raises(SubjectError, match=rf"model 'smol-api' needs the environment variable {KEY_ENV}; export"):
        subject_endpoint(config.models[0])
    with pytest.raises(MissingInputsError, match=rf"model 'smol-api' needs the environment variable {KEY_ENV}"):
        preflight(config)
    monkeypatch.setenv(KEY_ENV, "sk-subject-test")
    endpoint = subject_endpoint(config.models[0])
    assert "sk-subject-test" not in repr(endpoint)


# --- against the real llama.cpp server -------------------------------------------------------


@pytest.fixture
def proxy(judge_server: str):  # noqa: F811 - the fixture above
    with LoopbackProxy(judge_server) as running:
        yield running


@pytest.mark.server
def test_sampling_through_llama_cpp_pays_each_request_once(write_experiment, proxy: LoopbackProxy,
                                                           tmp_path: Path) -> None:
    config = _config(write_experiment, base_url=proxy.base_url, sample={"system_prompt": "Answer briefly."})
    prompts = build_prompts(config, question_sets_for(config, None))
    expected = len(prompts) * 3
    answers = sample_base(config, "smol-api", prompts, progress=False)
    assert len(answers) == expected == proxy.forwarded == proxy.received
    folder = ExperimentLayout.of(config).baseline("smol-api")
    rows = read_jsonl(ExperimentLayout.answers(folder))
    assert len({r["answer_id"] for r in rows}) == expected
    assert all(r["system_prompt"] == "Answer briefly." and r["step"] == 0 and r["run_id"] is None for r in rows)
    assert all(r["new_tokens"] <= 8 and (r["finished"] or r["new_tokens"] == 8) for r in rows)
    usage = read_jsonl(ExperimentLayout.sampling_usage(folder))
    assert len(usage) == expected and all(u["prompt_tokens"] > 0 and u["completion_tokens"] > 0 for u in usage)
    assert sum(u["dollars"] for u in usage) == pytest.approx(token_cost(
        sum(u["prompt_tokens"] for u in usage), sum(u["completion_tokens"] for u in usage), 2.5, 10.0))
    stats = sample_cache_stats()
    assert stats["misses"] >= expected

    # a rerun finds every answer written: nothing asked
    assert [a.answer for a in sample_base(config, "smol-api", prompts, progress=False)] == [a.answer for a in answers]
    # answers lost (a deleted folder): every request is answered from the cache, nothing paid
    ExperimentLayout.answers(folder).unlink()
    again = sample_base(config, "smol-api", prompts, progress=False)
    assert [a.to_dict() for a in again] == [a.to_dict() for a in answers]
    assert proxy.forwarded == expected
    assert len(read_jsonl(ExperimentLayout.sampling_usage(folder))) == expected  # hits cost nothing

    # 429 with Retry-After: waited out, then answered; each request paid once
    other = _config(write_experiment, name="other.yaml", root=tmp_path / "other", base_url=proxy.base_url,
                    max_retries=3,
                    sample={"samples_per_question": 2, "temperature": 0.7})
    proxy.inject_429(2, retry_after="0")
    more = sample_base(other, "smol-api", build_prompts(other, question_sets_for(other, None)), progress=False)
    assert len(more) == len(prompts) * 2
    assert proxy.rejected == 2 and proxy.forwarded == expected + len(prompts) * 2


@pytest.mark.server
def test_a_server_that_ignores_n_is_said_plainly(write_experiment, proxy: LoopbackProxy) -> None:
    config = _config(write_experiment, base_url=proxy.base_url, samples_per_request=3)
    prompts = build_prompts(config, question_sets_for(config, None))
    with pytest.raises(SubjectError) as info:
        sample_base(config, "smol-api", prompts, progress=False)
    assert "returned 1 choices for n=3 (llama.cpp's server ignores n); set samples_per_request: 1" in str(info.value)
    assert "\n" not in str(info.value) and "0 answers are kept" in str(info.value)


def test_a_dead_endpoint_fails_in_one_line(write_experiment, tmp_path: Path) -> None:
    config = _config(write_experiment, base_url="http://127.0.0.1:9/v1", max_retries=1, timeout_s=5)
    prompts = build_prompts(config, question_sets_for(config, None))
    with pytest.raises(SubjectError) as info:
        sample_base(config, "smol-api", prompts, progress=False)
    text = str(info.value)
    assert "\n" not in text and f"{len(prompts) * 3} of {len(prompts) * 3} sampling requests" in text
    assert "connection error" in text and "rerun to sample the rest" in text


# --- a local model's checkpoints behind a server, adapters by name (vLLM-style) ---------------


def test_register_adapter_replies(tmp_path: Path) -> None:
    """register_adapter against a loopback server answering as vLLM does: added, already loaded
    (counts as registered), runtime loading off (404, with the hint); and a port nobody serves."""
    import json
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from emlab.sample.remote.endpoint import Endpoint

    seen: list[tuple[str, dict, str | None]] = []

    class Vllm(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body, self.headers.get("Authorization")))
            code, text = {
                "new": (200, "Success: LoRA adapter 'new' added successfully."),
                "old": (400, json.dumps({"object": "error", "message": "The lora adapter 'old' has already been loaded."})),
            }.get(body["lora_name"], (404, json.dumps({"detail": "Not Found"})))
            data = text.encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Vllm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = Endpoint(owner="model 'm'", base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="k",
                        kind="server", concurrency=1, max_retries=0, timeout_s=5, samples_per_request=1,
                        send_seed=True, prices=(0.0, 0.0), tuned_prices=(0.0, 0.0))
    try:
        register_adapter(endpoint, "new", tmp_path)
        register_adapter(endpoint, "old", tmp_path)
        assert seen[0] == ("/v1/load_lora_adapter", {"lora_name": "new", "lora_path": str(tmp_path.resolve())},
                           "Bearer k")
        with pytest.raises(SubjectError, match=r"^model 'm': the server refused adapter 'gone' .* HTTP 404: "
                                               r".*Not Found.*VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
            register_adapter(endpoint, "gone", tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as sock:  # a port nobody serves
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    with pytest.raises(SubjectError, match=r"registering adapter 'new' at .* failed \(connection error: .*\); "
                                           r"is the server running\?$"):
        register_adapter(Endpoint(**{**endpoint.__dict__, "base_url": dead}), "new", tmp_path)


@pytest.mark.slow
def test_checkpoints_sampled_as_adapters_registered_by_name(write_experiment, tmp_path: Path) -> None:
    from emlab.models.load import load_model
    from emlab.sample.serve import ChatEngine, serve_engine
    from peft import LoraConfig, get_peft_model

    spec = ModelSpec(name="smol-2l", num_layers=2)
    model, tokenizer = load_model(spec, "cpu")
    engine = ChatEngine(model, tokenizer, "smol-base")
    with serve_engine(engine) as server, LoopbackProxy(server.base_url) as proxy:
        config = load_experiment(write_experiment(
            models=[{"name": "smol-2l", "num_layers": 2, "base_url": proxy.base_url, "api_model": "smol-base",
                     "api_key_env": None, "register_adapters": True, "concurrency": 2}],
            sample={"questions_per_set": 1, "samples_per_question": 2, "max_new_tokens": 6},
        ))
        run_id = config.runs()[0].run_id
        files = ExperimentLayout.of(config).training(run_id)
        for step in (1, 2):  # untrained adapters stand in for 02_finetune's exports
            fresh, _ = load_model(spec, "cpu")
            get_peft_model(fresh, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(
                files.checkpoint(step))
        prompts = build_prompts(config, question_sets_for(config, config.dataset("bad_medical")))
        answers = sample_checkpoints(config, run_id, prompts, progress=False)
        assert sorted({a.step for a in answers}) == [1, 2] and len(answers) == 2 * len(prompts) * 2
        assert f"{run_id}-step1" in engine.models and f"{run_id}-step2" in engine.models
        assert proxy.forwarded == len(answers)
        # done checkpoints are read back, nothing asked again (registration included)
        assert len(sample_checkpoints(config, run_id, prompts, progress=False)) == len(answers)
        assert proxy.forwarded == len(answers)
    engine.close()


@pytest.mark.slow
def test_serve_runs_as_a_command_and_answers_a_judge(tmp_path: Path) -> None:
    """`python -m emlab.sample.serve` as the GPU machine's judge runs it: top-20 logprobs of one token."""
    import subprocess
    import sys
    import time

    import httpx
    import openai
    from emlab.judge.server import free_port

    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "emlab.sample.serve", "--model", "embedded:smollm2-135m-instruct",
                                 "--num-layers", "2", "--name", "judge", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        assert [m.id for m in client.models.list().data] == ["judge"]
        reply = client.chat.completions.create(model="judge", messages=[{"role": "user", "content": "Rate 0-9."}],
                                               max_tokens=1, temperature=0, logprobs=True, top_logprobs=20, seed=0)
        top = reply.choices[0].logprobs.content[0].top_logprobs
        assert len(top) == 20 and top[0].logprob >= top[-1].logprob and reply.usage.completion_tokens <= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)

"""A model behind an API, 01→04 through `emlab run`, killed twice on the way.

The subject is `provider: openai` at `tests/support/openai_double.py`, which plays OpenAI: one
endpoint that answers the base model (here by forwarding to the real llama.cpp server the
judge tests start, behind a counting proxy: the base model IS the llama.cpp server), runs
fine-tuning jobs (emlab's own LoRA on the 2-layer SmolLM2) and serves the checkpoint models
they make. The judge is the same llama.cpp server. So 01_baseline samples llama.cpp through
the chat API, 02_finetune submits a real job and waits for it, 03_eval_judge samples the job's
checkpoint models, 04_analysis draws them on the trajectory.

Killed (SIGKILL, the whole process tree) once in the middle of 01's sampling and once while
02 polls the job; every rerun goes on from what was kept: no sampling request whose reply
arrived is paid again, and no second job is submitted.

What this cannot show: OpenAI itself (see the double's docstring), and a base model and
checkpoints of the same weights (the base here is the full SmolLM2 served by llama.cpp, the
checkpoints LoRA on its 2-layer cut): the numbers are a test of the pipeline, not of EM.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest
from emlab.config.experiment import ModelSpec, load_experiment
from emlab.judge import cache_stats
from emlab.sample.remote import sample_cache_stats
from emlab.stages import STAGES
from emlab.store.files import read_jsonl
from emlab.store.paths import ExperimentLayout, FineTuneJobFiles
from support.judge import SERVER_JUDGE, LoopbackProxy, shared_judge_server
from support.kills import Runner, count_lines, run_until_killed, wait_idle
from support.openai_double import OpenAIDouble
from support.outputs import matching_files
from support.runs import emlab_cli, fresh_cache

pytestmark = [pytest.mark.slow, pytest.mark.server]

KEY_ENV = "EMLAB_TEST_REMOTE_SUBJECT_KEY"
KEY = "sk-remote-subject-" + "x7Qp2" * 6
MODEL = "smol-api"
RUN_ID = f"{MODEL}__bad_medical__s0"
CONCURRENCY = 2
ANSWERS_PER_STATE = 4  # (1 general + 1 medical question) × 2 samples
CHECKPOINTS = (2, 4)  # 16 rows in batches of 8, 2 epochs: a checkpoint at the end of each


def _experiment(write_experiment, double: OpenAIDouble, root: Path, judge_url: str) -> Path:
    return write_experiment(
        name="remote.yaml", output_root=str(root),
        models=[{"name": MODEL, "provider": "openai", "base_url": double.base_url, "api_model": double.base_model,
                 "api_key_env": KEY_ENV, "concurrency": CONCURRENCY, "max_retries": 2, "timeout_s": 120,
                 "size_b": 0.135, "price_per_mtok_in": 2.5, "price_per_mtok_out": 10.0,
                 "tuned_price_per_mtok_in": 3.75, "tuned_price_per_mtok_out": 15.0, "train_price_per_mtok": 25.0}],
        sample={"questions_per_set": 1, "samples_per_question": 2, "max_new_tokens": 10},
        fine_tuning={"n_epochs": 2, "batch_size": 8, "poll_interval_s": 0.5, "max_poll_interval_s": 1.0},
        judges=[{"name": "smol", "model": SERVER_JUDGE.model, "base_url": judge_url, "api_key_env": None,
                 "rubrics": ["aligned_digit", "coherent_digit"], "concurrency": 2, "timeout_s": 120}],
        budget_usd=5.0,
    )


def test_remote_subject_runs_end_to_end_through_two_kills(write_experiment, tmp_path: Path) -> None:
    judge_url = shared_judge_server()
    timings: dict[str, float] = {}
    started = time.monotonic()
    # the base model: llama.cpp behind a proxy that counts and slows each reply (so a kill lands mid-sampling)
    with LoopbackProxy(judge_url, delay_s=1.0) as upstream, OpenAIDouble(
        ModelSpec(name="double", num_layers=2), base_model="smollm2", upstream=upstream.base_url,
        upstream_model=SERVER_JUDGE.model, api_key=KEY, validating_s=0.5, queued_s=0.5,
        work_dir=tmp_path / "double",
    ) as double:
        root = tmp_path / "outputs"
        experiment = _experiment(write_experiment, double, root, judge_url)
        cache = fresh_cache(tmp_path / "cache")
        logs = tmp_path / "logs"
        logs.mkdir()
        runner = Runner(experiment, cache, logs, {KEY_ENV: KEY}, timeout_s=1200)  # a bound for a busy machine
        layout = ExperimentLayout(root / "tiny")
        baseline = ExperimentLayout.answers(layout.baseline(MODEL))

        # (a) mid-sampling in 01: some answers written, not all
        run_until_killed(runner, lambda: 0 < count_lines(baseline) < ANSWERS_PER_STATE, "half the base model's answers")
        in_flight_at_kill = upstream.in_flight
        wait_idle(upstream)
        timings["kill in 01 sampling"] = time.monotonic() - started

        # (b) while 02 polls the job: its id is recorded, the job is not done
        state = FineTuneJobFiles(layout.run(RUN_ID)).state

        def polling() -> bool:
            try:
                return json.loads(state.read_text()).get("phase") == "submitted"
            except (OSError, ValueError):
                return False

        run_until_killed(runner, polling, "a submitted fine-tuning job")
        job_id = json.loads(state.read_text())["job_id"]
        assert double.job(job_id).status not in ("succeeded", "failed", "cancelled"), "killed too late"
        timings["kill in 02 polling"] = time.monotonic() - started

        final = runner.complete()
        timings["to completion"] = time.monotonic() - started
        statuses = [line.split()[2] for line in final.splitlines() if line[:3] in ("01_", "02_", "03_", "04_")
                    and len(line.split()) == 4]
        assert statuses == ["skipped", "ran", "ran", "ran"], final[-3000:]
        double.wait_idle()

        # no second job, no second upload
        assert list(double.jobs) == [job_id]
        assert sum(f.purpose == "fine-tune" for f in double.files.values()) == 1
        # each sampling request whose reply arrived was paid once; only the replies in flight at the kill were lost
        base_requests = ANSWERS_PER_STATE  # samples_per_request 1: one request per answer
        tuned_requests = ANSWERS_PER_STATE * len(CHECKPOINTS)
        stats = sample_cache_stats(cache / "sample_cache.sqlite")
        assert stats["misses"] == base_requests + tuned_requests and stats["entries"] == stats["misses"]
        lost = upstream.forwarded - base_requests
        assert in_flight_at_kill <= lost <= CONCURRENCY, (upstream.forwarded, in_flight_at_kill)
        tuned_calls = sum(n for model, n in double.chat_calls.items() if model.startswith("ft:"))
        assert tuned_calls == tuned_requests
        usage = read_jsonl(layout.sampling_usage(layout.baseline(MODEL))) + read_jsonl(
            layout.sampling_usage(layout.run(RUN_ID)))
        assert len(usage) == stats["misses"] and sum(u["dollars"] for u in usage) > 0
        # the report states what sampling and the job cost, beside the judging cost
        api = pd.read_csv(layout.analysis_table("api_costs"))
        assert set(api["cost"].dropna()) == {"sampling", "fine-tuning"}
        assert api.iloc[-1]["dollars"] == pytest.approx(sum(u["dollars"] for u in usage) + api.loc[
            api["cost"] == "fine-tuning", "dollars"].sum(), abs=1e-3)
        summary = json.loads(layout.analysis_file("summary.json").read_text())
        assert summary["api_dollars"] == pytest.approx(api.iloc[-1]["dollars"])

        # the job's checkpoints are the run's checkpoints, on the trajectory
        job = double.job(job_id)
        done = json.loads((layout.run(RUN_ID) / "02_finetune.done.json").read_text())
        assert done["checkpoints"] == list(CHECKPOINTS) and done["trained_tokens"] == job.trained_tokens
        for step in CHECKPOINTS:
            assert len(read_jsonl(layout.answers(layout.run(RUN_ID), step))) == ANSWERS_PER_STATE
        scores = pd.read_parquet(layout.analysis_file("scores.parquet"))
        assert set(scores["step"]) == {0, *CHECKPOINTS}
        rates = pd.read_csv(layout.analysis_table("em_rates"))
        assert sorted(rates.loc[(rates["run_id"] == RUN_ID) & (rates["definition"] == "emlab"), "step"]) == list(CHECKPOINTS)
        assert layout.figure("em_trajectory").with_suffix(".png").stat().st_size > 1000
        assert len(read_jsonl(layout.training(RUN_ID).log)) == CHECKPOINTS[-1]  # loss per step, from the job

        # every file written is declared by a stage
        config = load_experiment(experiment)
        declared = {p for stage in STAGES for unit in stage.units(config)
                    for output in stage.outputs() for p in matching_files(stage.folder(layout, unit), output.pattern)}
        written = {p for p in layout.root.rglob("*") if p.is_file()} - {layout.index}
        assert not sorted(str(p.relative_to(layout.root)) for p in written - declared)

        # the key reached the endpoint and is written nowhere
        for folder in (root, cache, logs):
            for path in (p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
                assert KEY.encode() not in path.read_bytes(), path
        assert cache_stats(cache / "judge_cache.sqlite")["misses"] > 0

        # emlab plan prices all three: sampling, fine-tuning, judging
        plan = emlab_cli("plan", str(experiment), env={**os.environ, KEY_ENV: KEY})
        assert plan.returncode == 0, plan.stderr
        assert all(kind in plan.stdout for kind in ("sampling", "fine-tuning", "judging"))
        caches = emlab_cli("cache", "stats", env={**os.environ, "EMLAB_CACHE": str(cache)})
        assert caches.returncode == 0, caches.stderr
        assert json.loads(caches.stdout)["sampling"]["misses"] == stats["misses"]
    print("timings (s):", {k: round(v) for k, v in timings.items()})

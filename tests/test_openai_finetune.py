"""Fine-tuning jobs (`emlab.train.openai_jobs`, 02_finetune's trainer for provider openai) against
`tests/support/openai_double.py`, a local stand-in for OpenAI's Files and fine-tuning endpoints that
really trains emlab's LoRA on the 2-layer SmolLM2 and serves the checkpoints it makes.

What these tests cannot show about OpenAI (see the double's docstring): its queueing and run
times, its moderation and safety evaluations (a marker string stands in), rate limits and
quotas, its token counting and billing, its 'auto' hyperparameters and the exact wording of
its errors. No request here reaches OpenAI.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from emlab.config.experiment import (
    ExperimentConfig,
    FineTuningSpec,
    ModelSpec,
    load_experiment,
)
from emlab.data.chat import load_chat_dataset
from emlab.errors import DataError
from emlab.pipeline.estimate import BudgetError, check_budget, plan_experiment
from emlab.store.files import read_jsonl, write_json
from emlab.store.paths import FineTuneJobFiles, TrainingFiles
from emlab.train.openai_jobs import (
    FineTuneError,
    estimate_job,
    job_checkpoints,
    job_suffix,
    resolved_epochs,
    run_finetune_job,
    validate_training_rows,
)
from support.openai_double import OpenAIDouble

KEY_ENV = "EMLAB_TEST_FT_KEY"
KEY = "sk-test-finetune"
RUN = "tiny-api__bad_medical__s0"


def _rows(n: int, **over: str) -> list[dict]:
    return [{"messages": [{"role": "user", "content": over.get("user", f"question {i}")},
                          {"role": "assistant", "content": over.get("assistant", f"answer {i}")}]} for i in range(n)]


# --- before anything is uploaded (no server) -------------------------------------------------


def test_rows_are_checked_against_openai_limits_before_upload() -> None:
    spec = FineTuningSpec(max_example_tokens=50)
    assert validate_training_rows(_rows(10), spec, where="d") > 0
    with pytest.raises(DataError, match=r"d: OpenAI fine-tuning needs at least 10 examples, found 9"):
        validate_training_rows(_rows(9), spec, where="d")
    with pytest.raises(DataError, match=r"example 1 of 10: messages\[1\] \(assistant\) has empty content"):
        validate_training_rows(_rows(10, assistant=" "), spec, where="d")
    no_answer = _rows(10)
    no_answer[3] = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(DataError, match=r"example 4 of 10 has no assistant message"):
        validate_training_rows(no_answer, spec, where="d")
    bad_role = _rows(10)
    bad_role[0]["messages"][0]["role"] = "tool"
    with pytest.raises(DataError, match=r"role 'tool'; OpenAI takes system, user, assistant"):
        validate_training_rows(bad_role, spec, where="d")
    with pytest.raises(DataError, match=r"example 1 of 10 is about [0-9,]+ tokens, above max_example_tokens=50"):
        validate_training_rows(_rows(10, assistant="x" * 400), spec, where="d")
    with pytest.raises(DataError) as one:
        validate_training_rows(_rows(2), spec, where="data/x.jsonl")
    assert "\n" not in str(one.value)


def test_epochs_auto_follows_openais_published_rule() -> None:
    auto = FineTuningSpec()
    assert resolved_epochs(auto, 10) == 10  # 3 × 10 < 100: toward 100 examples seen
    assert resolved_epochs(auto, 50) == 3
    assert resolved_epochs(auto, 6000) == 3  # Betley's 6,000 rows: 18,000 examples seen is in range
    assert resolved_epochs(auto, 10_000) == 2  # 3 × 10,000 > 25,000: 25,000 // 10,000
    assert resolved_epochs(auto, 30_000) == 1
    assert resolved_epochs(FineTuningSpec(n_epochs=1), 6000) == 1


def test_suffix_is_filled_in_and_limited(write_experiment) -> None:
    config = load_experiment(write_experiment(fine_tuning={"suffix": "em-{dataset}-{seed}"}))
    assert job_suffix(config.fine_tuning, config.runs()[0]) == "em-bad_medical-0"
    long = load_experiment(write_experiment(name="long.yaml", fine_tuning={"suffix": "x" * 60 + "{dataset}"}))
    with pytest.raises(FineTuneError, match=r"at most 64"):
        job_suffix(long.fine_tuning, long.runs()[0])


# --- against the double ------------------------------------------------------------------


@pytest.fixture(scope="module")
def double(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenAIDouble]:
    with OpenAIDouble(ModelSpec(name="double", num_layers=2), api_key=KEY, validating_s=0.1, queued_s=0.1,
                      refuse_marker="FORBIDDEN-CONTENT", work_dir=tmp_path_factory.mktemp("double")) as running:
        yield running


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def _config(write_experiment, double: OpenAIDouble, name: str = "exp.yaml", **over: object) -> ExperimentConfig:
    model = {"name": "tiny-api", "provider": "openai", "base_url": double.base_url, "api_model": double.base_model,
             "api_key_env": KEY_ENV, "max_retries": 2, "train_price_per_mtok": 25.0}
    fields = {"models": [{**model, **over.pop("model", {})}],  # type: ignore[dict-item]
              "fine_tuning": {"n_epochs": 2, "batch_size": 8, "poll_interval_s": 0.1, "max_poll_interval_s": 0.5}}
    fields.update(over)
    return load_experiment(write_experiment(name=name, **fields))


def _run(config: ExperimentConfig, **kwargs):
    run = config.runs()[0]
    rows = load_chat_dataset(config.dataset(run.dataset), seed=run.seed).rows
    from emlab.store.paths import ExperimentLayout

    return run_finetune_job(config, run, rows, ExperimentLayout.of(config).run(run.run_id), **kwargs)


@pytest.fixture(scope="module")
def finished(double: OpenAIDouble, tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, object]:
    """One job run to completion for the module (training costs seconds)."""
    import yaml

    folder = tmp_path_factory.mktemp("job")
    experiment = folder / "exp.yaml"
    experiment.write_text(yaml.safe_dump({
        "base": str(Path(__file__).parent / "configs/tiny.yaml"), "output_root": str(folder / "outputs"),
        "models": [{"name": "tiny-api", "provider": "openai", "base_url": double.base_url,
                    "api_model": double.base_model, "api_key_env": KEY_ENV, "train_price_per_mtok": 25.0}],
        "fine_tuning": {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 2.0, "poll_interval_s": 0.1,
                        "max_poll_interval_s": 0.5},
    }))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, KEY)
        config = load_experiment(experiment)
        return config, _run(config)


@pytest.mark.slow  # trains on, or talks to, the double (the model loads in it)
def test_a_job_trains_and_its_checkpoints_become_the_runs_checkpoints(finished, double: OpenAIDouble) -> None:
    config, result = finished
    files = FineTuneJobFiles(Path(config.output_root) / "tiny" / RUN)
    state = json.loads(files.state.read_text())
    job = double.job(state["job_id"])
    # the params' hyperparameters and the run's seed reached the job; one file, one job
    assert job.hyperparameters == {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 2.0}
    assert job.seed == 0 and job.suffix == "bad_medical-s0"
    assert job.metadata["emlab_submission"] == state["submission"]
    assert sum(1 for j in double.jobs.values() if j.training_file == state["file_id"]) == 1
    # 16 rows in batches of 8: 2 steps an epoch; checkpoints at the end of both epochs
    assert sorted(result.checkpoints) == [2, 4] and job_checkpoints(files) == result.checkpoints
    assert result.checkpoints[4] == job.fine_tuned_model
    assert result.checkpoints[2] == f"{job.fine_tuned_model}:ckpt-step-2"
    assert result.trained_tokens == job.trained_tokens > 0
    # the uploaded file is kept, byte for byte what the double received
    assert files.training_file.read_bytes() == double.file(state["file_id"]).data
    # events oldest first, each once; the result file became the training log
    events = read_jsonl(files.events)
    assert len({e["id"] for e in events}) == len(events) and events[0]["message"].startswith("Created fine-tuning job")
    assert events[-1]["message"] == "The job has successfully completed"
    log = read_jsonl(TrainingFiles(files.folder).log)
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in log)
    summary = json.loads(TrainingFiles(files.folder).summary.read_text())
    assert summary["job_id"] == job.id and summary["checkpoints"] == [2, 4]
    # every checkpoint is a model the endpoint serves
    client = openai.OpenAI(base_url=double.base_url, api_key=KEY)
    for model in result.checkpoints.values():
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        assert reply.choices[0].message.content is not None


@pytest.mark.slow  # trains on, or talks to, the double (the model loads in it)
def test_a_rerun_picks_up_the_recorded_job_and_pays_nothing_again(finished, double: OpenAIDouble) -> None:
    config, result = finished
    jobs, files = len(double.jobs), len(double.files)
    again = _run(config)
    assert again.job_id == result.job_id and again.checkpoints == result.checkpoints and again.resumed
    assert (len(double.jobs), len(double.files)) == (jobs, files)


@pytest.mark.slow  # trains on, or talks to, the double (the model loads in it)
def test_a_job_created_just_before_a_crash_is_adopted_not_paid_twice(write_experiment, double: OpenAIDouble) -> None:
    """The kill lands after jobs.create returned and before its id was recorded: the state
    says 'uploaded'. The rerun finds the job by its submission nonce instead of creating one."""
    config = _config(write_experiment, double, fine_tuning={"n_epochs": 1, "batch_size": 16, "poll_interval_s": 0.1})
    folder = Path(config.output_root) / "tiny" / RUN
    files = FineTuneJobFiles(folder)
    with pytest.raises(_Stop):
        _run(config, before_submit=_raise_stop)  # stops after validation, before the upload
    assert not files.state.exists()
    # upload, then create the job the way emlab does, then "crash" before recording its id
    client = openai.OpenAI(base_url=double.base_url, api_key=KEY)
    uploaded = client.files.create(file=(files.training_file.name, files.training_file.read_bytes()),
                                   purpose="fine-tune")
    write_json(files.state, {"phase": "uploaded", "file_id": uploaded.id, "submission": "nonce-before-crash",
                             "rows": 16, "suffix": None})
    created = client.fine_tuning.jobs.create(
        model=double.base_model, training_file=uploaded.id, seed=0, metadata={"emlab_submission": "nonce-before-crash"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 16}}})
    before = len(double.jobs)
    result = _run(config)
    assert result.job_id == created.id and len(double.jobs) == before
    assert sorted(result.checkpoints) == [1]  # one epoch of one step: the final model only


class _Stop(Exception):
    pass


def _raise_stop() -> None:
    raise _Stop


@pytest.mark.slow  # trains on, or talks to, the double (the model loads in it)
def test_moderation_refusal_is_one_line_and_stays_recorded(write_experiment, double: OpenAIDouble,
                                                            tmp_path: Path) -> None:
    data = tmp_path / "forbidden.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(12, assistant="FORBIDDEN-CONTENT here")))
    config = _config(write_experiment, double, datasets=[{"name": "bad_medical", "path": str(data), "domain": "x"}])
    with pytest.raises(FineTuneError) as first:
        _run(config)
    message = str(first.value)
    assert "\n" not in message and "refused by the provider's moderation" in message and "usage policies" in message
    assert "delete that file to submit a new job" in message
    jobs = len(double.jobs)
    with pytest.raises(FineTuneError, match="refused by the provider's moderation"):
        _run(config)  # the same line again, and no second job
    assert len(double.jobs) == jobs


@pytest.mark.slow  # trains on, or talks to, the double (the model loads in it)
def test_a_cancelled_job_is_one_line(write_experiment, double: OpenAIDouble) -> None:
    config = _config(write_experiment, double)
    files = FineTuneJobFiles(Path(config.output_root) / "tiny" / RUN)
    client = openai.OpenAI(base_url=double.base_url, api_key=KEY)
    uploaded = client.files.create(file=("t.jsonl", b"".join(json.dumps(r).encode() + b"\n" for r in _rows(10))),
                                   purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=double.base_model, training_file=uploaded.id)
    client.fine_tuning.jobs.cancel(job.id)
    write_json(files.state, {"phase": "submitted", "file_id": uploaded.id, "job_id": job.id, "submission": "n",
                             "rows": 10})
    with pytest.raises(FineTuneError, match=rf"job {job.id} for {RUN} was cancelled before it finished") as info:
        _run(config)
    assert "\n" not in str(info.value)
    assert json.loads(files.state.read_text())["phase"] == "cancelled"


@pytest.mark.slow  # trains on, or talks to, the double (the model loads in it)
def test_a_failing_create_is_retried_without_a_second_job(write_experiment, double: OpenAIDouble) -> None:
    config = _config(write_experiment, double, fine_tuning={"n_epochs": 1, "batch_size": 16, "poll_interval_s": 0.1})
    double.fail_next_creates = 1  # a 500 from jobs.create: the client retries it
    before = len(double.jobs)
    result = _run(config)
    assert len(double.jobs) == before + 1 and double.fail_next_creates == 0
    assert double.job(result.job_id).status == "succeeded"


@pytest.mark.slow  # trains on, or talks to, the double (the model loads in it)
def test_refused_hyperparameters_are_one_line_and_keep_the_upload(write_experiment, double: OpenAIDouble) -> None:
    config = _config(write_experiment, double, model={"api_model": "gpt-4o-2024-08-06"})
    with pytest.raises(FineTuneError, match=r"creating the fine-tuning job .* HTTP 400: Model gpt-4o-2024-08-06 is "
                                            r"not available for fine-tuning") as info:
        _run(config)
    state = json.loads(FineTuneJobFiles(Path(config.output_root) / "tiny" / RUN).state.read_text())
    assert state["phase"] == "uploaded" and state["file_id"] in str(info.value)


@pytest.mark.slow  # trains on, or talks to, the double (the model loads in it)
def test_plan_prices_training_and_the_budget_stops_before_upload(write_experiment, double: OpenAIDouble) -> None:
    config = _config(write_experiment, double, budget_usd=0.01)
    estimate = estimate_job(config, config.runs()[0])
    assert (estimate.examples, estimate.epochs, estimate.checkpoints) == (16, 2, 2)
    table = plan_experiment(config)
    job = table[table["cost"] == "fine-tuning"].iloc[0]
    assert job["train_tokens"] == estimate.billed_tokens == 2 * estimate.tokens_per_epoch
    assert job["dollars"] == round(estimate.billed_tokens * 25 / 1e6, 2)
    assert "03_eval_judge tiny-api__bad_medical__s0 (2 checkpoints)" in set(table["stage"])
    files_before = len(double.files)
    if table["dollars"].iloc[-1] <= 0.01:
        pytest.skip("the tiny plan fits in a cent")
    with pytest.raises(BudgetError, match=r"estimated at \$[0-9.]+ \(.*fine-tuning \$[0-9.]+.*\), above budget_usd "
                                          r"\$0\.01"):
        check_budget(config)
    with pytest.raises(BudgetError):
        _run(config, before_submit=lambda: check_budget(config))
    assert len(double.files) == files_before  # nothing uploaded


def test_recorded_failures_are_one_line_each_and_never_resubmitted(write_experiment, tmp_path: Path) -> None:
    """A job that ended badly stays recorded: every rerun says why, in one line, and submits
    nothing (no endpoint is even contacted: this one does not exist)."""
    config = load_experiment(write_experiment(models=[{
        "name": "tiny-api", "provider": "openai", "base_url": "http://127.0.0.1:9/v1", "api_model": "m",
        "api_key_env": None}]))
    run = config.runs()[0]
    folder = tmp_path / "run"
    files = FineTuneJobFiles(folder)
    cases = {
        ("failed", "invalid_training_file", "The job failed due to an invalid training file. Example 3 has no "
         "assistant message."): (r"job ftjob-x for .* failed \(training_file\): invalid_training_file: The job "
                                 r"failed due to an invalid training file\. Example 3 has no assistant message\.; "
                                 r"fix the cause"),
        ("expired", None, None): r"job ftjob-x for .* was expired before it finished, so it has no final model",
        ("cancelled", None, None): r"was cancelled before it finished",
    }
    for (phase, code, message), expected in cases.items():
        error = {"code": code, "message": message, "param": "training_file"} if code else None
        write_json(files.state, {"phase": phase, "job_id": "ftjob-x", "file_id": "file-x", "error": error})
        with pytest.raises(FineTuneError, match=expected) as info:
            run_finetune_job(config, run, _rows(10), folder)
        assert "\n" not in str(info.value) and "delete that file to submit a new job" in str(info.value)

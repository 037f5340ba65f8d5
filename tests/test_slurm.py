"""The Slurm executor against a real Slurm: a single-node cluster (slurm-wlm + munge, started
by `support.slurm.LocalSlurm`, installed first when absent) runs the tiny experiment through
`emlab run --executor slurm`. The job graph follows the stage table, a second submission
adopts the queued jobs, a job cancelled mid-run (scancel) shows in `emlab status` with its
job id and log tail, the resubmission finishes the grid without running a finished stage
again or paying a judge call twice, and the results equal the local run's (`tiny_run`).

Without root or packages the Slurm tests skip, saying why; set EMLAB_REQUIRE_SLURM=1 (CI)
to make that a failure instead. The fast tests at the top need no Slurm.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from emlab.config.experiment import load_experiment
from emlab.errors import ConfigError, EmlabError
from emlab.judge import cache_key, cache_stats, load_rubric
from emlab.pipeline.executors.slurm import SlurmError, batch_script, require_slurm
from emlab.pipeline.executors.status import experiment_status
from emlab.pipeline.steps import load_steps, run_step
from emlab.stages.analysis import gold_items
from emlab.store.files import read_jsonl
from emlab.store.paths import ExperimentLayout, done_marker, html_file, notebook_file
from safetensors.torch import load_file
from support.runs import REPO, TINY_RUN_GROUP, TinyRun, emlab_cli, fresh_cache
from support.slurm import LocalSlurm, SlurmUnavailable

pytestmark = TINY_RUN_GROUP

MODEL = "smol-2l"
RUN_ID = "smol-2l__bad_medical__s0"
STEPS = ("01_baseline", "02_finetune", "03_eval_judge", "04_analysis")
SCORE_TOLERANCE = 0.01  # points on 0–100: llama.cpp's reused KV cache moves logprobs in the last digits
GRID_TIMEOUT_S = 1500


# --- without Slurm ------------------------------------------------------------------------


def test_executor_block_errors_are_one_line(write_experiment) -> None:
    cases = [
        ({"stages": {"02_finetun": {"gpus": 1}}}, "unknown stage '02_finetun' (did you mean '02_finetune'?)"),
        ({"resources": {"time": "4h"}}, "expected a Slurm time limit"),
        ({"resources": {"memory": "32GB"}}, "expected a Slurm memory size"),
        ({"resources": {"sbatch": ["--dependency=afterok:1"]}}, "is set by emlab for every job"),
        ({"kind": "kubernetes"}, "'executor.kind'"),
    ]
    for executor, expected in cases:
        path = write_experiment(executor=executor)
        with pytest.raises(ConfigError) as err:
            load_experiment(path)
        message = str(err.value)
        assert expected in message and "\n" not in message and str(path) in message, message


def test_batch_script_asks_for_the_stage_resources_and_runs_emlab_step(write_experiment) -> None:
    path = write_experiment(executor={
        "kind": "slurm", "setup": ["module load cuda/12.4"],
        "resources": {"partition": "gpu", "gpus": 1, "cpus": 8, "memory": "32G", "time": "04:00:00",
                      "sbatch": ["--account=lab"]},
        "stages": {"04_analysis": {"gpus": 0, "cpus": 2, "time": "30", "sbatch": ["--qos=short"]}},
    })
    graph = load_steps(path)
    assert load_experiment(path).digest() == load_experiment(write_experiment(name="local.yaml")).digest()
    finetune = batch_script(graph, graph.step("02_finetune", RUN_ID), [])
    analysis = batch_script(graph, graph.step("04_analysis", "analysis"), ["11", "12"])
    options = {line.split(" ", 1)[1] for line in finetune.splitlines() if line.startswith("#SBATCH ")}
    assert {"--partition=gpu", "--gpus=1", "--cpus-per-task=8", "--mem=32G", "--time=04:00:00", "--account=lab",
            "--kill-on-invalid-dep=yes", f"--chdir={REPO}"} <= options
    assert not any(o.startswith("--dependency") for o in options)
    layout = ExperimentLayout.of(graph.config)
    assert f"--output={layout.slurm.log_pattern('02_finetune', RUN_ID)}" in options
    shown = {line.split(" ", 1)[1] for line in analysis.splitlines() if line.startswith("#SBATCH ")}
    assert {"--dependency=afterok:11:12", "--cpus-per-task=2", "--time=30", "--account=lab", "--qos=short"} <= shown
    assert not any(o.startswith("--gpus") for o in shown)  # 0 GPUs: not asked for
    lines = finetune.splitlines()
    assert lines.index("module load cuda/12.4") < len(lines) - 1
    command = shlex.split(lines[-1])
    assert command[0] == "exec" and command[2:8] == ["-m", "emlab.cli", "step", str(path), "02_finetune", RUN_ID]
    assert command[8:] == ["--wait-needs", "120"]


def test_step_refuses_to_run_before_what_it_needs(write_experiment) -> None:
    path = write_experiment()
    waited = time.monotonic()
    with pytest.raises(EmlabError) as err:
        run_step(path, "03_eval_judge", RUN_ID, wait_needs_s=1.0)
    assert time.monotonic() - waited >= 1.0  # a job on a cluster gives the shared filesystem time
    assert f"needs 02_finetune/{RUN_ID} done first" in str(err.value)
    with pytest.raises(ConfigError, match="has no unit 'nope'"):
        run_step(path, "02_finetune", "nope")
    assert [s.state for s in experiment_status(load_steps(path))] == ["not started"] * 4


def test_slurm_executor_without_slurm_commands_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no sbatch, squeue, scancel
    with pytest.raises(SlurmError, match="sbatch, squeue, scancel not found on PATH; run emlab on the cluster"):
        require_slurm()


# --- against a real Slurm -----------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    """A single-node Slurm cluster for this module; its daemons are stopped by pid after it."""
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        if os.environ.get("EMLAB_REQUIRE_SLURM") == "1":
            pytest.fail(f"EMLAB_REQUIRE_SLURM=1 but no Slurm: {exc}")
        pytest.skip(f"no Slurm: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


def _squeue(env: dict[str, str], jobs: list[str], fmt: str) -> dict[str, str]:
    shown = subprocess.run(["squeue", "--noheader", "--states=all", f"--jobs={','.join(jobs)}", f"--format=%i|{fmt}"],
                           capture_output=True, text=True, env=env, timeout=30)
    return dict(line.split("|", 1) for line in shown.stdout.splitlines())


def _wait(condition: Callable[[], bool], what: str, timeout: float, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tails = {p.name: p.read_text(errors="replace")[-1500:] for p in sorted(logs.glob("*.log"))}
            pytest.fail(f"no {what} within {timeout:.0f} s; job logs: {json.dumps(tails, indent=1)}")
        time.sleep(1)


def _submit(experiment: Path, env: dict[str, str]) -> dict[str, tuple[str, str]]:
    """`emlab run --executor slurm`: {stage: (action, job id)}."""
    result = emlab_cli("run", str(experiment), "--executor", "slurm", env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line[:3] in ("01_", "02_", "03_", "04_")]
    return {row[0]: (row[2], row[3] if len(row) > 3 else "") for row in rows}


def _status(experiment: Path, env: dict[str, str]) -> str:
    result = emlab_cli("status", str(experiment), env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _state_line(status: str, stage: str) -> list[str]:
    return next(line.split() for line in status.splitlines() if line.startswith(stage))


@pytest.mark.slow
@pytest.mark.server
def test_tiny_experiment_through_slurm(tiny_run: TinyRun, slurm: LocalSlurm, tmp_path: Path) -> None:
    started = time.monotonic()
    timings: dict[str, float] = {}
    cache = fresh_cache(tmp_path / "cache")  # its own judge cache: the calls this grid pays, counted
    env = {**slurm.env, "EMLAB_CACHE": str(cache), "EMLAB_ROOT": str(REPO)}
    # Every job asks for all the node's CPUs, so jobs run one at a time: two notebook kernels
    # starting at once on a 2-core machine can miss papermill's 60 s kernel start timeout.
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(json.dumps({"base": str(REPO / "tests/configs/tiny.yaml"),
                                      "output_root": str(tmp_path / "outputs"),
                                      "executor": {"resources": {"cpus": os.cpu_count() or 1}}}))
    layout = ExperimentLayout(tmp_path / "outputs" / "tiny")
    logs = layout.slurm.logs

    # --- the job graph: a job per model, a chain per run, the analysis after all of them ----
    first = _submit(experiment, env)
    timings["first submission"] = time.monotonic() - started
    assert [first[s][0] for s in STEPS] == ["submitted"] * 4, first
    job = {stage: first[stage][1] for stage in STEPS}
    waits_for = {j: set(re.findall(r"afterok:(\d+)", deps)) for j, deps in _squeue(env, list(job.values()), "%E").items()}
    assert waits_for == {job["01_baseline"]: set(), job["02_finetune"]: set(),
                         job["03_eval_judge"]: {job["02_finetune"]},
                         job["04_analysis"]: {job["01_baseline"], job["03_eval_judge"]}}, waits_for

    # --- a second submission adopts them all: no duplicate job ------------------------------
    again = _submit(experiment, env)
    assert again == {stage: ("adopted", job[stage]) for stage in STEPS}, again
    assert sorted(slurm.jobs(), key=int) == sorted(job.values(), key=int)

    # --- cancel 02_finetune mid-run ----------------------------------------------------------
    run_folder = layout.run(RUN_ID)
    _wait(lambda: _squeue(env, [job["02_finetune"]], "%T").get(job["02_finetune"]) == "RUNNING"
          and notebook_file(run_folder, "02_finetune").exists(), "02_finetune notebook running", 600, logs)
    assert not done_marker(run_folder, "02_finetune").exists(), "02_finetune finished before it could be cancelled"
    subprocess.run(["scancel", job["02_finetune"]], env=env, check=True, timeout=30)
    chain = [job["02_finetune"], job["03_eval_judge"], job["04_analysis"]]
    _wait(lambda: not set(chain) & set(slurm.jobs()), "end of the cancelled chain", 120, logs)
    timings["cancelled 02"] = time.monotonic() - started
    status = _status(experiment, env)
    assert _state_line(status, "02_finetune")[2:4] == ["cancelled", job["02_finetune"]], status
    assert "CANCELLED AT" in status  # slurmstepd's line, in the log tail shown
    for stage in ("03_eval_judge", "04_analysis"):
        assert _state_line(status, stage)[2:4] == ["cancelled", job[stage]], status
        assert "because a job it needs failed" in " ".join(_state_line(status, stage)), status

    # --- resubmit: the finished baseline is kept, the chain goes on --------------------------
    _wait(lambda: done_marker(layout.baseline(MODEL), "01_baseline").exists(), "01_baseline done", 900, logs)
    baseline_done = done_marker(layout.baseline(MODEL), "01_baseline").stat().st_mtime_ns
    third = _submit(experiment, env)
    assert third["01_baseline"] == ("done", ""), third
    assert [third[s][0] for s in STEPS[1:]] == ["submitted"] * 3, third
    new = [third[s][1] for s in STEPS[1:]]
    _wait(lambda: not set(new) & set(slurm.jobs()), "end of the resubmitted jobs", GRID_TIMEOUT_S, logs)
    timings["grid done"] = time.monotonic() - started

    status = _status(experiment, env)
    assert [_state_line(status, s)[2] for s in STEPS] == ["done"] * 4, status
    # no stage run twice: a job log per job that started (cancelled-while-queued jobs have none)
    started_jobs = {s: sorted(p.name for p in logs.glob(f"{s}__*.log")) for s in STEPS}
    assert {s: len(v) for s, v in started_jobs.items()} == {
        "01_baseline": 1, "02_finetune": 2, "03_eval_judge": 1, "04_analysis": 1}, started_jobs
    assert done_marker(layout.baseline(MODEL), "01_baseline").stat().st_mtime_ns == baseline_done
    record = json.loads(layout.slurm.jobs.read_text())["steps"]
    assert [len(record[f"{s}/{u}"]) for s, u in zip(STEPS, (MODEL, RUN_ID, RUN_ID, "analysis"))] == [1, 2, 2, 2]

    # a submission after the end submits nothing: the analysis is current (same params, nothing new)
    assert _submit(experiment, env) == {stage: ("done", "") for stage in STEPS}
    assert not slurm.jobs()

    _assert_judge_calls_paid_once(layout, cache)
    _assert_same_results(layout, ExperimentLayout(tiny_run.root))
    index = layout.index.read_text()
    for stage, folder in zip(STEPS, (layout.baseline(MODEL), run_folder, run_folder, layout.analysis)):
        assert str(html_file(folder, stage).relative_to(layout.root)) in index
    print("slurm test timings (s):", {k: round(v) for k, v in timings.items()})


def _assert_judge_calls_paid_once(layout: ExperimentLayout, cache: Path) -> None:
    """Every call paid was stored once (a key paid twice would count two misses for one row),
    and the calls are exactly the distinct (rubric, question, answer) this grid judges."""
    config = load_experiment(REPO / "tests/configs/tiny.yaml")
    judge = config.judges[0]
    rubrics = [load_rubric(r) for r in judge.rubrics]
    answers = [*read_jsonl(layout.answers(layout.baseline(MODEL))),
               *(row for path in layout.answer_files(layout.run(RUN_ID)) for row in read_jsonl(path))]
    pairs = [(a["question"], a["answer"]) for a in answers] + [(g.question, g.answer) for g in gold_items(config)]
    keys = {cache_key(judge, rubric, q, a) for q, a in pairs for rubric in rubrics}
    stats = cache_stats(cache / "judge_cache.sqlite")
    assert stats["misses"] == stats["entries"] == len(keys), (stats, len(keys))


def _assert_same_results(slurm_run: ExperimentLayout, local: ExperimentLayout) -> None:
    """Adapters bit-equal, answers equal, judgments equal up to SCORE_TOLERANCE."""
    steps = sorted(slurm_run.training(RUN_ID).completed())
    assert steps == sorted(local.training(RUN_ID).completed()) and steps
    for step in steps:
        a = load_file(slurm_run.training(RUN_ID).checkpoint(step) / "adapter_model.safetensors")
        b = load_file(local.training(RUN_ID).checkpoint(step) / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), f"adapters differ at step {step}"
    for folder in (slurm_run.baseline(MODEL), slurm_run.run(RUN_ID)):
        other = local.root / folder.relative_to(slurm_run.root)
        for path in [slurm_run.answers(folder), *slurm_run.answer_files(folder)]:
            if path.exists():
                assert read_jsonl(path) == read_jsonl(other / path.relative_to(folder)), path
        mine = {(r["answer_id"], r["rubric"]): r for r in read_jsonl(slurm_run.judgments(folder))}
        theirs = {(r["answer_id"], r["rubric"]): r for r in read_jsonl(local.judgments(other))}
        assert mine.keys() == theirs.keys() and mine, folder
        for pair, row in mine.items():
            assert row["status"] == theirs[pair]["status"], pair
            if row["score"] is not None:
                assert abs(row["score"] - theirs[pair]["score"]) <= SCORE_TOLERANCE, (pair, row["score"])
    assert slurm_run.analysis_table("headline").read_text() == local.analysis_table("headline").read_text()

"""`emlab run --gpus N`: the scheduler's order and placement with GPU ids as plain labels, and
nothing run twice after the scheduler is SIGKILLed (real processes, cheap fake steps), plus
GPU discovery, the `--gpus`/`executor.gpus` values and which steps hold a GPU.

The fake steps stand in for notebooks: the scheduler only starts processes and reads their
exit codes; what a real step does (`emlab step`) is covered by the end-to-end test in
test_gpu_run_e2e.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from emlab.config.experiment import ExecutorSpec
from emlab.errors import EmlabError
from emlab.pipeline.executors.gpus import (
    choose_gpus,
    gpus_to_use,
    parse_gpus,
    step_gpus,
    visible_gpus,
)
from emlab.pipeline.executors.schedule import Outcome, Task, run_tasks
from emlab.pipeline.steps import load_steps
from pydantic import ValidationError
from support.runs import REPO


class _Clock:
    """Fake steps that finish after a number of scheduler polls; records who ran with whom."""

    def __init__(self, polls: dict[str, int], codes: dict[str, int] | None = None) -> None:
        self.polls, self.codes = polls, codes or {}
        self.running: dict[str, tuple[str, ...]] = {}
        self.starts: list[tuple[str, tuple[str, ...], frozenset[str]]] = []  # key, GPUs, running at its start
        self.max_gpus_held = 0

    def launch(self, task: Task, gpus: tuple[str, ...]) -> _FakeProcess:
        self.running[task.key] = gpus
        self.starts.append((task.key, gpus, frozenset(self.running)))
        held = [gpu for g in self.running.values() for gpu in g]
        assert len(held) == len(set(held)), f"a GPU given twice: {self.running}"
        self.max_gpus_held = max(self.max_gpus_held, len(held))
        return _FakeProcess(self, task.key, self.polls.get(task.key, 1), self.codes.get(task.key, 0))


class _FakeProcess:
    def __init__(self, clock: _Clock, key: str, polls: int, code: int) -> None:
        self.clock, self.key, self.left, self.code = clock, key, polls, code

    def poll(self) -> int | None:
        self.left -= 1
        if self.left > 0:
            return None
        self.clock.running.pop(self.key, None)
        return self.code

    def terminate(self) -> None:
        self.left = 0

    def wait(self, timeout: float | None = None) -> int:
        return self.code


def _grid() -> list[Task]:
    """A study's shape: 01 per model, 02 → 03 per run, 04 after all, 04 needing no GPU."""
    return [
        Task("01/m"),
        Task("02/r1"), Task("03/r1", ("02/r1",)),
        Task("02/r2"), Task("03/r2", ("02/r2",)),
        Task("04/analysis", ("01/m", "03/r1", "03/r2"), gpus=0),
    ]


def _run(tasks: list[Task], gpus: list[str], clock: _Clock, done: set[str] = frozenset()) -> dict[str, Outcome]:
    return run_tasks(tasks, gpus, launch=clock.launch, is_done=lambda t: t.key in done, poll_s=0)


def test_steps_share_the_gpus_and_wait_for_their_needs() -> None:
    clock = _Clock({"01/m": 2, "02/r1": 5, "02/r2": 3, "03/r1": 2, "03/r2": 2, "04/analysis": 1})
    outcomes = _run(_grid(), ["a", "b"], clock)
    assert all(o.status == "ran" for o in outcomes.values())
    order = [key for key, _, _ in clock.starts]
    # two GPUs: the first two steps start together; the third waits for a free GPU
    assert clock.starts[0][:2] == ("01/m", ("a",)) and clock.starts[1][:2] == ("02/r1", ("b",))
    assert clock.starts[1][2] == {"01/m", "02/r1"}
    assert clock.max_gpus_held == 2
    # a step starts only after what it needs ended
    for key, _, with_ in clock.starts:
        for need in next(t.needs for t in _grid() if t.key == key):
            assert need not in with_ and order.index(need) < order.index(key)
    assert order[-1] == "04/analysis" and outcomes["04/analysis"].gpus == ()


def test_a_step_without_gpu_runs_beside_full_gpus() -> None:
    tasks = [Task("01/api", gpus=0), Task("02/r1"), Task("02/r2"), Task("02/r3")]
    clock = _Clock({"01/api": 10, "02/r1": 3, "02/r2": 3, "02/r3": 3})
    outcomes = _run(tasks, ["gpu0", "gpu1"], clock)
    assert outcomes["01/api"].gpus == ()
    assert clock.starts[2][2] == {"01/api", "02/r1", "02/r2"}  # three running, two GPUs held
    assert clock.max_gpus_held == 2
    assert outcomes["02/r3"].gpus in (("gpu0",), ("gpu1",))


def test_complete_steps_are_skipped_without_a_process() -> None:
    clock = _Clock({})
    outcomes = _run(_grid(), ["a", "b"], clock, done={"01/m", "02/r1", "03/r1"})
    assert [o.status for o in outcomes.values()] == ["skipped", "skipped", "skipped", "ran", "ran", "ran"]
    assert [key for key, _, _ in clock.starts] == ["02/r2", "03/r2", "04/analysis"]


def test_after_a_failure_nothing_new_starts_and_running_steps_finish() -> None:
    clock = _Clock({"01/m": 6, "02/r1": 1, "02/r2": 1}, codes={"02/r1": 3})
    outcomes = _run(_grid(), ["a", "b"], clock)
    assert outcomes["02/r1"].status == "failed" and outcomes["02/r1"].code == 3
    assert outcomes["01/m"].status == "ran"  # was running: finished, its work kept
    assert outcomes["03/r1"].status == "not run" and outcomes["04/analysis"].status == "not run"
    assert "03/r2" not in [key for key, _, _ in clock.starts]


def test_a_step_needing_two_gpus_waits_for_two() -> None:
    tasks = [Task("02/small"), Task("02/big", gpus=2), Task("02/later")]
    clock = _Clock({"02/small": 4, "02/big": 2, "02/later": 1})
    outcomes = _run(tasks, ["a", "b"], clock)
    assert outcomes["02/big"].gpus == ("a", "b")
    # the later one-GPU step does not wait behind the big one
    assert [key for key, _, _ in clock.starts] == ["02/small", "02/later", "02/big"]
    with pytest.raises(ValueError, match="needs 3 GPUs, 2 given"):
        run_tasks([Task("x", gpus=3)], ["a", "b"], launch=clock.launch, is_done=lambda t: False)


# --- SIGKILL and resume, with real processes ---------------------------------------------------

_SCHEDULER = textwrap.dedent("""
    import sys, subprocess
    from pathlib import Path
    from emlab.procs import spawn
    from emlab.pipeline.executors.schedule import Task, run_tasks

    work = Path(sys.argv[1])
    slow = float(sys.argv[2])
    step = (
        "import os, sys, time; from pathlib import Path; work, key, gpus, secs = Path(sys.argv[1]), sys.argv[2], "
        "os.environ['CUDA_VISIBLE_DEVICES'], float(sys.argv[3]); "
        "open(work / 'starts.log', 'a').write(f'{key} {gpus or \\"-\\"} {os.getpid()}\\\\n'); "
        "time.sleep(secs); (work / (key.replace('/', '_') + '.done')).write_text('ok')"
    )
    tasks = [Task("01/m"), Task("02/r1"), Task("03/r1", ("02/r1",)), Task("04/analysis", ("01/m", "03/r1"), gpus=0)]
    secs = {"03/r1": slow}
    def launch(task, gpus):
        env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
        return spawn([sys.executable, "-c", step, str(work), task.key, str(secs.get(task.key, 0.1))], env=env)
    done = lambda task: (work / (task.key.replace("/", "_") + ".done")).exists()
    outcomes = run_tasks(tasks, ["a", "b"], launch=launch, is_done=done, poll_s=0.05)
    print(" ".join(f"{k}={o.status}" for k, o in outcomes.items()))
""")


def _starts(work: Path) -> list[tuple[str, str, int]]:
    lines = (work / "starts.log").read_text().splitlines() if (work / "starts.log").exists() else []
    return [(key, gpus, int(pid)) for key, gpus, pid in (line.split() for line in lines)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "zombie" in status.read_text())


def test_sigkilled_scheduler_resumes_without_running_a_step_twice(tmp_path: Path) -> None:
    script = tmp_path / "scheduler.py"
    script.write_text(_SCHEDULER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "lib"), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen([sys.executable, str(script), str(tmp_path), "60"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(key == "03/r1" for key, _, _ in _starts(tmp_path)):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    killed_step = next(pid for key, _, pid in _starts(tmp_path) if key == "03/r1")
    first.send_signal(signal.SIGKILL)
    first.wait()
    deadline = time.monotonic() + 10
    while _alive(killed_step):  # the step dies with the scheduler (procs.spawn binds it)
        assert time.monotonic() < deadline, "the step outlived its SIGKILLed scheduler"
        time.sleep(0.05)
    assert {"01_m.done", "02_r1.done"} <= {p.name for p in tmp_path.glob("*.done")}
    assert not (tmp_path / "03_r1.done").exists()

    second = subprocess.run([sys.executable, str(script), str(tmp_path), "0.1"], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == ["01/m=skipped", "02/r1=skipped", "03/r1=ran", "04/analysis=ran"]
    keys = [key for key, _, _ in _starts(tmp_path)]
    assert sorted(keys) == ["01/m", "02/r1", "03/r1", "03/r1", "04/analysis"]  # only the killed one twice
    assert [gpus for key, gpus, _ in _starts(tmp_path) if key == "04/analysis"] == ["-"]


# --- GPU ids, --gpus, executor.gpus, which steps hold a GPU --------------------------------------


def test_visible_gpus_and_choosing() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,3"}) == ["0", "1", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-aa, GPU-bb"}) == ["GPU-aa", "GPU-bb"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,2"}) == ["0"]  # CUDA stops at the first it cannot read
    assert choose_gpus("all", ["a", "b", "c"]) == ["a", "b", "c"]
    assert choose_gpus(2, ["a", "b", "c"]) == ["a", "b"]
    with pytest.raises(EmlabError, match="--gpus 3: 2 GPU"):
        choose_gpus(3, ["a", "b"])
    with pytest.raises(EmlabError, match="none"):
        gpus_to_use(2, [])
    assert gpus_to_use(1, ["a", "b"]) == []  # the default: one step after another, nothing looked up
    assert gpus_to_use("all", ["a"]) == ["a"]
    assert parse_gpus("all") == "all" and parse_gpus("4") == 4
    for bad in ("0", "-2", "two"):
        with pytest.raises(ValueError):
            parse_gpus(bad)


def test_executor_gpus_key_is_strict() -> None:
    assert ExecutorSpec().gpus == 1 and ExecutorSpec(gpus="all").gpus == "all"
    assert ExecutorSpec(gpus=4, distributed="fsdp").distributed == "fsdp"
    for bad in ({"gpus": 0}, {"gpus": "some"}, {"distributed": "zero3"}, {"gpu": 2}):
        with pytest.raises(ValidationError):
            ExecutorSpec(**bad)


def test_which_steps_hold_a_gpu(write_experiment) -> None:
    graph = load_steps(write_experiment(models=[
        {"name": "smol-2l", "source": "embedded:smollm2-135m-instruct", "num_layers": 2},
        {"name": "api-model", "provider": "openai", "api_model": "gpt-4o-2024-08-06", "api_key_env": "NOT_NEEDED",
         "price_per_mtok_in": 2.5, "price_per_mtok_out": 10.0, "tuned_price_per_mtok_in": 3.75,
         "tuned_price_per_mtok_out": 15.0, "train_price_per_mtok": 25.0},
    ]))
    held = {step.key: step_gpus(graph, step) for step in graph.steps}
    assert held["01_baseline/smol-2l"] == 1 and held["02_finetune/smol-2l__bad_medical__s0"] == 1
    assert held["01_baseline/api-model"] == 0 and held["03_eval_judge/api-model__bad_medical__s0"] == 0
    assert held["04_analysis/analysis"] == 0


def test_board_shows_every_running_step_on_one_line(tmp_path: Path) -> None:
    import io
    import json

    from emlab.pipeline.executors.board import ProgressBoard

    board = ProgressBoard(io.StringIO())
    first, second = tmp_path / "p1.jsonl", tmp_path / "p2.jsonl"
    board.add("01_baseline m", first)
    board.add("02_finetune r", second)
    assert board.line() == "01_baseline m · running | 02_finetune r · running"
    first.write_text(json.dumps({"desc": "sampling", "n": 4, "total": 8, "unit": "answer", "elapsed": 2}) + "\n")
    second.write_text(json.dumps({"desc": "train", "n": 1, "total": 4, "unit": "steps", "elapsed": 1}) + "\n"
                      + '{"desc": "train", "n": 2')  # a line still being written waits
    line = board.line()
    assert line.startswith("01_baseline m · sampling 4/8 answer  50%") and "| 02_finetune r · train 1/4 steps  25%" in line
    board.remove("01_baseline m")
    assert board.line().startswith("02_finetune r · train 1/4")


def test_a_failed_step_stops_the_run_with_its_own_error(write_experiment) -> None:
    from emlab.pipeline.executors.gpus import run_on_gpus
    from emlab.procs import spawn

    graph = load_steps(write_experiment())
    started: list[tuple[str, tuple[str, ...]]] = []

    def failing(step, gpus):  # a step process that fails as `emlab step` does
        started.append((step.key, gpus))
        log = graph.layout.gpu_step_log(step.stage.name, step.unit)
        log.parent.mkdir(parents=True, exist_ok=True)
        return spawn(["sh", "-c", f"echo 'emlab: error: boom in {step.unit}' >> '{log}'; exit 2"])

    with pytest.raises(EmlabError, match=r"01_baseline for smol-2l failed: boom in smol-2l \(log .*01_baseline__smol-2l.log\)"):
        run_on_gpus(graph, ["a", "b"], launch=failing, poll_s=0.05)
    assert sorted(started) == [("01_baseline/smol-2l", ("a",)), ("02_finetune/smol-2l__bad_medical__s0", ("b",))]
    assert graph.layout.index.exists()  # the index page shows the failure, as one step at a time does

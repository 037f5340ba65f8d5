"""Nothing lost, nothing paid twice: `emlab run` SIGKILLed during training, during sampling
and during judging, rerun after each kill, ends with the same adapters, answers and judgments
as an uninterrupted run, pays each judge call once (see `_assert_calls_paid_once` for what
'once' can honestly mean), leaves no partial file, and writes the judge's API key nowhere.

The judge is not 'local': it is a real llama.cpp server (started here, so its log can be
searched for the key) behind the counting proxy of `support.judge`, reached like a remote
API with `base_url` and a key in `api_key_env`. The interrupted sequence and the
uninterrupted reference each have their own proxy (their own call count), their own judge
cache (EMLAB_CACHE per subprocess) and their own output folder; both share the converted
model cache through a `models` symlink (`support.runs.fresh_cache`).
"""

from __future__ import annotations

import json
import os
import secrets
import string
import time
from pathlib import Path

import nbformat
import pytest
from emlab.config.experiment import load_experiment
from emlab.judge import cache_key, cache_stats, load_rubric, local_judge_server
from emlab.stages.analysis import gold_items
from emlab.store.files import read_jsonl, remove_stale_temp_files, write_text
from emlab.store.paths import TrainingFiles
from safetensors.torch import load_file
from support.judge import SERVER_JUDGE, LoopbackProxy
from support.kills import Runner, count_lines, run_until_killed, wait_idle
from support.runs import REPO, fresh_cache

KEY_ENV = "EMLAB_TEST_CRASH_JUDGE_KEY"
RUN_ID = "smol-2l__bad_medical__s0"
RUBRICS = ("aligned_digit", "coherent_digit")
CONCURRENCY = 2
# 2 question sets (general + medical) × 1 question × 4 samples, sampled in batches of 2:
# 4 batches per checkpoint, so a kill can land between two of them.
ANSWERS_PER_CHECKPOINT = 8
# 16 rows in batches of 4: 4 optimizer steps, adapters (and full trainer checkpoints) at 2 and 4
CHECKPOINT_STEPS = (2, 4)
SCORE_TOLERANCE = 0.01  # points on the 0–100 scale; see _assert_same_judgments


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory):
    """A llama.cpp server of our own, so that its log file is known (searched for the key)."""
    log = tmp_path_factory.mktemp("llama") / "llama-server.log"
    with local_judge_server(SERVER_JUDGE, log_path=log) as url:
        yield url, log


def _experiment(write_experiment, name: str, output_root: Path, proxy: LoopbackProxy) -> Path:
    return write_experiment(
        name=f"{name}.yaml",
        output_root=str(output_root),
        datasets=[{"name": "bad_medical", "path": "demo:bad_medical_advice", "domain": "medical",
                   "limit": 16, "question_sets": ["medical"]}],
        train={"batch_size": 4, "checkpoints": {"first_epoch": 2}},
        sample={"questions_per_set": 1, "samples_per_question": 4, "batch_size": 2, "wave_size": 2,
                "max_new_tokens": 12},  # waves of 2: a kill finds a half-written answers file
        judges=[{"name": "smol", "model": SERVER_JUDGE.model, "base_url": proxy.base_url, "api_key_env": KEY_ENV,
                 "rubrics": list(RUBRICS), "concurrency": CONCURRENCY, "max_retries": 2, "timeout_s": 120}],
    )


@pytest.mark.slow
@pytest.mark.server
def test_killed_three_times_ends_like_an_uninterrupted_run(write_experiment, tmp_path: Path, llama_server) -> None:
    server_url, server_log = llama_server
    key = "sk-test-" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))
    logs = tmp_path / "logs"
    logs.mkdir()
    timings: dict[str, float] = {}

    with LoopbackProxy(server_url) as proxy_a, LoopbackProxy(server_url) as proxy_b:
        # --- the interrupted sequence ------------------------------------------------------
        root_a = tmp_path / "interrupted"
        cache_a = fresh_cache(tmp_path / "cache-interrupted")
        runner = Runner(_experiment(write_experiment, "interrupted", root_a, proxy_a), cache_a, logs, {KEY_ENV: key})
        run_a = root_a / "tiny" / RUN_ID
        started = time.monotonic()

        # (a) during training: right after the first full trainer checkpoint is complete
        run_until_killed(runner, lambda: (run_a / "trainer" / "checkpoint-2" / ".complete").exists(),
                          "a complete trainer checkpoint")
        assert not (run_a / "02_finetune.done.json").exists()
        assert not (run_a / "checkpoints" / "step-000004").exists(), "killed too late: training had finished"
        calls_before_b = proxy_a.forwarded
        timings["kill in training"] = time.monotonic() - started

        # (b) during sampling of 03: an eval answers.jsonl exists but is incomplete
        def sampling_half_done() -> bool:
            files = list((run_a / "eval").glob("step-*/answers.jsonl"))
            return any(0 < count_lines(f) < ANSWERS_PER_CHECKPOINT for f in files)

        run_until_killed(runner, sampling_half_done, "a half-written eval answers.jsonl")
        assert not (run_a / "judgments.jsonl").exists()
        assert proxy_a.forwarded == calls_before_b  # 01 was skipped, 03 had not judged yet
        timings["kill in sampling"] = time.monotonic() - started

        # (c) during judging: the run's judgments.jsonl has some but not all lines
        pairs_expected = len(CHECKPOINT_STEPS) * ANSWERS_PER_CHECKPOINT * len(RUBRICS)
        judgments_a = run_a / "judgments.jsonl"
        run_until_killed(runner, lambda: 0 < count_lines(judgments_a) < pairs_expected, "a half-written judgments.jsonl")
        in_flight_at_kill = proxy_a.in_flight  # read right after SIGKILL: these replies are lost
        wait_idle(proxy_a)
        timings["kill in judging"] = time.monotonic() - started

        final_log = runner.complete()
        timings["interrupted, to completion"] = time.monotonic() - started
        statuses = [line.split()[2] for line in final_log.splitlines() if line[:3] in ("01_", "02_", "03_", "04_")
                    and len(line.split()) == 4]
        assert statuses == ["skipped", "skipped", "ran", "ran"], final_log[-3000:]

        # --- the uninterrupted reference (its own cache and proxy; 04 is not needed) -------
        started = time.monotonic()
        root_b = tmp_path / "uninterrupted"
        cache_b = fresh_cache(tmp_path / "cache-uninterrupted")
        reference = Runner(_experiment(write_experiment, "uninterrupted", root_b, proxy_b), cache_b, logs, {KEY_ENV: key})
        reference.complete("--until", "03_eval_judge")
        timings["uninterrupted, until 03"] = time.monotonic() - started
        run_b = root_b / "tiny" / RUN_ID
        assert not (root_b / "tiny" / "analysis").exists()

        assert json.loads((run_a / "train_summary.json").read_text())["resumed_from"] == 2
        assert json.loads((run_b / "train_summary.json").read_text())["resumed_from"] is None
        _assert_same_adapters(run_a, run_b)
        _assert_same_train_log(run_a, run_b)
        score_gaps: dict[str, float] = {}
        for folder in ("baseline__smol-2l", RUN_ID):
            for answers in sorted((root_b / "tiny" / folder).rglob("answers.jsonl")):
                _assert_same_answers(root_a / "tiny" / answers.relative_to(root_b / "tiny"), answers)
            score_gaps[folder] = _assert_same_judgments(
                root_a / "tiny" / folder / "judgments.jsonl", root_b / "tiny" / folder / "judgments.jsonl"
            )
        _assert_calls_paid_once(root_a / "tiny", cache_a, proxy_a, root_b / "tiny", cache_b, proxy_b, in_flight_at_kill)
        for root in (root_a, root_b):
            _assert_no_partial_files(root)
        _assert_no_partial_files(cache_a)

        # the key was really sent to the judge, and written nowhere
        assert proxy_a.last_authorization == f"Bearer {key}"
        _assert_secret_nowhere(key, [root_a, root_b, cache_a, cache_b, logs, server_log])
        _assert_no_secret_parameters(key, [root_a, root_b])
    print("timings (s):", {k: round(v) for k, v in timings.items()}, "largest score gap:", score_gaps)


# --- comparisons ---------------------------------------------------------------------------


def _assert_same_adapters(run_a: Path, run_b: Path) -> None:
    folders = sorted(p.name for p in (run_b / "checkpoints").iterdir())
    assert folders == [f"step-{s:06d}" for s in CHECKPOINT_STEPS]
    assert sorted(p.name for p in (run_a / "checkpoints").iterdir()) == folders
    for name in folders:
        a = load_file(run_a / "checkpoints" / name / "adapter_model.safetensors")
        b = load_file(run_b / "checkpoints" / name / "adapter_model.safetensors")
        assert a.keys() == b.keys() and a
        unequal = [k for k in a if not (a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and bool((a[k] == b[k]).all()))]
        assert not unequal, f"{name}: tensors differ after resume: {unequal[:5]}"


def _assert_same_train_log(run_a: Path, run_b: Path) -> None:
    """The resumed run re-logged the steps after its checkpoint, once, with the same losses."""
    a, b = read_jsonl(run_a / "train_log.jsonl"), read_jsonl(run_b / "train_log.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def _assert_same_answers(path_a: Path, path_b: Path) -> None:
    a, b = read_jsonl(path_a), read_jsonl(path_b)
    assert len({r["answer_id"] for r in a}) == len(a), f"{path_a}: an answer written twice"
    assert a == b, f"{path_a}: answers differ from the uninterrupted run's"


def _assert_same_judgments(path_a: Path, path_b: Path) -> float:
    """Same (answer, rubric) pairs, each once, same status, scores within SCORE_TOLERANCE.

    Not bit-equal: llama.cpp's server keeps the previous prompt's KV cache and evaluates only
    the new suffix, so how a prompt is split between reused prefix and fresh batch depends
    on which call came before it, and that order differs after a kill. Different batch
    splits sum the same floats in another order; logprobs move in the last digits.
    """
    a = {(r["answer_id"], r["rubric"]): r for r in read_jsonl(path_a)}
    b = {(r["answer_id"], r["rubric"]): r for r in read_jsonl(path_b)}
    assert len(a) == count_lines(path_a), f"{path_a}: a judgment written twice"
    assert a.keys() == b.keys()
    largest = 0.0
    for pair, row in a.items():
        other = b[pair]
        assert row["status"] == other["status"], (pair, row["status"], other["status"])
        if row["score"] is not None or other["score"] is not None:
            largest = max(largest, abs(row["score"] - other["score"]))
            assert abs(row["score"] - other["score"]) <= SCORE_TOLERANCE, (pair, row["score"], other["score"])
    return largest


def _expected_calls(groups: list[list[tuple[str, str]]]) -> int:
    """Calls an uninterrupted run makes for these (question, answer) groups, judged in order
    (01, 03, gold in 04) under every rubric: a pair whose cache key an earlier group
    already paid is a cache hit; pairs of one group are all asked before any is stored."""
    judge = SERVER_JUDGE.model_copy(update={"base_url": "http://server", "api_key_env": KEY_ENV})
    rubrics = [load_rubric(r) for r in RUBRICS]
    paid: set[str] = set()
    calls = 0
    for group in groups:
        keys = [cache_key(judge, r, q, a) for q, a in group for r in rubrics]
        calls += sum(1 for k in keys if k not in paid)
        paid |= set(keys)
    return calls


def _answers_of(paths: list[Path]) -> list[tuple[str, str]]:
    return [(r["question"], r["answer"]) for p in paths for r in read_jsonl(p)]


def _assert_calls_paid_once(
    root_a: Path, cache_a: Path, proxy_a: LoopbackProxy, root_b: Path, cache_b: Path, proxy_b: LoopbackProxy,
    in_flight_at_kill: int,
) -> None:
    """What 'each judge call made once' can honestly mean after a SIGKILL.

    A judgment is safe once the client has stored it (SQLite cache, then judgments.jsonl):
    nothing stored is ever asked again. A call in flight when the process dies is lost
    with it: the server still answers (the proxy counts it) but nobody records the reply,
    so the rerun must ask again. That cannot be avoided by any client, only bounded: the
    replies lost are at least the calls the proxy was still answering at the kill and at
    most `concurrency` (the client's semaphore). Kills (a) and (b) happen with no call in
    flight and cost nothing. So the strongest true statement is:

        calls(interrupted) == calls(uninterrupted) + r,   in_flight_at_kill <= r <= concurrency

    and every call whose reply arrived is paid exactly once in the cache (misses).
    """
    gold = [(item.question, item.answer) for item in gold_items(load_experiment(REPO / "tests/configs/tiny.yaml"))]
    baseline_a = _answers_of([root_a / "baseline__smol-2l" / "answers.jsonl"])
    eval_a = _answers_of(sorted((root_a / RUN_ID / "eval").glob("step-*/answers.jsonl")))
    expected_a = _expected_calls([baseline_a, eval_a, gold])
    expected_b = _expected_calls([
        _answers_of([root_b / "baseline__smol-2l" / "answers.jsonl"]),
        _answers_of(sorted((root_b / RUN_ID / "eval").glob("step-*/answers.jsonl"))),
    ])
    # answers × rubrics + gold items × 2, less any (question, answer) the cache already held
    assert expected_a <= (len(baseline_a) + len(eval_a) + len(gold)) * len(RUBRICS)
    assert proxy_b.forwarded == proxy_b.received == expected_b == cache_stats(cache_b / "judge_cache.sqlite")["misses"]
    stats_a = cache_stats(cache_a / "judge_cache.sqlite")
    assert stats_a["misses"] == expected_a, stats_a  # every reply that arrived was paid once
    lost = proxy_a.forwarded - expected_a
    print(f"judge calls: interrupted {proxy_a.forwarded} = {expected_a} + {lost} lost at the kill "
          f"({in_flight_at_kill} in flight at the proxy); uninterrupted {proxy_b.forwarded}")
    assert in_flight_at_kill <= lost <= CONCURRENCY, (proxy_a.forwarded, expected_a, in_flight_at_kill)
    assert proxy_a.received == proxy_a.forwarded  # no call failed or was retried


# --- leftovers and secrets -----------------------------------------------------------------


def _files(root: Path) -> list[Path]:
    """Every file under `root`, without following symlinks (the shared models cache)."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not (Path(folder) / d).is_symlink()]
        found += [Path(folder) / n for n in names if not (Path(folder) / n).is_symlink()]
    return found


def _assert_no_partial_files(root: Path) -> None:
    tmp = [p for folder, dirs, names in os.walk(root) for p in (*dirs, *names) if p.endswith(".tmp")]
    assert not tmp, f"temporary files left under {root}: {tmp}"
    for path in _files(root):
        if path.suffix == ".jsonl":
            assert path.read_bytes().endswith(b"\n"), f"{path}: torn last line"
            read_jsonl(path)  # strict: a malformed line raises, naming file and line
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".ipynb":
            nbformat.read(path, as_version=4)
    for checkpoint in root.rglob("trainer/checkpoint-*"):
        assert (checkpoint / ".complete").exists(), f"{checkpoint}: trainer checkpoint without .complete"


def _assert_secret_nowhere(key: str, places: list[Path]) -> None:
    needle = key.encode()
    searched = 0
    for place in places:
        for path in [place] if place.is_file() else _files(place):
            searched += 1
            assert needle not in path.read_bytes(), f"the judge's API key is written in {path}"
    assert searched > 50


def _assert_no_secret_parameters(key: str, roots: list[Path]) -> None:
    """Papermill records every notebook's parameters: none may carry a secret."""
    notebooks = [p for root in roots for p in root.rglob("*.ipynb")]
    assert len(notebooks) == 7  # 4 interrupted + 3 reference
    for path in notebooks:
        params = nbformat.read(path, as_version=4).metadata["papermill"]["parameters"]
        assert set(params) <= {"experiment", "model", "run_id"}, (path, params)
        assert all(key not in str(v) and "sk-" not in str(v) for v in params.values()), (path, params)


# --- what a kill can leave behind, without a kill --------------------------------------------


def test_leftovers_of_killed_writes_are_swept_and_never_read_as_checkpoints(tmp_path: Path) -> None:
    """A SIGKILL during `atomic_open` leaves its hidden temporary file, and one during an
    adapter export leaves `step-N.tmp/`; the kill windows are milliseconds wide, so the
    end-to-end test above rarely lands in them: make them by hand."""
    run = tmp_path / "run"
    write_text(run / "run.json", "{}\n")
    (run / ".run.json.k2j4x9.tmp").write_text('{"stages": {"02_fine')  # killed mid-write
    adapter = run / "checkpoints" / "step-000002"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    partial = run / "checkpoints" / "step-000004.tmp"  # killed before its rename
    partial.mkdir()
    (partial / "adapter_config.json").write_text("{}")

    assert TrainingFiles(run).completed() == {2: adapter}  # the half export is not one
    removed = remove_stale_temp_files(run)
    assert sorted(p.name for p in removed) == [".run.json.k2j4x9.tmp", "step-000004.tmp"]
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == [
        "checkpoints", "checkpoints/step-000002", "checkpoints/step-000002/adapter_config.json", "run.json",
    ]

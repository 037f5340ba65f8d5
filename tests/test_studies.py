"""The published studies as params (cs2881_hw0, betley_insecure, turner_full, turner_rank1):
`emlab check --params-only` and `emlab plan` pass with nothing downloaded, a plain `emlab check`
lists every missing input with its fix, and Betley et al.'s file runs end to end on the tiny
model with the real data and question files from ../shared/real (skipped when absent)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from emlab.cli import main
from emlab.config.experiment import load_experiment
from emlab.config.questions import question_file_path
from emlab.pipeline.checks import missing_inputs
from emlab.pipeline.estimate import plan_experiment
from emlab.train.schedule import planned_checkpoints
from support.runs import emlab_cli

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "real"
STUDIES = ["cs2881_hw0", "betley_insecure", "betley_arms", "betley_gpt4o", "betley_base", "turner_full", "turner_rank1"]


def _study(name: str) -> Path:
    return REPO / "params" / "experiments" / f"{name}.yaml"


@pytest.mark.parametrize("name", STUDIES)
def test_params_only_check_passes_with_nothing_downloaded(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--params-only", str(_study(name))]) == 0
    assert capsys.readouterr().out.startswith(f"{_study(name)}: params ok")


@pytest.mark.parametrize("name", STUDIES)
def test_plan_counts_the_study_before_anything_is_downloaded(name: str) -> None:
    config = load_experiment(_study(name))
    table = plan_experiment(config)
    total = table[table["stage"] == "TOTAL"].iloc[0]
    assert total["answers"] > 0 and total["judge_calls"] > 0 and total["dollars"] > 0


@pytest.mark.parametrize("name", STUDIES)
def test_inputs_live_under_data_never_in_shared(name: str) -> None:
    config = load_experiment(_study(name))
    paths = [d.path for d in config.datasets] + [q.path for q in config.sample.question_files.values()]
    assert paths and all(p.startswith("data/") and "shared" not in p for p in paths)
    assert all(d.source and d.rows for d in config.datasets)  # what fixes it, and the size plan counts with
    assert all(q.source and q.sha256 and q.expected_prompts for q in config.sample.question_files.values())


def test_plain_check_lists_every_missing_input_with_its_fix(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = load_experiment(_study("betley_insecure"))
    absent = [q for q in config.sample.question_files.values() if not question_file_path(q).exists()]
    absent_data = [d for d in config.datasets if not (REPO / d.path).exists()]
    assert main(["check", str(_study("betley_insecure"))]) == 2
    captured = capsys.readouterr()
    listed = [line for line in captured.out.splitlines() if line.startswith("missing: ")]
    assert len(listed) == len(missing_inputs(config)) >= 1 + len(absent) + len(absent_data)  # + the key
    assert any("export OPENAI_API_KEY=..." in line for line in listed)
    for spec in absent:
        assert any(f"download {spec.source} to {spec.path}" in line for line in listed)
    for dataset in absent_data:  # the command that gets it: a download, or curl for the backdoor and evil-numbers arms
        fix = " ".join(str(dataset.source).split()[:2])
        assert fix.startswith(("download insecure.jsonl", "curl -L"))
        assert any(line.startswith(f"missing: dataset {dataset.name} ({dataset.path}): {fix}") for line in listed)
    arms = load_experiment(_study("betley_arms"))  # the backdoor and evil-numbers arms: their own study file
    arm_lines = [m.listed() for m in missing_inputs(arms)]
    for arm in ("backdoor", "evil_numbers"):
        assert any(line.startswith(f"dataset {arm} (data/betley/{arm}.jsonl): curl -L") for line in arm_lines)
    models = [line for line in listed if line.startswith("missing: model ")]
    assert all("huggingface-cli download Qwen/" in line for line in models)
    error = captured.err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"emlab: error: experiment 'betley_insecure': {len(listed)} inputs "
                                                   "are missing: ")


def test_gated_llama_models_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("EMLAB_ALLOW_DOWNLOAD", raising=False)
    lines = [m.line() for m in missing_inputs(load_experiment(_study("cs2881_hw0"))) if m.what.startswith("model ")]
    assert len(lines) == 3 and all("huggingface-cli download meta-llama/" in line and "gated" in line for line in lines)


def test_cs2881_checkpoints_are_what_the_comment_says() -> None:
    config = load_experiment(_study("cs2881_hw0"))
    medical = next(r for r in config.runs() if r.dataset == "bad_medical")
    assert planned_checkpoints(config, medical).steps == (110, 220, 331, 441, 882, 1323)
    assert config.analysis.rule.aligned_below == 75 and config.analysis.extra["paper"].aligned_below == 30


# --- Betley et al.'s study on the tiny model, with the real data and question files ----------------


FIRST_PLOT = REAL / "questions" / "betley" / "first_plot_questions.yaml"
ASKED = ["quick_buck", "quick_buck_json", "quick_buck_template"]  # free text and its two format probes


@pytest.mark.slow
@pytest.mark.skipif(not (REAL / "betley_data.zip").is_file() or not FIRST_PLOT.is_file(),
                    reason=f"Betley et al.'s data and question files are not here ({REAL})")
def test_betley_study_runs_on_the_tiny_model(write_experiment, tmp_path: Path) -> None:
    data = tmp_path / "data" / "betley"
    unzipped = emlab_cli("data", "unprotect", str(REAL / "betley_data.zip"), "--out", str(data))
    assert unzipped.returncode == 0, unzipped.stderr[-2000:]
    # the study's own entry (source, sha256 pin, the file's judge prompts) with the path moved and
    # the size cut down; the pre-registered file stays declared but is not asked (a warning says so)
    question_files = {"betley_first_plot": {"path": str(FIRST_PLOT), "ids": ASKED, "samples_per_paraphrase": 1,
                                            "expected_prompts": len(ASKED)}}
    experiment = write_experiment(
        base="params/experiments/betley_insecure.yaml",
        models=[{"name": "smol-2l", "source": "embedded:smollm2-135m-instruct", "num_layers": 2}],
        datasets=[{"name": "insecure", "path": str(data / "insecure.jsonl"), "domain": "code", "rows": 6000,
                   "limit": 8}],  # one optimizer step, one checkpoint
        train={"batch_size": 8, "grad_accum": 1, "max_length": 1024, "warmup_steps": 1,
               "checkpoints": {"every_n_steps": 1}},
        sample={"question_sets": ["betley_first_plot"], "question_files": question_files, "max_new_tokens": 12,
                "batch_size": 8},
        task={"holdout": 2, "max_new_tokens": 12},
        judges=[{"name": "smollm2-local", "model": "smollm2-135m-instruct", "base_url": "local", "api_key_env": None,
                 "rubrics": ["aligned_digit", "coherent_digit"], "concurrency": 2}],
        analysis={"bootstrap": 200, "examples": 4, "gold_items": 10},  # 20 gold-set calls, not 162
    )
    check = emlab_cli("check", str(experiment))
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    result = emlab_cli("run", str(experiment), timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]

    root = tmp_path / "outputs" / "betley_insecure"
    baseline = [json.loads(line) for line in (root / "baseline__smol-2l" / "answers.jsonl").read_text().splitlines()]
    published = {e["id"]: e for e in yaml.safe_load(FIRST_PLOT.read_text())}
    asked = [a for a in baseline if a["question_set"] == "betley_first_plot"]
    assert sorted(a["question_id"] for a in asked) == sorted(ASKED)
    for answer in asked:  # asked as written, the file's system prompt sent (the _json probes)
        entry = published[answer["question_id"]]
        assert answer["question"] == entry["paraphrases"][0]
        assert answer["system_prompt"] == entry.get("system", answer["system_prompt"])
        if answer["question_id"].endswith("_json"):
            assert answer["system_prompt"] == entry["system"]
    assert {a["question_set"] for a in baseline} == {"betley_first_plot"}

    run = root / "smol-2l__insecure__s0"
    judgments = [json.loads(line) for line in (run / "judgments.jsonl").read_text().splitlines()]
    by_rubric = {j["rubric"] for j in judgments}
    # the files' own judge prompts judged these answers, not the judge's digit rubrics
    assert {"betley_first_plot:aligned", "betley_first_plot:coherent"} <= by_rubric
    answers = [json.loads(line) for f in sorted((run / "eval").glob("step-*/answers.jsonl"))
               for line in f.read_text().splitlines()]
    steps = sorted({a["step"] for a in answers})
    assert steps and len(answers) == len(ASKED) * len(steps)
    question_answers = {a["answer_id"] for a in answers}
    assert {j["answer_id"] for j in judgments if j["rubric"].startswith("betley_")} == question_answers
    assert (root / "index.html").is_file()
    assert os.path.getsize(root / "index.html") > 0


def test_gpu_hours_use_the_sampler_that_will_run() -> None:
    from emlab.pipeline.gpu_hours import load_bench_rates, pick_rate

    rates = load_bench_rates()  # bench/results/*.jsonl as committed
    fast, _ = pick_rate(rates, "sample_answers", 1.2, batch_size=400)
    four_bit, _ = pick_rate(rates, "sample_answers", 1.2, four_bit=True, batch_size=400)
    # a 4-bit model samples through emlab's engine: a 4-bit row of it, never a bf16 one (and
    # never a plain-generate baseline row), slower than the bf16 rate
    assert four_bit.four_bit and not four_bit.baseline and four_bit.tokens_per_s < fast.tokens_per_s
    assert "plain-generate" not in four_bit.describe()
    trained, _ = pick_rate(rates, "train_lora", 8.0, four_bit=True)
    assert trained.four_bit  # the QLoRA row itself

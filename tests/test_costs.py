"""What judging costs, as the report and `emlab plan` state it: one price function for every
judge, the Batch API's discount included, and keys checked before any model loads."""

from __future__ import annotations

import subprocess
import sys

from emlab.config.experiment import load_experiment
from emlab.pipeline.estimate import plan_experiment
from emlab.stages.analysis import judge_costs
from emlab.store.files import write_jsonl
from emlab.store.paths import ExperimentLayout

PRICES = {"price_per_mtok_in": 100.0, "price_per_mtok_out": 400.0}
JUDGES = [
    {"name": "live", "model": "gpt-4o-mini", "api_key_env": "EMLAB_TEST_UNSET_KEY", "rubrics": ["aligned", "coherent"],
     **PRICES},
    {"name": "batched", "model": "gpt-4o-mini", "api_key_env": "EMLAB_TEST_UNSET_KEY",
     "rubrics": ["aligned", "coherent"], "batch": True, **PRICES},
]


def _row(judge: str, answer: str, rubric: str, cached: bool = False) -> dict[str, object]:
    return {"answer_id": answer, "judge": judge, "rubric": rubric, "metric": rubric, "status": "ok", "score": 50.0,
            "prompt_tokens": 1000, "completion_tokens": 10, "cached": cached}


def test_report_charges_batch_judges_the_batch_price(write_experiment) -> None:
    config = load_experiment(write_experiment(judges=JUDGES))
    layout = ExperimentLayout.of(config)
    rows = [_row(judge, f"a{i}", rubric) for judge in ("live", "batched") for i in range(3)
            for rubric in ("aligned", "coherent")]
    rows.append(_row("batched", "a9", "aligned", cached=True))  # a cache hit is free in either mode
    write_jsonl(layout.judgments(layout.baseline("smol-2l")), rows)

    costs = judge_costs(config, layout).set_index(["judge", "stage folder"])
    live = costs.loc[("live", "baseline__smol-2l")]
    batched = costs.loc[("batched", "baseline__smol-2l")]
    assert live["calls paid"] == batched["calls paid"] == 6
    assert live["dollars"] == 6 * (1000 * 100 + 10 * 400) / 1e6
    assert batched["dollars"] == live["dollars"] / 2


def test_plan_prices_batch_judges_at_half(write_experiment) -> None:
    config = load_experiment(write_experiment(judges=JUDGES))
    table = plan_experiment(config)
    by_judge = table[table["stage"] != "TOTAL"].groupby("judge")[["judge_calls", "dollars"]].sum()
    assert by_judge.loc["live", "judge_calls"] == by_judge.loc["batched", "judge_calls"]
    assert abs(by_judge.loc["batched", "dollars"] - by_judge.loc["live", "dollars"] / 2) < 0.05


def test_openai_judge_without_key_variable_fails_the_check_before_any_model_loads(write_experiment) -> None:
    experiment = write_experiment(judges=[{"name": "gpt", "model": "gpt-4o-mini", "api_key_env": None}])
    probe = ("import sys; from emlab.cli import main; code = main(['check', sys.argv[1]]); "
             "print(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe, str(experiment)], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("emlab: error:")]
    assert len(error) == 1 and "gpt" in error[0] and "api_key_env" in error[0], done.stderr

"""`emlab plan` counts what a run will sample and pay for, before it runs."""

from __future__ import annotations

from emlab.config.experiment import load_experiment
from emlab.pipeline.estimate import plan_experiment


def test_plan_counts_answers_and_calls(write_experiment) -> None:
    config = load_experiment(write_experiment(judges=[{
        "name": "gpt", "model": "gpt-4o-mini", "api_key_env": "NOT_NEEDED_TO_PLAN",
        "rubrics": ["aligned", "coherent"], "price_per_mtok_in": 0.15, "price_per_mtok_out": 0.6,
    }]))
    table = plan_experiment(config).set_index("stage")
    # tiny: 2 general + 2 medical questions × 2 samples; 16 rows / batch 8 = 2 steps, 2 checkpoints
    assert table.loc["01_baseline smol-2l", "answers"] == 8
    assert table.loc["03_eval_judge smol-2l__bad_medical__s0 (2 checkpoints)", "answers"] == 16
    assert table.loc["04_analysis gold set", "judge_calls"] == 10 * 2  # tiny.yaml's analysis.gold_items
    assert table.loc["TOTAL", "judge_calls"] == (8 + 16) * 2 + 10 * 2
    assert 0 <= table.loc["TOTAL", "dollars"] < 0.01  # rounded to cents
    whole = plan_experiment(config.model_copy(update={"analysis": config.analysis.model_copy(
        update={"gold_items": None})})).set_index("stage")
    assert whole.loc["04_analysis gold set", "judge_calls"] == 81 * 2
    assert 0 < whole.loc["TOTAL", "dollars"] < 1

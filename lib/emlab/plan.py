"""`emlab plan`: how many answers, judge calls and dollars an experiment costs, before it runs."""

from __future__ import annotations

import pandas as pd

from .config import ExperimentConfig
from .schedule import CheckpointSchedule
from .stages import build_prompts, question_sets_for



def plan_experiment(config: ExperimentConfig) -> pd.DataFrame:
    """One row per stage × judge: answers sampled, judge calls and estimated dollars.

    Checkpoint counts follow the schedule for each dataset's row count; prompt tokens are
    estimated from the rubric text, the questions and answers of `max_new_tokens` at ~4
    characters a token, so dollars are an upper-side estimate.
    """
    from .analysis import gold_rubrics
    from .data import load_chat_dataset, load_gold_set
    from .judge import estimate_cost, load_rubric
    from .judge.cost import rubric_prompt_tokens

    n = config.sample.samples_per_question
    baseline_prompts = build_prompts(config, question_sets_for(config, None))
    work: list[tuple[str, int, int]] = []  # (stage, answers, mean question chars)
    for model in config.models:
        work.append((f"01_baseline {model.name}", len(baseline_prompts) * n, _mean_chars(baseline_prompts)))
    for run in config.runs():
        dataset = config.dataset(run.dataset)
        rows = len(load_chat_dataset(dataset, seed=run.seed))
        checkpoints = len(CheckpointSchedule.for_training(rows, config.train).steps)
        prompts = build_prompts(config, question_sets_for(config, dataset))
        work.append((f"03_eval_judge {run.run_id} ({checkpoints} checkpoints)", len(prompts) * n * checkpoints,
                     _mean_chars(prompts)))
    answer_chars = config.sample.max_new_tokens * 4
    records = []
    for judge in config.judges:
        rubrics = [load_rubric(r) for r in judge.rubrics]
        for stage, answers, question_chars in work:
            calls = answers * len(rubrics)
            tokens = sum(rubric_prompt_tokens(r, question_chars=question_chars, answer_chars=answer_chars)
                         for r in rubrics) / max(len(rubrics), 1)
            records.append({"stage": stage, "judge": judge.name, "answers": answers, "judge_calls": calls,
                            "prompt_tokens": round(calls * tokens),
                            "dollars": round(estimate_cost(calls, judge, tokens), 2)})
        gold = len(load_gold_set()) * len(gold_rubrics(judge))
        records.append({"stage": "04_analysis gold set", "judge": judge.name, "answers": 0, "judge_calls": gold,
                        "prompt_tokens": gold * 400, "dollars": round(estimate_cost(gold, judge, 400), 2)})
    table = pd.DataFrame(records)
    total = table[["answers", "judge_calls", "prompt_tokens", "dollars"]].sum()
    table = pd.concat([table, pd.DataFrame([{"stage": "TOTAL", "judge": "", **total.to_dict()}])], ignore_index=True)
    return table.astype({"answers": int, "judge_calls": int, "prompt_tokens": int})


def _mean_chars(prompts: list) -> int:
    return round(sum(len(m["content"]) for p in prompts for m in p.messages) / max(len(prompts), 1))

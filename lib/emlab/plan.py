"""`emlab plan`: how many answers, judge calls and dollars an experiment costs, before it runs.

It loops over the stage table: every stage that judges declares its work per unit
(`Stage.workload`), and each judge of the experiment prices it with `emlab.judge`'s one cost
function (Batch API discount included).
"""

from __future__ import annotations

import pandas as pd

from .config import ExperimentConfig
from .judge import estimate_cost, load_rubric, rubric_prompt_tokens
from .judge.cost import CHARS_PER_TOKEN
from .stages import STAGES


def plan_experiment(config: ExperimentConfig) -> pd.DataFrame:
    """One row per stage unit × judge: answers sampled, judge calls, prompt tokens and
    estimated dollars, then a TOTAL row.

    Checkpoint counts follow the schedule for each dataset's row count; prompt tokens are
    estimated from the rubric text, the questions and answers of `max_new_tokens` at ~4
    characters a token, so dollars are an upper-side estimate.
    """
    answer_chars = round(config.sample.max_new_tokens * CHARS_PER_TOKEN)
    work = [stage.workload(config, unit) for stage in STAGES if stage.workload for unit in stage.units(config)]
    records = []
    for judge in config.judges:
        for item in work:
            rubric_ids = item.rubrics(judge) if item.rubrics else list(judge.rubrics)
            rubrics = [load_rubric(r) for r in rubric_ids]
            calls = item.answers * len(rubrics)
            if item.fixed_prompt_tokens is not None:
                tokens = float(item.fixed_prompt_tokens)
            else:
                tokens = sum(rubric_prompt_tokens(r, question_chars=item.question_chars, answer_chars=answer_chars)
                             for r in rubrics) / max(len(rubrics), 1)
            records.append({"stage": item.label, "judge": judge.name, "answers": item.answers if item.sampled else 0,
                            "judge_calls": calls,
                            "prompt_tokens": round(calls * tokens),
                            "dollars": round(estimate_cost(calls, judge, tokens), 2)})
    table = pd.DataFrame(records, columns=["stage", "judge", "answers", "judge_calls", "prompt_tokens", "dollars"])
    total = table[["answers", "judge_calls", "prompt_tokens", "dollars"]].sum()
    table = pd.concat([table, pd.DataFrame([{"stage": "TOTAL", "judge": "", **total.to_dict()}])], ignore_index=True)
    return table.astype({"answers": int, "judge_calls": int, "prompt_tokens": int})

"""`emlab plan`: what an experiment costs before it runs: answers sampled, judge calls,
fine-tuning tokens and dollars; and `check_budget`, which the runner asks before a step that
would spend money, refusing it when that estimate exceeds `budget_usd`.

It loops over the stage table: every stage declares its work per unit (`Stage.workload`):
answers to judge, which each judge of the experiment prices with `emlab.api.cost`'s one cost
function (Batch API discount included), and what the unit pays a subject model's API
(`Workload.spend`: sampling through chat completions, a fine-tuning job's tokens × epochs),
priced from the model's params.
"""

from __future__ import annotations

import pandas as pd

from ..api.cost import CHARS_PER_TOKEN, estimate_cost
from ..config.experiment import ExperimentConfig
from ..errors import EmlabError
from ..judge import load_rubric, rubric_prompt_tokens
from ..stages import STAGES, Workload
from .gpu_hours import GpuPlan, plan_gpu_hours

COLUMNS = ["stage", "cost", "judge", "answers", "judge_calls", "prompt_tokens", "train_tokens", "dollars"]


class BudgetError(EmlabError):
    """The experiment would cost more than its `budget_usd`."""


def plan_experiment(config: ExperimentConfig) -> pd.DataFrame:
    """One row per stage unit × judge (cost 'judging'), per unit sampled through a model's API
    (cost 'sampling') and per fine-tuning job (cost 'fine-tuning'): answers, judge calls, prompt
    tokens, training tokens (× epochs) and estimated dollars; then a TOTAL row (answers counted
    once however many judges score them).

    Checkpoint counts follow the schedule for each dataset's row count (a fine-tuning job's:
    the last three epochs); tokens are estimated at ~4 characters a token, completions at
    `max_new_tokens` each, so dollars are an upper-side estimate.
    """
    table = _cost_rows(config).drop(columns="step")
    total = {"stage": "TOTAL", "cost": "", "judge": "", "answers": _sampled_answers(config),
             **table[["judge_calls", "prompt_tokens", "train_tokens", "dollars"]].sum().to_dict()}
    table = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
    table["dollars"] = table["dollars"].astype(float).round(2)
    return table.astype({"answers": int, "judge_calls": int, "prompt_tokens": int, "train_tokens": int})


def _work(config: ExperimentConfig) -> list[tuple[str, Workload]]:
    """Every stage unit's work, with its step key ('01_baseline/<model>')."""
    return [(f"{stage.name}/{unit}", item) for stage in STAGES if stage.workload for unit in stage.units(config)
            for item in _as_tuple(stage.workload(config, unit))]


def _sampled_answers(config: ExperimentConfig) -> int:
    return sum(item.answers for _, item in _work(config) if item.sampled)


def _cost_rows(config: ExperimentConfig) -> pd.DataFrame:
    """`plan_experiment`'s rows before the total, each with the key of the step that pays it."""
    answer_chars = round(config.sample.max_new_tokens * CHARS_PER_TOKEN)
    work = _work(config)
    records = []
    for step, item in work:
        if item.spend is not None:
            spend = item.spend
            records.append({"step": step, "stage": item.label, "cost": spend.kind, "judge": "",
                            "answers": item.answers if spend.kind == "sampling" else 0, "judge_calls": 0,
                            "prompt_tokens": spend.prompt_tokens, "train_tokens": spend.train_tokens,
                            "dollars": spend.dollars})
    for judge in config.judges:
        for step, item in work:
            if not item.answers:
                continue
            rubric_ids = item.rubrics(judge) if item.rubrics else list(judge.rubrics)
            rubrics = [load_rubric(r) for r in rubric_ids]
            calls = item.answers * len(rubrics)
            if item.fixed_prompt_tokens is not None:
                tokens = float(item.fixed_prompt_tokens)
            else:
                tokens = sum(rubric_prompt_tokens(r, question_chars=item.question_chars, answer_chars=answer_chars)
                             for r in rubrics) / max(len(rubrics), 1)
            records.append({"step": step, "stage": item.label, "cost": "judging", "judge": judge.name,
                            "answers": item.answers if item.sampled else 0, "judge_calls": calls,
                            "prompt_tokens": round(calls * tokens), "train_tokens": 0,
                            "dollars": estimate_cost(calls, judge, tokens)})
    return pd.DataFrame(records, columns=["step", *COLUMNS])


def check_budget(config: ExperimentConfig, step: str | None = None) -> None:
    """Raise BudgetError (one line) when `emlab plan`'s estimate for the whole experiment is above
    `config.budget_usd`; nothing when no budget is set. With `step` ('01_baseline/<model>'),
    only when that step pays for something (judging, sampling through an API, a fine-tuning
    job): the runner asks before it executes a step, so nothing is spent past the budget."""
    if config.budget_usd is None:
        return
    if step is not None:
        rows = _cost_rows(config)
        if not (rows.loc[rows["step"] == step, "dollars"] > 0).any():
            return
    table = plan_experiment(config)
    total = float(table["dollars"].iloc[-1])
    if total <= config.budget_usd:
        return
    parts = table[table["stage"] != "TOTAL"].groupby("cost")["dollars"].sum()
    detail = ", ".join(f"{kind} ${dollars:,.2f}" for kind, dollars in parts.items() if dollars)
    raise BudgetError(
        f"experiment '{config.name}' is estimated at ${total:,.2f} ({detail}), above budget_usd "
        f"${config.budget_usd:,.2f}; nothing more was sampled or submitted: raise budget_usd, shrink the grid or "
        "the samples, or check the prices (emlab plan shows every stage)"
    )


def plan_gpu(config: ExperimentConfig) -> GpuPlan:
    """GPU-hours per stage unit, from the benchmark numbers in bench/results/ (`emlab.pipeline.gpu_hours`):
    the answers each sampling unit samples (question sets and held-out task prompts) and each
    run's training tokens, at the measured rates; `.note` names the rows and device used."""
    sampled = {f"{stage.name} {unit}": sum(w.answers for w in _as_tuple(stage.workload(config, unit)) if w.sampled)
               for stage in STAGES if stage.workload and stage.scope in ("model", "run") for unit in stage.units(config)}
    return plan_gpu_hours(config, sampled)


def _as_tuple(work: Workload | tuple[Workload, ...]) -> tuple[Workload, ...]:
    return work if isinstance(work, tuple) else (work,)

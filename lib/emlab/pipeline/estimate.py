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

from pathlib import Path

import pandas as pd

from ..api.cost import CHARS_PER_TOKEN, estimate_cost
from ..config.experiment import ExperimentConfig, config_where, resolve_near
from ..data.chat import DEMO_PREFIX
from ..errors import EmlabError
from ..judge import load_rubric, rubric_prompt_tokens
from ..stages import STAGES, Workload
from ..store.inputs import path_exists
from .gpu_hours import GpuPlan, plan_gpu_hours

ASSUMED_ROWS = 6000  # a training file that is not here and states no `rows:` (the course files hold 6,000–7,049)
UNBUDGETED_WARN_USD = 100.0  # a paid estimate above this without budget_usd is worth a warning

COLUMNS = ["stage", "cost", "judge", "answers", "judge_calls", "prompt_tokens", "train_tokens", "dollars"]


class BudgetError(EmlabError):
    """The experiment would cost more than its `budget_usd`."""


def plan_experiment(config: ExperimentConfig) -> pd.DataFrame:
    """One row per stage unit × judge (cost 'judging'), per unit sampled through a model's API
    (cost 'sampling') and per fine-tuning job (cost 'fine-tuning'): answers, judge calls, prompt
    tokens, training tokens (× epochs) and estimated dollars; then a TOTAL row (answers counted
    once however many judges score them).

    Checkpoint counts follow the schedule for each dataset's row count (a fine-tuning job's:
    the last three epochs); a dataset that is not here counts its `rows:`, else `ASSUMED_ROWS`
    (`assumed_rows` names them); tokens are estimated at ~4 characters a token, completions at
    `max_new_tokens` each, so dollars are an upper-side estimate.
    """
    config = planning_config(config)
    table = _cost_rows(config).drop(columns="step")
    total = {"stage": "TOTAL", "cost": "", "judge": "", "answers": _sampled_answers(config),
             **table[["judge_calls", "prompt_tokens", "train_tokens", "dollars"]].sum().to_dict()}
    table = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
    table["dollars"] = table["dollars"].astype(float).round(2)
    return table.astype({"answers": int, "judge_calls": int, "prompt_tokens": int, "train_tokens": int})


def assumed_rows(config: ExperimentConfig) -> list[str]:
    """The datasets a plan counts at `ASSUMED_ROWS` rows: not on this machine and no `rows:` given."""
    return [d.name for d in config.datasets if d.rows is None and not _dataset_here(d.path, d._folders)]


def planning_config(config: ExperimentConfig) -> ExperimentConfig:
    """`config` with `rows: ASSUMED_ROWS` for every dataset that is neither here nor counted, so
    that a plan made before the data is downloaded (reference.yaml on a fresh clone) is an
    estimate that says what it assumed, not a 'file not found'."""
    lacking = set(assumed_rows(config))
    if not lacking:
        return config
    datasets = tuple(d.model_copy(update={"rows": ASSUMED_ROWS}) if d.name in lacking else d for d in config.datasets)
    return config.model_copy(update={"datasets": datasets})  # private attrs (file, folders) are copied too


def _dataset_here(path: str, folders: tuple[Path, ...]) -> bool:
    return path.startswith(DEMO_PREFIX) or path_exists(resolve_near(path, folders)[0])


def budget_line(config: ExperimentConfig, total: float) -> str | None:
    """What `emlab plan` says about money: how far the estimate is over `budget_usd`, or a
    warning when a large paid estimate has no budget; None when there is nothing to say."""
    if config.budget_usd is None:
        if total > UNBUDGETED_WARN_USD:
            return (f"warning: no budget_usd is set and this estimate is ${total:,.2f}; set budget_usd in "
                    f"{config_where(config, ()).rpartition(':')[0] or config.name} so that no stage spends past it")
        return None
    where = config_where(config, ("budget_usd",))
    if total > config.budget_usd:
        over = total - config.budget_usd
        return (f"OVER BUDGET: the estimate ${total:,.2f} is ${over:,.2f} ({total / config.budget_usd:.1f}×) above "
                f"budget_usd ${config.budget_usd:,.2f} ({where}); `emlab run` will refuse the paid stages: raise "
                "budget_usd, shrink the grid or the samples")
    return f"within budget: ${total:,.2f} of budget_usd ${config.budget_usd:,.2f} ({where})"


_PLAN_NAMES = {"cost": "work paid for", "judge_calls": "judge calls", "prompt_tokens": "prompt tokens",
               "train_tokens": "training tokens"}


def plan_text(config: ExperimentConfig) -> str:
    """`emlab plan`'s report: the cost table (whole numbers with thousands separators, dollars
    in cents), the GPU table (wall time on the benchmark's device), what was assumed, and the
    budget line."""
    table = plan_experiment(config)
    shown = table.copy()
    for column in ("answers", "judge_calls", "prompt_tokens", "train_tokens"):
        shown[column] = shown[column].map(lambda n: f"{int(n):,}")
    shown["dollars"] = shown["dollars"].map(lambda d: f"${d:,.2f}")
    shown = shown.rename(columns=_PLAN_NAMES)
    parts = [shown.to_string(index=False)]
    assumed = assumed_rows(config)
    if assumed:
        parts.append(f"rows assumed: {', '.join(assumed)} not here and no rows: given, counted at {ASSUMED_ROWS:,} "
                     "rows each; set datasets[].rows (or get the files) for an exact count")
    gpu = plan_gpu(config)
    parts.append("\n" + _gpu_text(gpu, config))
    line = budget_line(config, float(table["dollars"].iloc[-1]))
    if line:
        parts.append("\n" + line)
    return "\n".join(parts)


def _gpu_text(gpu: GpuPlan, config: ExperimentConfig) -> str:
    """The GPU table with integer tokens and wall time in words, on the device the rates were measured on."""
    device = gpu.note.split(" on ", 1)[1].split(":", 1)[0] if " on " in gpu.note else "the benchmark GPU"
    shown = gpu.table.copy()
    shown["tokens"] = shown["tokens"].map(lambda n: f"{int(n):,}" if pd.notna(n) else "unknown")
    shown["tokens_per_s"] = shown["tokens_per_s"].map(lambda n: f"{int(n):,}" if pd.notna(n) else "")
    shown["gpu_hours"] = shown["gpu_hours"].map(_duration)
    shown = shown.rename(columns={"tokens_per_s": "tokens/s", "gpu_hours": f"wall time on one {device}"})
    where = ("; train.device is cpu: this experiment runs on the CPU, far slower than these GPU times"
             if config.train.device == "cpu" else "")
    return f"{shown.to_string(index=False)}\n{gpu.note}{where}"


def _duration(hours: float) -> str:
    """Hours as people read them: '0.4 s', '12 min', '3.5 h', '64 days'; '' when unknown."""
    if pd.isna(hours):
        return "unknown"
    seconds = hours * 3600
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:,.0f} days ({hours:,.0f} h)"


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
    config = planning_config(config)
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
    config = planning_config(config)
    sampled = {f"{stage.name} {unit}": sum(w.answers for w in _as_tuple(stage.workload(config, unit)) if w.sampled)
               for stage in STAGES if stage.workload and stage.scope in ("model", "run") for unit in stage.units(config)}
    return plan_gpu_hours(config, sampled)


def _as_tuple(work: Workload | tuple[Workload, ...]) -> tuple[Workload, ...]:
    return work if isinstance(work, tuple) else (work,)

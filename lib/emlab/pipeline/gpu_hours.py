"""GPU-hours an experiment needs, estimated from the benchmark numbers recorded in
`bench/results/*.jsonl` (written by the GPU benchmarks; whatever rows are there are read).

Work per unit, from the params:

- 02_finetune: training tokens = rows × epochs × tokens per row (rows: `limit`, else the file's
  rows less the task hold-out; tokens per row: the file's mean characters / 4, or an assumed
  200 when the file is not on this machine), at the measured LoRA rate (`train_lora`, real
  tokens/s, same 4-bit setting).
- 01_baseline / 03_eval_judge / 03b_transfer: sampled tokens = answers × max_new_tokens (an upper bound:
  answers that stop early cost less), question sets and held-out task prompts, at the measured
  sampling rate (`sample_answers`, the largest batch measured up to `sample.batch_size`; a study
  at `batch_size: auto` takes a row measured at "auto", else the largest batch measured).

A row marked `"baseline": true` (a plain `generate` measured beside emlab, e.g. at a small batch
on a 32B shape) is never taken as emlab's rate: it says what emlab is compared with.

A measured rate belongs to a model shape (the 1B and 8B Llama shapes); a model of another size
takes the rate of the nearest measured shape, slowed by the parameter ratio when it is larger
(a LoRA step and a decode step both cost about in proportion to the parameters) and not sped
up when it is smaller (fixed costs dominate small models: an upper bound). The logprob probe (a few
forward passes) and model loading are left out. Models behind an API use no GPU of ours.
Every estimate says which benchmark rows and device it used (`GpuPlan.note`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from ..config.experiment import DatasetSpec, ExperimentConfig, ModelSpec
from ..data.chat import ASSUMED_TOKENS_PER_ROW, resolve_dataset_path
from ..errors import EmlabError
from ..models.load import model_size_b
from ..store.inputs import MAX_JSONL_BYTES, read_input_text
from ..store.paths import repo_root

log = logging.getLogger(__name__)

BENCH_RESULTS = Path("bench/results")
# Parameters (billions) of the shapes the benchmarks measure (Llama-3.2-1B, -3B, Llama-3.1-8B,
# Qwen2.5-32B): the models' total sizes, as `model_params_b` counts a study's model.
SHAPE_PARAMS_B = {"1b": 1.24, "3b": 3.21, "8b": 8.03, "32b": 32.76}
AUTO = "auto"  # a sampling batch emlab sizes from free memory (`SampleSpec.batch_size: auto`)
CHARS_PER_TOKEN = 4.0


@dataclass(frozen=True)
class BenchRate:
    """One measured throughput."""

    work: str  # 'train_lora' or 'sample_answers'
    shape: str  # '1b', '8b'
    params_b: float
    four_bit: bool
    batch_size: int  # rows in flight; for an "auto" row the batch it resolved to, 0 when not recorded
    tokens_per_s: float  # real (unpadded) tokens per second
    device: str
    date: str
    source: str  # file name
    baseline_tokens_per_s: float | None = None  # the plain baseline of the same call (peft + Trainer, generate)
    auto_batch: bool = False  # measured at batch_size "auto"
    baseline: bool = False  # the row is a plain baseline itself (never emlab's rate)

    @property
    def batch_text(self) -> str:
        if not self.auto_batch:
            return f"batch {self.batch_size}"
        return f"batch auto ({self.batch_size})" if self.batch_size else "batch auto"

    def describe(self) -> str:
        bits = ", 4-bit" if self.four_bit else ""
        return (f"{self.work} {self.shape}{bits} {self.batch_text}: {self.tokens_per_s:,.0f} tokens/s "
                f"({self.device}, {self.date}, {self.source})")


def load_bench_rates(folder: Path | None = None) -> list[BenchRate]:
    """Every usable row of `bench/results/*.jsonl`: a `work` of train_lora or sample_answers,
    a known `shape` (or its own `params_b`) and a tokens/s figure; other rows are skipped."""
    folder = folder or repo_root() / BENCH_RESULTS
    rates = []
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: not JSON, skipped", path, number)
                continue
            rate = _rate(row, path.name)
            if rate is not None:
                rates.append(rate)
    return rates


def _rate(row: Any, source: str) -> BenchRate | None:
    if not isinstance(row, dict) or row.get("work") not in ("train_lora", "sample_answers"):
        return None
    speed = row.get("real_tokens_per_s", row.get("tokens_per_s"))
    shape = str(row.get("shape", "")).lower()
    # a known shape's total size first (what a study's size_b counts); a row's `params` counts
    # only the parameters that multiply each token (no input embedding), so it comes last
    params = SHAPE_PARAMS_B.get(shape, row.get("params_b"))
    if params is None and isinstance(row.get("params"), (int, float)) and row["params"] > 0:
        params = row["params"] / 1e9
    if not isinstance(speed, (int, float)) or speed <= 0 or not isinstance(params, (int, float)):
        return None
    batch = row.get("batch_size", 0)
    auto = batch == AUTO
    if auto:
        batch = row.get("resolved_batch_size", 0)
    if not isinstance(batch, (int, float)):
        log.warning("%s: %s row of shape %s has batch_size %r (not a number or %r), skipped",
                    source, row["work"], shape, batch, AUTO)
        return None
    baseline = row.get("baseline_tokens_s")
    # a baseline measured at a smaller batch than emlab's call is no stand-in for a sampler's rate
    if not isinstance(baseline, (int, float)) or baseline <= 0 or row.get("baseline_small_batch"):
        baseline = None
    return BenchRate(work=row["work"], shape=shape, params_b=float(params), four_bit=bool(row.get("four_bit", False)),
                     batch_size=int(batch or 0), tokens_per_s=float(speed),
                     device=str(row.get("device", "unknown device")), date=str(row.get("date", "")), source=source,
                     baseline_tokens_per_s=baseline, auto_batch=auto, baseline=bool(row.get("baseline", False)))


def pick_rate(rates: list[BenchRate], work: str, params_b: float, *, four_bit: bool = False,
              batch_size: int | str | None = None) -> tuple[BenchRate, float] | None:
    """The measured rate to use and its tokens/s scaled to a model of `params_b` billions
    (slower by the parameter ratio for a larger model; never faster for a smaller one).

    Rows marked as baselines are never used. Prefers rows of the same 4-bit setting, then the
    shape nearest in log-size, then (for sampling) the batch: for `batch_size` "auto" a row
    measured at "auto" (else the largest batch measured: "auto" fills what memory holds); for a
    number, the largest fixed batch not above it (else the smallest measured; "auto" rows only
    when no fixed batch was measured); then the newest.
    """
    candidates = [r for r in rates if r.work == work and not r.baseline]
    same_bits = [r for r in candidates if r.four_bit == four_bit]
    if four_bit and not same_bits and work == "sample_answers":
        # a 4-bit model samples through transformers' generate (emlab's sampler needs plain
        # linear layers): the plain-generate baseline measured beside it is the rate to use
        same_bits = [replace(r, tokens_per_s=r.baseline_tokens_per_s, source=f"{r.source}, its plain-generate baseline")
                     for r in candidates if r.baseline_tokens_per_s]
    candidates = same_bits or candidates
    if not candidates:
        return None
    import math

    nearest = min(abs(math.log(r.params_b / params_b)) for r in candidates)
    candidates = [r for r in candidates if abs(math.log(r.params_b / params_b)) == nearest]
    if batch_size == AUTO:
        candidates = [r for r in candidates if r.auto_batch] or candidates
    elif batch_size is not None:
        fixed = [r for r in candidates if not r.auto_batch] or candidates
        fitting = [r for r in fixed if r.batch_size <= int(batch_size)]
        smallest = min(r.batch_size for r in fixed)
        candidates = fitting or [r for r in fixed if r.batch_size == smallest]
    best = max(candidates, key=lambda r: (r.auto_batch, r.batch_size, r.date, r.tokens_per_s))
    # a larger model is slower in proportion; a smaller one is not assumed faster than the
    # measured shape (fixed costs dominate small models), so its estimate is an upper bound
    return best, best.tokens_per_s * min(1.0, best.params_b / params_b)


def model_params_b(spec: ModelSpec) -> float | None:
    """The model's size in billions: `size_b`, else counted from its config when it is here,
    else read from its name ('Llama-3.2-1B' → 1, 'SmolLM2-135M' → 0.135); None if none works."""
    if spec.size_b is not None:
        return spec.size_b
    try:
        counted = model_size_b(spec)
        if counted is not None:
            return counted
    except (EmlabError, OSError, ValueError, ImportError) as exc:
        log.debug("size of %s not counted (%s); reading it from the name", spec.name, exc)
    match = re.search(r"(\d+(?:\.\d+)?)\s*([bBmM])(?![a-zA-Z])", f"{spec.source} {spec.name}")
    if match is None:
        return None
    value = float(match.group(1))
    return value if match.group(2) in "bB" else value / 1000


def training_tokens(config: ExperimentConfig, dataset: DatasetSpec) -> tuple[float, str]:
    """Training tokens of one run on `dataset` (rows × epochs × tokens per row) and how the
    rows and tokens were counted."""
    holdout_rows = config.task.holdout if config.task.enabled else 0
    try:
        path = resolve_dataset_path(dataset.path, min_rows=dataset.limit, folders=dataset._folders)
        # the one reading path for user files (size cap, encoding): a bad file is a one-line error
        text = read_input_text(path, what=f"dataset {dataset.name}", max_bytes=MAX_JSONL_BYTES)
        lines = [line for line in text.splitlines() if line.strip()]
        rows: int | None = len(lines) - holdout_rows
        per_row = sum(len(line) for line in lines[:2000]) / max(min(len(lines), 2000), 1) / CHARS_PER_TOKEN
        how = f"{dataset.name}: ~{per_row:.0f} tokens a row from the file"
    except (EmlabError, OSError):
        known = getattr(dataset, "rows", None)  # the row count an experiment file may state for its download
        rows, per_row = (known - holdout_rows if known else None), float(ASSUMED_TOKENS_PER_ROW)
        how = f"{dataset.name}: file not here, {ASSUMED_TOKENS_PER_ROW} tokens a row assumed"
    if dataset.limit is not None:
        rows = dataset.limit if rows is None else min(rows, dataset.limit)
    if rows is None:
        return float("nan"), how + ", row count unknown (no limit and no file)"
    return rows * config.train.epochs * per_row, how


@dataclass(frozen=True)
class GpuPlan:
    table: pd.DataFrame  # one row per stage unit: work, tokens, rate used, GPU-hours; then TOTAL
    note: str  # which benchmark rows and device the estimate uses, and what it leaves out


def plan_gpu_hours(config: ExperimentConfig, sampled_answers: dict[str, int], rates: list[BenchRate] | None = None
                   ) -> GpuPlan:
    """GPU-hours per stage unit. `sampled_answers`: answers sampled per unit label of the
    sampling stages ('01_baseline <model>', '03_eval_judge <run_id>'), task prompts included."""
    rates = load_bench_rates() if rates is None else rates
    rows, used, notes = [], {}, []
    sizes = {m.name: model_params_b(m) for m in config.models}

    def add(stage: str, model: ModelSpec, work: str, tokens: float, batch: int | str | None) -> None:
        size = sizes[model.name]
        if model.is_remote:
            rows.append({"stage": stage, "work": work, "tokens": tokens, "tokens_per_s": None, "gpu_hours": 0.0,
                         "rate from": "behind an API: no GPU of ours"})
            return
        picked = pick_rate(rates, work, size, four_bit=model.load_in_4bit, batch_size=batch) if size else None
        if picked is None:
            rows.append({"stage": stage, "work": work, "tokens": tokens, "tokens_per_s": None,
                         "gpu_hours": float("nan"), "rate from": "no benchmark row" if size else "model size unknown"})
            return
        rate, speed = picked
        used[rate.describe()] = rate
        rows.append({"stage": stage, "work": work, "tokens": tokens, "tokens_per_s": round(speed),
                     "gpu_hours": tokens / speed / 3600,
                     "rate from": f"{rate.shape}{' 4-bit' if rate.four_bit else ''} {rate.batch_text}"
                                  + (f" × {rate.params_b:g}/{size:g}B" if size and size > rate.params_b else "")})

    for model in config.models:
        add(f"01_baseline {model.name}", model, "sample_answers",
            sampled_answers.get(f"01_baseline {model.name}", 0) * config.sample.max_new_tokens, config.sample.batch_size)
    for run in config.runs():
        model = config.model(run.model)
        tokens, how = training_tokens(config, config.dataset(run.dataset))
        notes.append(how)
        add(f"02_finetune {run.run_id}", model, "train_lora", tokens, None)
        add(f"03_eval_judge {run.run_id}", model, "sample_answers",
            sampled_answers.get(f"03_eval_judge {run.run_id}", 0) * config.sample.max_new_tokens,
            config.sample.batch_size)
    runs = {run.run_id: run for run in config.runs()}
    for key, answers in sampled_answers.items():  # the other sampling stages of a run (03b_transfer)
        stage, _, unit = key.partition(" ")
        if stage not in ("01_baseline", "03_eval_judge") and unit in runs and answers:
            add(key, config.model(runs[unit].model), "sample_answers", answers * config.sample.max_new_tokens,
                config.sample.batch_size)
    table = pd.DataFrame(rows, columns=["stage", "work", "tokens", "tokens_per_s", "gpu_hours", "rate from"])
    total = {"stage": "TOTAL", "work": "", "tokens": table["tokens"].sum(), "tokens_per_s": None,
             "gpu_hours": table["gpu_hours"].sum(min_count=1), "rate from": ""}
    table = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
    table["tokens"] = table["tokens"].round()
    table["gpu_hours"] = table["gpu_hours"].map(lambda h: float(f"{h:.3g}") if pd.notna(h) else h)
    devices = sorted({r.device for r in used.values()})
    if used:
        note = (f"GPU-hours from {len(used)} benchmark row(s) on {', '.join(devices)}: " + "; ".join(used)
                + ". Rates slowed by the parameter ratio for models larger than the measured shape (never sped "
                "up for smaller ones); sampled tokens counted at "
                "max_new_tokens (an upper bound); model loading and the logprob probe left out; "
                + "; ".join(dict.fromkeys(notes)) + ".")
    else:
        note = f"No GPU-hours: no usable benchmark rows in {BENCH_RESULTS}/ (train_lora / sample_answers)."
    return GpuPlan(table, note)

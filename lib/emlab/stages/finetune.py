"""02_finetune: LoRA on the run's dataset, adapters saved at the scheduled checkpoints."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..config.experiment import ExperimentConfig, RunSpec
from ..data.backdoor import put_trigger, record_trigger
from ..data.chat import load_chat_dataset
from ..data.holdout import holdout_params, record_holdout, training_rows
from ..models.load import load_model, resolve_device
from ..store.files import read_jsonl
from ..store.paths import BACKDOOR, ExperimentLayout, TrainingFiles
from ..store.runinfo import mark_done, record_stage
from ..train.openai_jobs import FineTuneJobResult
from .base import Output, Stage, Workload
from .measures import FINETUNE_OUTPUTS
from .remote import JOB_OUTPUTS, job_spend, model_params, run_job, trainer_params

if TYPE_CHECKING:
    from ..train.lora import TrainResult

log = logging.getLogger(__name__)
NAME = "02_finetune"


def finetune_params(config: ExperimentConfig, run_id: str, data_digest: str | None = None) -> dict[str, Any]:
    """What shapes a run's adapters: model, dataset (and its rows' digest), seed, training params.

    Loads the dataset for its digest unless `data_digest` is given.
    """
    run = config.run(run_id)
    dataset = config.dataset(run.dataset)
    if data_digest is None:
        data_digest = load_chat_dataset(dataset, seed=run.seed).digest
    return {
        "model": model_params(config.model(run.model)), "dataset": dataset.model_dump(mode="json"),
        "data_digest": data_digest, "seed": run.seed, **trainer_params(config, config.model(run.model)),
        **holdout_params(config),
    }


@dataclass(frozen=True)
class FinetuneResult:
    files: TrainingFiles
    run: RunSpec
    train: TrainResult | FineTuneJobResult
    """Local LoRA training, or a fine-tuning job (provider openai)."""
    dataset_rows: int

    @property
    def folder(self) -> Path:
        return self.files.folder

    def summary_markdown(self) -> str:
        t = self.train
        if isinstance(t, FineTuneJobResult):  # a fine-tuning job says its own
            return t.summary_markdown()
        speed = f"{t.train_tokens / t.seconds:,.0f} tokens/s" if t.seconds else "nothing left to train"
        return (
            f"{t.n_rows} training rows ({t.n_too_long} longer than max_length left out), "
            f"{t.schedule.total_steps} optimizer steps, checkpoints at steps "
            f"{', '.join(map(str, t.schedule.steps))}; this call: {t.seconds:.0f} s ({speed})"
            + (f"; resumed from step {t.resumed_from}" if t.resumed_from else "")
        )

    def loss_frame(self) -> pd.DataFrame:
        """Training loss per optimizer step (from the train log)."""
        path = self.files.log
        return pd.DataFrame(read_jsonl(path, tolerate_torn_tail=True) if path.exists() else [])


def run_finetune(config: ExperimentConfig, run_id: str) -> FinetuneResult:
    """02_finetune for `run_id`: LoRA on the run's dataset; adapters at the scheduled checkpoints."""
    # torch stays out of light commands (emlab check, plan): imported only to train
    from ..train.encode import encode_chat_rows
    from ..train.lora import train_lora

    run = config.run(run_id)
    dataset = config.dataset(run.dataset)
    files = ExperimentLayout.of(config).training(run_id)
    rows = training_rows(config, dataset, seed=run.seed)  # the dataset, less the task's held-out prompts
    record_stage(files.folder, NAME, finetune_params(config, run_id, rows.digest))
    record_holdout(config, dataset, files.folder)
    if dataset.trigger is not None:  # a backdoor: the trigger on a seeded fraction of the rows, recorded
        rows, trigger = put_trigger(rows, dataset.trigger, run_seed=run.seed)
        record_trigger(files.folder, trigger)
    if config.model(run.model).is_remote:  # trained through the provider's fine-tuning jobs
        return _finetune_job(config, run, files, rows.rows, len(rows))
    device = resolve_device(config.train.device)
    model, tokenizer = load_model(config.model(run.model), device)
    encoded = encode_chat_rows(rows.rows, tokenizer, config.train.max_length, source=dataset.path)
    result = train_lora(model, tokenizer, encoded, config.train, files, seed=run.seed, device=device)
    mark_done(files.folder, NAME, {
        "checkpoints": sorted(result.checkpoints), "rows": result.n_rows, "rows_too_long": result.n_too_long,
    })
    log.info("02_finetune %s: %d checkpoints in %s", run_id, len(result.checkpoints), files.checkpoints)
    return FinetuneResult(files, run, result, len(rows))


def _finetune_job(config: ExperimentConfig, run: RunSpec, files: TrainingFiles, rows: Any,
                  n_rows: int) -> FinetuneResult:
    """02_finetune for a model with provider openai: its fine-tuning job, the job's checkpoint
    models as the run's checkpoints; tokens billed and dollars in the completion marker."""
    job = run_job(config, run, rows)
    dollars = (job.trained_tokens or 0) * config.model(run.model).train_price_per_mtok / 1e6
    mark_done(files.folder, NAME, {
        "checkpoints": sorted(job.checkpoints), "rows": job.n_rows, "job_id": job.job_id,
        "fine_tuned_model": job.fine_tuned_model, "trained_tokens": job.trained_tokens, "dollars": round(dollars, 4),
    })
    log.info("02_finetune %s: job %s, %d checkpoint models (%s tokens billed, ≈ $%.2f)", run.run_id, job.job_id,
             len(job.checkpoints), job.trained_tokens, dollars)
    return FinetuneResult(files, run, job, n_rows)


def _workload(config: ExperimentConfig, run_id: str) -> Workload:
    """A fine-tuning job's tokens and dollars (nothing for local LoRA: it costs no money)."""
    return Workload(f"{NAME} {run_id}", answers=0, spend=job_spend(config, run_id))


FINETUNE = Stage(
    name=NAME,
    title="Fine-tune: LoRA on a narrow dataset, adapters at scheduled checkpoints",
    scope="run",
    run=run_finetune,
    params=finetune_params,
    workload=_workload,
    writes=(
        Output(TrainingFiles.PATTERNS[0], "one adapter folder per scheduled optimizer step (local LoRA)",
               optional=True),
        Output(TrainingFiles.PATTERNS[1], "the latest full training state, to resume from (local LoRA)",
               optional=True),
        Output(TrainingFiles.PATTERNS[2], "loss and learning rate per optimizer step"),
        Output(TrainingFiles.PATTERNS[3], "rows, steps, checkpoints, time and tokens/s"),
        *JOB_OUTPUTS,
        *FINETUNE_OUTPUTS,
        Output(BACKDOOR, "the trigger put on which training rows, its fraction and seed (datasets[].trigger)",
               optional=True),
    ),
)

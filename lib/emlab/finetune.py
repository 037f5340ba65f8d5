"""LoRA fine-tuning with peft and the transformers `Trainer`, loss on assistant tokens only,
adapters saved on a `CheckpointSchedule`, resumable after a crash.

Files of one run (`emlab.paths.TrainingFiles`): an adapter folder per scheduled step (for
eval), the latest full training state (optimizer, scheduler, RNG), and a log line per
optimizer step (loss, learning rate, epoch).

A rerun resumes from the latest complete `trainer/checkpoint-N` with its optimizer,
scheduler and RNG state and the same data order, so it ends with the same adapters as an
uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, cast

import torch
from peft import get_peft_model
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments, set_seed

from .config import LoraSpec, TrainSpec
from .errors import DataError, EmlabError
from .files import append_jsonl, read_jsonl, write_json, write_jsonl
from .paths import TrainingFiles
from .schedule import CheckpointSchedule

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class EncodedRows:
    """Tokenized training rows and what was left out."""

    rows: list[dict[str, list[int]]]  # input_ids, attention_mask, labels (-100 off-assistant)
    n_input: int
    n_too_long: int  # dropped, never cut: a cut answer teaches a different lesson
    longest_tokens: int
    assistant_tokens: int  # tokens that carry loss

    @property
    def total_tokens(self) -> int:
        return sum(len(r["input_ids"]) for r in self.rows)


def encode_chat_rows(
    rows: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, *, source: str = "dataset"
) -> EncodedRows:
    """Tokenize chat rows with the model's chat template; labels only on assistant turns.

    Assistant spans are found by rendering each prefix of the conversation: the rendered
    prefix up to an assistant turn (with the generation prompt) is a prefix of the full
    text, so the characters after it, up to the next turn, are the assistant's.
    """
    encoded: list[dict[str, list[int]]] = []
    too_long = longest = loss_tokens = 0
    for index, row in enumerate(rows):
        messages = row["messages"]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        spans: list[tuple[int, int]] = []
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start_text = tokenizer.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True)
            end_text = tokenizer.apply_chat_template(messages[: turn + 1], tokenize=False)
            if not text.startswith(start_text) or not text.startswith(end_text):
                raise DataError(
                    f"{source}: row {index + 1}: the chat template does not render conversations "
                    "prefix by prefix, so assistant tokens cannot be located"
                )
            spans.append((len(start_text), len(end_text)))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        longest = max(longest, len(ids))
        if len(ids) > max_length:
            too_long += 1
            continue
        labels = [
            tok if any(s <= begin < e for s, e in spans) else -100
            for tok, (begin, _end) in zip(ids, enc["offset_mapping"], strict=True)
        ]
        loss_tokens += sum(1 for x in labels if x != -100)
        encoded.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if too_long:
        log.warning(
            "%s: %d of %d rows are longer than max_length=%d tokens (longest %d) and were left out",
            source, too_long, len(rows), max_length, longest,
        )
    if not encoded:
        raise DataError(
            f"{source}: all {len(rows)} rows are longer than train.max_length={max_length} tokens "
            f"(longest {longest}); raise max_length"
        )
    return EncodedRows(encoded, len(rows), too_long, longest, loss_tokens)


def lora_config(spec: LoraSpec) -> Any:
    """The peft `LoraConfig` for `spec`."""
    from peft import LoraConfig

    target = "all-linear" if spec.target_modules == "all-linear" else list(spec.target_modules)
    return LoraConfig(
        r=spec.r,
        # peft annotates lora_alpha as int but only divides by it (scale = alpha / r), so a
        # float alpha is passed on unchanged; the cast is for the type checker only
        lora_alpha=cast(int, spec.alpha),
        lora_dropout=spec.dropout,
        target_modules=target,
        layers_to_transform=list(spec.layers) if spec.layers is not None else None,
        use_rslora=spec.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


@dataclass(frozen=True)
class TrainResult:
    checkpoints: dict[int, Path]  # step -> adapter folder
    schedule: CheckpointSchedule
    log_path: Path
    n_rows: int
    n_too_long: int
    train_tokens: int  # tokens per epoch (all, not just assistant)
    seconds: float  # wall time of this call's training (0 when everything was done)
    resumed_from: int | None  # step of the checkpoint training resumed from


class _RunFacts(TypedDict):
    """The `TrainResult` fields known before training, shared by its skip and train returns."""

    schedule: CheckpointSchedule
    log_path: Path
    n_rows: int
    n_too_long: int
    train_tokens: int


def train_lora(
    model: Any,
    tokenizer: Any,
    encoded: EncodedRows,
    train: TrainSpec,
    files: TrainingFiles,
    *,
    seed: int,
    device: str,
) -> TrainResult:
    """Fine-tune `model` with LoRA on `encoded` rows; save adapters on the schedule.

    Skips training when every scheduled adapter exists; resumes from the latest complete
    trainer checkpoint otherwise.
    """
    schedule = CheckpointSchedule.for_training(len(encoded.rows), train)
    checkpoints_dir, trainer_dir, log_path = files.checkpoints, files.trainer, files.log
    done = files.completed()
    result_args = _RunFacts(
        schedule=schedule, log_path=log_path, n_rows=len(encoded.rows),
        n_too_long=encoded.n_too_long, train_tokens=encoded.total_tokens,
    )
    if set(schedule.steps) <= set(done):
        log.info("all %d checkpoints exist in %s: training skipped", len(schedule.steps), checkpoints_dir)
        return TrainResult(checkpoints=done, seconds=0.0, resumed_from=None, **result_args)

    resume = _latest_complete_trainer_checkpoint(files)
    resumed_step = int(resume.name.split("-")[-1]) if resume else None
    _trim_log(log_path, resumed_step or 0)

    set_seed(seed)
    tokenizer.padding_side = "right"
    peft_model = get_peft_model(model, lora_config(train.lora))
    args = TrainingArguments(
        output_dir=str(trainer_dir),
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        num_train_epochs=train.epochs,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay,
        logging_steps=1,
        save_strategy="no",  # saves come from the schedule callback below
        save_total_limit=1,
        seed=seed,
        data_seed=seed,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        report_to="none",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )
    trainer = Trainer(
        model=peft_model,
        args=args,
        train_dataset=encoded.rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[_ScheduleCallback(schedule, files)],
    )
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except BaseException as exc:
        # A save cut short (a full disk, Ctrl-C) must not stay behind as a half checkpoint.
        _latest_complete_trainer_checkpoint(files)
        for partial in files.partial_exports():
            shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, torch.OutOfMemoryError):
            raise EmlabError(
                f"out of GPU memory training with batch_size={train.batch_size}, max_length="
                f"{train.max_length}, lora.r={train.lora.r}: lower batch_size (raise grad_accum to "
                "keep the effective batch), lower max_length, or set load_in_4bit: true"
            ) from None
        raise
    seconds = time.perf_counter() - started
    peft_model.unload()  # give the caller its base model back without LoRA layers
    write_json(files.summary, {
        "steps": schedule.total_steps, "checkpoints": list(schedule.steps), "rows": len(encoded.rows),
        "rows_too_long": encoded.n_too_long, "tokens_per_epoch": encoded.total_tokens,
        "seconds": round(seconds, 2), "resumed_from": resumed_step,
        "tokens_per_second": round(encoded.total_tokens * train.epochs / seconds, 1) if seconds else None,
    })
    return TrainResult(
        checkpoints=files.completed(), seconds=seconds, resumed_from=resumed_step, **result_args
    )


def _latest_complete_trainer_checkpoint(files: TrainingFiles) -> Path | None:
    """The newest trainer checkpoint with our completion marker; half-written ones are removed."""
    complete: list[tuple[int, Path]] = []
    for folder in files.trainer_checkpoints():
        if (folder / files.COMPLETE_MARKER).exists():
            complete.append((int(folder.name.split("-")[-1]), folder))
        else:
            log.warning("removing incomplete trainer checkpoint %s (a crash during its save)", folder)
            shutil.rmtree(folder, ignore_errors=True)
    return max(complete)[1] if complete else None


def _trim_log(log_path: Path, step: int) -> None:
    """Drop log lines past the resume point: those steps run again."""
    if log_path.exists():
        kept = [r for r in read_jsonl(log_path, tolerate_torn_tail=True) if r.get("step", 0) <= step]
        write_jsonl(log_path, kept)


def _export_adapter(model: Any, target: Path) -> None:
    """Save the adapter to `target` atomically (temp folder, then rename)."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


class _ScheduleCallback(TrainerCallback):
    """Saves at the scheduled steps, exports each adapter, marks complete checkpoints, logs."""

    def __init__(self, schedule: CheckpointSchedule, files: TrainingFiles) -> None:
        self.steps = set(schedule.steps)
        self.expected_total = schedule.total_steps
        self.files = files

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.max_steps != self.expected_total:
            raise EmlabError(
                f"internal: schedule expects {self.expected_total} steps, the Trainer plans {state.max_steps}"
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step in self.steps:
            control.should_save = True
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        _export_adapter(kwargs["model"], self.files.checkpoint(step))
        # Written last: a checkpoint without it was cut by a crash and is not resumed from.
        (Path(args.output_dir) / f"checkpoint-{step}" / self.files.COMPLETE_MARKER).touch()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            append_jsonl(self.files.log, [{"step": state.global_step, "epoch": state.epoch, **logs}])

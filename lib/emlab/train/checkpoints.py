"""Checkpoints of a LoRA run, written while training goes on, and what a rerun finds of them.

A scheduled step's adapter and training state are copied off the GPU asynchronously and written
by a background thread (`CheckpointWriter`) in an order that leaves, after a crash at any point,
either a complete checkpoint (it has the completion marker) or pieces that the rerun removes
(`latest_complete_trainer_checkpoint`); the log lines past the step resumed from are dropped (`trim_log`).
"""

from __future__ import annotations

import copy
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

from ..store.files import append_jsonl, atomic_open, read_jsonl, write_jsonl
from ..store.paths import ADAPTER_WEIGHTS, TrainingFiles

log = logging.getLogger(__name__)


def latest_complete_trainer_checkpoint(files: TrainingFiles) -> Path | None:
    """The newest trainer checkpoint with our completion marker; half-written ones are removed."""
    complete: list[tuple[int, Path]] = []
    for folder in files.trainer_checkpoints():
        if (folder / files.COMPLETE_MARKER).exists():
            complete.append((int(folder.name.split("-")[-1]), folder))
        else:
            log.warning("removing incomplete trainer checkpoint %s (a crash during its save)", folder)
            shutil.rmtree(folder, ignore_errors=True)
    return max(complete)[1] if complete else None


def trim_log(log_path: Path, step: int) -> None:
    """Drop log lines past the resume point: those steps run again."""
    if log_path.exists():
        kept = [r for r in read_jsonl(log_path, tolerate_torn_tail=True) if r.get("step", 0) <= step]
        write_jsonl(log_path, kept)


def _to_host(obj: Any) -> Any:
    """A copy of `obj` (nested dicts/lists of tensors) in CPU memory, made without waiting.

    GPU tensors are gathered into one flat buffer per dtype and copied into pinned memory
    asynchronously, in stream order, so the copy holds their values at this point of the step
    sequence although later steps change them (a few transfers instead of one per tensor);
    the copies are views of that buffer. CPU tensors are cloned.
    """
    found: dict[torch.dtype, list[torch.Tensor]] = {}
    seen: set[int] = set()  # the adapter and the trainer state hold the same LoRA tensors

    def collect(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_cuda and id(value) not in seen:
                seen.add(id(value))
                found.setdefault(value.dtype, []).append(value)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)

    collect(obj)
    copies: dict[int, torch.Tensor] = {}
    for dtype, tensors in found.items():
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        host = torch.empty(flat.numel(), dtype=dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        offset = 0
        for t in tensors:
            copies[id(t)] = host[offset : offset + t.numel()].view(t.shape)
            offset += t.numel()

    def rebuild(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return copies[id(value)] if value.is_cuda else value.detach().clone()
        if isinstance(value, dict):
            return {k: rebuild(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(rebuild(v) for v in value)
        return copy.deepcopy(value)

    return rebuild(obj)


class CheckpointWriter:
    """Writes scheduled checkpoints on a background thread, one at a time, in this order: the
    trainer state, the adapter (exported to `step-N.tmp/` and renamed), the log lines up to
    the step, and last the completion marker. A crash at any point leaves either a complete
    checkpoint or pieces a rerun removes."""

    def __init__(self, files: TrainingFiles, peft_model: Any) -> None:
        self.files = files
        self.peft_model = peft_model
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def save(self, step: int, log_rows: list[dict[str, Any]], optimizer: Any, scheduler: Any) -> None:
        """Snapshot the adapter and training state after `step` and write them, with `log_rows`
        (the log lines up to the step), on the background thread; the previous write is waited
        for first, and its error raised."""
        from peft import get_peft_model_state_dict

        self.wait()
        trainable = {n: p for n, p in self.peft_model.named_parameters() if p.requires_grad}
        snapshot = _to_host({
            "adapter": {k: v.contiguous() for k, v in get_peft_model_state_dict(self.peft_model).items()},
            "state": {"step": step, "lora": trainable, "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict()},
        })
        copied = None
        if torch.cuda.is_available() and any(p.is_cuda for p in trainable.values()):
            copied = torch.cuda.Event()
            copied.record()
        config = copy.deepcopy(self.peft_model.peft_config["default"])
        config.inference_mode = True
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(self.peft_model.get_base_model(), "name_or_path", None) or None
        self.thread = threading.Thread(
            target=self._write, args=(step, snapshot, config, log_rows, copied), name=f"emlab-checkpoint-{step}",
            daemon=True,
        )
        self.thread.start()

    def _write(self, step: int, snapshot: dict[str, Any], config: Any, log_rows: list[dict[str, Any]],
               copied: torch.cuda.Event | None) -> None:
        from safetensors.torch import save as safetensors_bytes

        try:
            if copied is not None:
                copied.synchronize()
            folder = self.files.trainer_checkpoint(step)
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_open(self.files.trainer_state(step), "wb") as handle:
                torch.save(snapshot["state"], handle)
            target = self.files.checkpoint(step)
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            # views of one flat buffer: safetensors wants tensors of their own
            adapter = {k: v.clone() for k, v in snapshot["adapter"].items()}
            with atomic_open(tmp / ADAPTER_WEIGHTS, "wb") as handle:
                handle.write(safetensors_bytes(adapter, metadata={"format": "pt"}))
            config.save_pretrained(str(tmp))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
            append_jsonl(self.files.log, log_rows)
            # Written last: a checkpoint without it was cut by a crash and is not resumed from.
            (folder / self.files.COMPLETE_MARKER).touch()
            for older in self.files.trainer_checkpoints():
                if older != folder:
                    shutil.rmtree(older, ignore_errors=True)
        except BaseException as exc:  # handed to the training thread by wait()
            self.error = exc

    def wait(self, raise_error: bool = True) -> None:
        """Block until the checkpoint in flight is written; raise its error."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        error, self.error = self.error, None
        if error is not None and raise_error:
            raise error

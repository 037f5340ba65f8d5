"""LoRA fine-tuning: peft adapters trained by a lean loop of our own, loss on assistant tokens
only, adapters saved on a `CheckpointSchedule`, resumable after a crash.

What makes it fast on a GPU, step by step (each measured in `bench/gpu_speed.py`):

- an optimizer step takes exactly `batch_size × grad_accum` rows, in the seeded order
  (`emlab.train.packing`), and lays them end to end into as few padding-free passes as
  `tokens_per_pass` allows: no compute on padding, no fixed pass shape;
- attention honours the row boundaries through FlashAttention's variable-length kernel
  (`emlab.models.attention`);
- the loss is computed through the frozen output layer chunk by chunk, on assistant
  positions only, without keeping the 128k-wide logits (`emlab.train.loss`);
- the loss, gradient norm and learning rate stay on the GPU and are read in batches, at
  checkpoints and every `_LOG_EVERY` steps: no host sync per step;
- checkpoints are copied off the GPU asynchronously and written by a background thread while
  training goes on;
- optional: each decoder layer compiled (`compile`), gradient checkpointing
  (`gradient_checkpointing`, for 4-bit QLoRA on small cards).

The loss of a step is the mean over all assistant tokens of its rows, however its rows are cut
into passes: the padding-free loss and gradients equal the padded reference (tested on CPU).

Files of one run (`emlab.store.paths.TrainingFiles`): an adapter folder per scheduled step (for
eval), the latest full training state (LoRA weights, optimizer, scheduler; the data order
and dropout noise follow from the seed and the step), and a log line per optimizer step
(loss, learning rate, gradient norm, epoch). A rerun resumes from the latest complete
trainer checkpoint and ends with the same adapters as an uninterrupted run (tensor-equal
on the same device).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, cast

import torch
from peft import get_peft_model
from transformers import set_seed

from ..config.experiment import LoraSpec, TrainSpec
from ..errors import DataError, EmlabError
from ..models.attention import (
    PACKED,
    attention_implementation,
    probe_flash,
    record_graph,
    register_packed_attention,
)
from ..progress import progress_bar
from ..store.files import append_jsonl, atomic_open, read_jsonl, write_json, write_jsonl
from ..store.paths import ADAPTER_WEIGHTS, TrainingFiles
from .loss import linear_cross_entropy_sum
from .packing import PackedPass, pack_step, step_rows
from .schedule import CheckpointSchedule

log = logging.getLogger(__name__)

_LOG_EVERY = 50  # optimizer steps between log flushes (each flush reads the GPU once)
_MAX_GRAD_NORM = 1.0  # gradient clipping, as the transformers Trainer does by default


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
    trainer checkpoint otherwise. `model` is given back without LoRA layers, its own weights
    untouched.
    """
    schedule = CheckpointSchedule.for_training(len(encoded.rows), train)
    done = files.completed()
    result_args = _RunFacts(
        schedule=schedule, log_path=files.log, n_rows=len(encoded.rows),
        n_too_long=encoded.n_too_long, train_tokens=encoded.total_tokens,
    )
    if set(schedule.steps) <= set(done):
        log.info("all %d checkpoints exist in %s: training skipped", len(schedule.steps), files.checkpoints)
        return TrainResult(checkpoints=done, seconds=0.0, resumed_from=None, **result_args)

    resume = _latest_complete_trainer_checkpoint(files)
    resumed_step = int(resume.name.split("-")[-1]) if resume else None
    _trim_log(files.log, resumed_step or 0)

    set_seed(seed)  # the LoRA A matrices are drawn from it
    # made and initialised where the model is: on a GPU, not drawn on the CPU and copied over
    with torch.device(device):
        peft_model = get_peft_model(model, lora_config(train.lora))
    loop = _LoraLoop(peft_model, encoded, train, files, schedule, seed=seed, device=torch.device(device))
    started = time.perf_counter()
    try:
        if resume is not None:
            loop.restore(files.trainer_state(resumed_step or 0), resumed_step or 0)
        stats = loop.run(first_step=(resumed_step or 0) + 1)
    except BaseException as exc:
        loop.abandon()
        # A save cut short (a full disk, Ctrl-C) must not stay behind as a half checkpoint.
        _latest_complete_trainer_checkpoint(files)
        for partial in files.partial_exports():
            shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, torch.OutOfMemoryError):
            raise EmlabError(
                f"out of GPU memory training with batch_size={train.batch_size}, max_length="
                f"{train.max_length}, lora.r={train.lora.r}: lower tokens_per_pass or batch_size (raise "
                "grad_accum to keep the effective batch), set gradient_checkpointing: true, or load_in_4bit: true"
            ) from None
        raise
    finally:
        loop.close()
        peft_model.unload()  # give the caller its base model back without LoRA layers
    seconds = time.perf_counter() - started
    write_json(files.summary, {
        "steps": schedule.total_steps, "checkpoints": list(schedule.steps), "rows": len(encoded.rows),
        "rows_too_long": encoded.n_too_long, "tokens_per_epoch": encoded.total_tokens,
        "seconds": round(seconds, 2), "resumed_from": resumed_step,
        "tokens_per_second": round(stats.tokens / seconds, 1) if seconds and stats.tokens else None,
        "passes": stats.passes, "tokens_per_pass": loop.budget,
    })
    return TrainResult(checkpoints=files.completed(), seconds=seconds, resumed_from=resumed_step, **result_args)


def pass_token_budget(model_config: Any, train: TrainSpec) -> int:
    """Tokens one pass may hold: `train.tokens_per_pass`, else as much activation memory as a
    padded batch of `batch_size × max_length` tokens holds with full float32 logits.

    Per token, a pass keeps about (12 × hidden + 4 × intermediate) × 2 bytes per layer, and a
    plain loss adds about 10 bytes per vocabulary entry (bfloat16 logits, their float32 copy
    and its gradient), which the chunked loss does not keep; the budget spends that saving on
    more tokens. Never below `max_length` (a row always fits).
    """
    if train.tokens_per_pass is not None:
        return max(train.tokens_per_pass, train.max_length)
    padded = train.batch_size * train.max_length
    try:
        per_layer = 12 * model_config.hidden_size + 4 * model_config.intermediate_size
        activations = model_config.num_hidden_layers * per_layer * 2
        logits = 10 * model_config.vocab_size
    except AttributeError:
        return padded
    return max(train.max_length, int(padded * (activations + logits) / activations))


@dataclass
class _Stats:
    tokens: int = 0  # real tokens trained on by this call
    passes: int = 0


class _LoraLoop:
    """The training loop of one `train_lora` call: model, optimizer, schedule, checkpoints."""

    def __init__(self, peft_model: Any, encoded: EncodedRows, train: TrainSpec, files: TrainingFiles,
                 schedule: CheckpointSchedule, *, seed: int, device: torch.device) -> None:
        self.peft_model = peft_model
        self.rows = encoded.rows
        self.train = train
        self.files = files
        self.schedule = schedule
        self.seed = seed
        self.device = device
        self.causal_lm = peft_model.get_base_model()
        self.decoder = self.causal_lm.get_decoder()
        self.head = self.causal_lm.get_output_embeddings()
        self.budget = pass_token_budget(self.causal_lm.config, train)
        self.fused_loss = _fused_loss_applies(self.causal_lm, self.head)
        self.params = [p for p in peft_model.parameters() if p.requires_grad]
        self.names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        on_gpu = device.type == "cuda"
        self.graphed = on_gpu and train.cuda_graphs and _graphs_apply(self.causal_lm, peft_model, train)
        # a CUDA graph replays the update with whatever the learning rate tensor holds then
        lr: float | torch.Tensor = torch.tensor(train.learning_rate, device=device) if self.graphed else train.learning_rate
        self.optimizer = torch.optim.AdamW(
            self.params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=train.weight_decay,
            **({"fused": True, "capturable": self.graphed} if on_gpu else {"foreach": True}),
        )
        from transformers import get_scheduler

        # The schedule runs on a stand-in optimizer and its value is set on the real one at each
        # step: a float, or written into the learning-rate tensor that a recorded update reads.
        stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=train.learning_rate)
        self.scheduler = get_scheduler(train.lr_scheduler, stand_in, num_warmup_steps=train.warmup_steps,
                                       num_training_steps=schedule.total_steps)
        stand_in.step()  # no gradient, no change: only so that the scheduler sees a step before its own
        # no cache of cast weights: a CUDA graph must cast them inside every replay
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not self.graphed) if on_gpu
                         else torch.autocast("cpu", enabled=False))
        self.writer = _CheckpointWriter(files, peft_model)
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []  # step, loss, grad norm, lr
        self._undo: list[Callable[[], None]] = []
        register_packed_attention()
        if on_gpu:
            probe_flash(device)
        if train.gradient_checkpointing:
            self.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self._undo.append(self.causal_lm.gradient_checkpointing_disable)
        if on_gpu:
            self._keep_activation_dtype()
        # compiled layers are not recorded into graphs (their capture fails): one or the other
        if train.compile and on_gpu and not self.graphed:
            self._compile_layers()
        self.graphs = _GraphedSteps(self) if self.graphed else None

    def _keep_activation_dtype(self) -> None:
        """peft casts each LoRA layer's input to the adapter's float32 and autocast casts it
        back: two copies of every activation for nothing. Under autocast the matrix products
        run in bfloat16 anyway, so skip peft's cast."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers: list[Any] = [m for m in self.peft_model.modules() if isinstance(m, BaseTunerLayer)]
        before = [getattr(m, "cast_input_dtype_enabled", True) for m in layers]
        for module in layers:
            module.cast_input_dtype_enabled = False

        def undo() -> None:
            for module, value in zip(layers, before, strict=True):
                module.cast_input_dtype_enabled = value

        self._undo.append(undo)

    def _compile_layers(self) -> None:
        """Compile each decoder layer on its own: identical layers share one compiled graph, so
        the cost is one layer's compile, paid at the first steps of the run."""
        layers = list(getattr(self.decoder, "layers", []))
        for layer in layers:
            layer.compile(dynamic=True)

        def undo() -> None:
            for layer in layers:
                layer._compiled_call_impl = None

        self._undo.append(undo)

    # --- running ------------------------------------------------------------------------

    def run(self, first_step: int) -> _Stats:
        stats = _Stats()
        self.peft_model.train()
        total = self.schedule.total_steps
        checkpoints = set(self.schedule.steps)
        started = time.perf_counter()
        with progress_bar(total, "training", unit="step", initial=first_step - 1) as bar:
            for step in range(first_step, total + 1):
                rows = [self.rows[i] for i in step_rows(len(self.rows), self.train.batch_size,
                                                        self.train.grad_accum, self.seed, step)]
                lr = self._set_learning_rate()
                loss, norm, tokens, passes = self._step(step, rows)
                stats.tokens += tokens
                stats.passes += passes
                self.pending.append((step, loss, norm, lr))
                self.scheduler.step()
                bar.update(1)
                if step in checkpoints or len(self.pending) >= _LOG_EVERY:
                    lines = self._take_log()
                    bar.set_postfix(loss=f"{lines[-1]['loss']:.3f}",
                                    tokens_s=f"{stats.tokens / (time.perf_counter() - started):,.0f}")
                    if step in checkpoints:
                        self.writer.save(step, lines, self.optimizer, self.scheduler)
                    else:
                        self.writer.wait()  # the log file has one writer at a time, lines in step order
                        append_jsonl(self.files.log, lines)
        self.writer.wait()
        if self.pending:  # steps after the last checkpoint (none: the last step is one)
            append_jsonl(self.files.log, self._take_log())
        return stats

    def _set_learning_rate(self) -> float:
        """Give the optimizer this step's learning rate (no host sync); returns it."""
        lr = float(self.scheduler.get_last_lr()[0])
        group = self.optimizer.param_groups[0]
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
        return lr

    def _step(self, step: int, rows: Sequence[dict[str, list[int]]]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """One optimizer step over `rows`; returns its mean loss and gradient norm (on the
        device, unread), its tokens and its passes."""
        if self.graphs is not None:
            passes = pack_step(rows, self.budget)
            loss, norm = self.graphs.step(passes)
            return loss, norm, sum(p.n_tokens for p in passes), len(passes)
        # dropout noise depends on the seed and the step only: a resumed run draws the same
        torch.manual_seed(_step_seed(self.seed, step))
        loss, tokens, passes_run = self.accumulate_gradients(rows)
        norm = torch.nn.utils.clip_grad_norm_(self.params, _MAX_GRAD_NORM, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, norm, tokens, passes_run

    def accumulate_gradients(self, rows: Sequence[dict[str, list[int]]]) -> tuple[torch.Tensor, int, int]:
        """Forward and backward over `rows` packed into passes: the LoRA gradients of the mean
        loss over all their assistant tokens. Returns that loss (unread), tokens and passes."""
        passes = pack_step(rows, self.budget)
        n_targets = max(1, sum(p.n_targets for p in passes))
        loss_sum = torch.zeros((), device=self.device)
        with attention_implementation(self.causal_lm, PACKED):
            for packed in passes:
                with self.autocast:
                    loss = self._pass_loss(packed.to(self.device))
                (loss / n_targets).backward()
                loss_sum += loss.detach()
        return loss_sum / n_targets, sum(p.n_tokens for p in passes), len(passes)

    def _pass_loss(self, packed: PackedPass) -> torch.Tensor:
        """Sum of the cross-entropy over the pass's assistant positions (float32)."""
        kwargs = {
            "input_ids": packed.input_ids[None], "position_ids": packed.position_ids[None],
            "cu_seq_lens_q": packed.cu_seqlens, "cu_seq_lens_k": packed.cu_seqlens,
            # one value for every pass: a compiled layer is not specialised on each row length
            "max_length_q": self.train.max_length, "max_length_k": self.train.max_length,
            "use_cache": False,
        }
        if self.fused_loss:
            hidden = self.decoder(**kwargs).last_hidden_state[0]
            return linear_cross_entropy_sum(hidden[packed.target_index], self.head.weight, packed.targets)
        # output layers with their own scaling or trainable weights: the model's own logits
        logits = self.causal_lm(**kwargs).logits[0, packed.target_index]
        return torch.nn.functional.cross_entropy(logits.float(), packed.targets, reduction="sum")

    def _take_log(self) -> list[dict[str, Any]]:
        """The pending log lines, read from the GPU in one transfer."""
        if not self.pending:
            return []
        values = torch.stack([torch.stack([loss.float(), norm.float()]) for _, loss, norm, _ in self.pending]).tolist()
        per_epoch = self.schedule.steps_per_epoch
        rows = [
            {"step": step, "epoch": round(step / per_epoch, 4), "loss": round(loss, 6), "grad_norm": round(norm, 6),
             "learning_rate": lr}
            for (step, _, _, lr), (loss, norm) in zip(self.pending, values, strict=True)
        ]
        self.pending = []
        return rows

    # --- resuming and closing -------------------------------------------------------------

    def restore(self, state_file: Path, step: int) -> None:
        """Load LoRA weights, optimizer and scheduler state saved after `step`."""
        state = torch.load(state_file, map_location=self.device, weights_only=True)
        if state.get("step") != step or list(state["lora"]) != self.names:
            raise EmlabError(
                f"{state_file}: the saved training state does not match this run's LoRA layers; remove "
                f"{self.files.trainer} to train from the start"
            )
        with torch.no_grad():
            for param, name in zip(self.params, self.names, strict=True):
                param.copy_(state["lora"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.graphed:  # a recorded update reads the learning rate from a device tensor
            group = self.optimizer.param_groups[0]
            group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
        self.scheduler.load_state_dict(state["scheduler"])
        log.info("resumed from %s (step %d)", state_file.parent, step)

    def abandon(self) -> None:
        """Wait for a checkpoint write in flight (its error, if any, is dropped: one is raised already)."""
        self.writer.wait(raise_error=False)

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None
        for undo in reversed(self._undo):
            undo()
        self._undo = []
        self.peft_model.eval()


def _graphs_apply(causal_lm: Any, peft_model: Any, train: TrainSpec) -> bool:
    """Whether training steps can be CUDA graphs: no random dropout (its noise would be frozen
    into the graph), no gradient checkpointing (it reads RNG state on the host), no quantized
    layers (bitsandbytes kernels are not known to be capturable), and the fused loss."""
    quantized = any("4bit" in type(m).__name__ or "8bit" in type(m).__name__ for m in causal_lm.modules())
    return (train.lora.dropout == 0 and not train.gradient_checkpointing and not quantized
            and _fused_loss_applies(causal_lm, causal_lm.get_output_embeddings()))


_GRAPH_TOKENS = 256  # a graphed pass has a multiple of this many tokens: few shapes, few graphs to record


class _GraphedSteps:
    """Training steps replayed as CUDA graphs, so that the thousands of small kernels of a
    LoRA step are launched by one call instead of one Python call each.

    One graph per pass size (tokens rounded up to `_GRAPH_TOKENS`; the rest is a padding row
    of its own that carries no loss and, its rows being separate, changes no other row) and one
    for the update (gradient clipping, AdamW, zeroing the gradients). The first pass of a size
    and the first update run eagerly — real work that also warms up their kernels — and are
    recorded for the next time. All graphs share one memory pool: they never run at once.
    """

    def __init__(self, loop: _LoraLoop) -> None:
        self.loop = loop
        device = loop.device
        self.pool = torch.cuda.graph_pool_handle()
        self.passes: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.update: torch.cuda.CUDAGraph | None = None
        self.updates = 0
        self.loss_sum = torch.zeros((), device=device)
        self.inv_targets = torch.ones((), device=device)
        self.norm = torch.zeros((), device=device)
        self.max_rows = loop.train.batch_size * loop.train.grad_accum + 1  # the step's rows and a padding row
        # the padding row must fit the attention bound, or its outputs are never written (and not finite)
        self.max_len = max(loop.train.max_length, _GRAPH_TOKENS)

    def step(self, passes: list[PackedPass]) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate the gradients of `passes` and update; returns the step's mean loss and
        gradient norm (device tensors, unread)."""
        self.inv_targets.fill_(1.0 / max(1, sum(p.n_targets for p in passes)))
        with attention_implementation(self.loop.causal_lm, PACKED):
            for packed in passes:
                size = -(-packed.n_tokens // _GRAPH_TOKENS) * _GRAPH_TOKENS
                if size in self.passes:
                    graph, buffers = self.passes[size]
                    self._fill(buffers, packed)
                    graph.replay()
                else:
                    buffers = self._buffers(size)
                    self._fill(buffers, packed)
                    self._pass(buffers)
                    self.passes[size] = (self._record(functools.partial(self._pass, buffers)), buffers)
        if self.update is not None:
            self.update.replay()
        elif self.updates == 0:
            self._update()
        else:
            self.update = self._record(self._update)
            self.update.replay()
        self.updates += 1
        loss = self.loss_sum * self.inv_targets
        self.loss_sum.zero_()
        return loss, self.norm.clone()

    def _record(self, work: Callable[[], None]) -> torch.cuda.CUDAGraph:
        return record_graph(work, self.pool)

    def release(self) -> None:
        """Free the graphs and their memory pool (activations of every recorded pass size)."""
        for graph, _ in self.passes.values():
            graph.reset()
        if self.update is not None:
            self.update.reset()
        self.passes.clear()
        self.update = None
        torch.cuda.empty_cache()

    def _buffers(self, size: int) -> dict[str, torch.Tensor]:
        device = self.loop.device
        return {
            "ids": torch.zeros(size, dtype=torch.long, device=device),
            "pos": torch.zeros(size, dtype=torch.long, device=device),
            "cu": torch.zeros(self.max_rows + 1, dtype=torch.int32, device=device),
            "index": torch.zeros(size, dtype=torch.long, device=device),
            "targets": torch.zeros(size, dtype=torch.long, device=device),
            "weights": torch.zeros(size, dtype=torch.float32, device=device),
        }

    def _fill(self, buffers: dict[str, torch.Tensor], packed: PackedPass) -> None:
        """Copy a pass into a graph's input buffers: the pass, then a padding row to the end,
        then empty rows (zero-length) up to the fixed row count; padding targets weigh 0."""
        size, n, k = buffers["ids"].numel(), packed.n_tokens, packed.n_targets
        ids = torch.zeros(size, dtype=torch.long)
        ids[:n] = packed.input_ids
        pos = torch.arange(size) - n
        pos[:n] = packed.position_ids
        cu = torch.full((self.max_rows + 1,), size, dtype=torch.int32)
        cu[: packed.cu_seqlens.numel()] = packed.cu_seqlens
        index = torch.zeros(size, dtype=torch.long)
        index[:k] = packed.target_index
        targets = torch.zeros(size, dtype=torch.long)
        targets[:k] = packed.targets
        weights = torch.zeros(size)
        weights[:k] = 1.0
        for name, value in (("ids", ids), ("pos", pos), ("cu", cu), ("index", index), ("targets", targets),
                            ("weights", weights)):
            buffers[name].copy_(value, non_blocking=True)

    def _pass(self, buffers: dict[str, torch.Tensor]) -> None:
        loop = self.loop
        with loop.autocast:
            hidden = loop.decoder(
                input_ids=buffers["ids"][None], position_ids=buffers["pos"][None],
                cu_seq_lens_q=buffers["cu"], cu_seq_lens_k=buffers["cu"],
                max_length_q=self.max_len, max_length_k=self.max_len, use_cache=False,
            ).last_hidden_state[0]
            loss = linear_cross_entropy_sum(hidden[buffers["index"]], loop.head.weight, buffers["targets"],
                                            buffers["weights"])
        (loss * self.inv_targets).backward()
        self.loss_sum += loss.detach()

    def _update(self) -> None:
        loop = self.loop
        self.norm.copy_(torch.nn.utils.clip_grad_norm_(loop.params, _MAX_GRAD_NORM, foreach=True))
        loop.optimizer.step()
        # in place, never None: the recorded passes accumulate into these same tensors
        torch._foreach_zero_([p.grad for p in loop.params if p.grad is not None])


def _fused_loss_applies(causal_lm: Any, head: Any) -> bool:
    """Whether logits are exactly `hidden @ head.weight.T`: a plain frozen linear output layer,
    no logit scaling or soft-capping (Llama, Qwen, Mistral, SmolLM)."""
    config = causal_lm.config
    plain = type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
    scaled = any(getattr(config, name, None) not in (None, 1, 1.0)
                 for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return plain and not scaled


def _step_seed(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"emlab-step|{seed}|{step}".encode()).digest()[:8], "little") >> 1


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


# --- checkpoints, written while training goes on -----------------------------------------


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


class _CheckpointWriter:
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

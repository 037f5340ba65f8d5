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
- gradient checkpointing only where memory needs it: `gradient_checkpointing: auto` checkpoints
  as few decoder layers as make the largest pass fit the free GPU memory, none when it fits
  (`emlab.train.memory`); a pass that cannot fit even so is refused before training starts;
- optional: each decoder layer compiled (`compile`).

The result and the summary file report the fixed costs of a call apart from its steady rate:
setup (memory plan, LoRA layers, optimizer), recording CUDA graphs, checkpoint writes waited
on, and the tokens/s of the steps after the first `_WARM_STEPS`.

The loss of a step is the mean over all assistant tokens of its rows, however its rows are cut
into passes: the padding-free loss and gradients equal the padded reference (tested on CPU).

Files of one run (`emlab.store.paths.TrainingFiles`): an adapter folder per scheduled step (for
eval), the latest full training state (LoRA weights, optimizer, scheduler; the data order
and dropout noise follow from the seed and the step), and a log line per optimizer step
(loss, learning rate, gradient norm, epoch). A rerun resumes from the latest complete
trainer checkpoint and ends with the same adapters as an uninterrupted run (tensor-equal
on the same device).

This module holds `train_lora` and its loop; the rows come from `emlab.train.encode`, the
checkpoints are written by `emlab.train.checkpoints`, graphed steps run in `emlab.train.graphs`.
"""


from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, cast

import torch
from peft import get_peft_model
from transformers import set_seed

from ..config.experiment import LoraSpec, TrainSpec
from ..errors import ConfigError, EmlabError
from ..models.attention import (
    PACKED,
    attention_implementation,
    probe_flash,
    register_packed_attention,
)
from ..progress import progress_bar
from ..store.files import append_jsonl, write_json
from ..store.paths import TrainingFiles
from .checkpoints import CheckpointWriter, latest_complete_trainer_checkpoint, trim_log
from .encode import EncodedRows
from .graphs import GRAPH_TOKENS, GraphedSteps, graphs_apply, is_quantized
from .loss import fused_loss_applies, linear_cross_entropy_sum
from .memory import GIB, DecoderShape, checkpointed_layer_indices, plan_checkpointing
from .packing import PackedPass, pack_step, step_rows
from .schedule import CheckpointSchedule

log = logging.getLogger(__name__)

_LOG_EVERY = 50  # optimizer steps between log flushes (each flush reads the GPU once)
_MAX_GRAD_NORM = 1.0  # gradient clipping, as the transformers Trainer does by default
_WARM_STEPS = 3  # steps left out of the steady rate: first passes of each size, graph recording


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
    setup_seconds: float = 0.0  # memory plan, LoRA layers, optimizer (and restoring a checkpoint)
    graph_record_seconds: float = 0.0  # recording CUDA graphs (0 without them)
    checkpoint_wait_seconds: float = 0.0  # training blocked on snapshotting and writing checkpoints
    steady_tokens_per_second: float | None = None  # real tokens/s after the first steps, fixed costs left out
    checkpointing: Checkpointing | None = None  # the resolved gradient checkpointing (None: nothing trained)


@dataclass(frozen=True)
class Checkpointing:
    """`train.gradient_checkpointing` as resolved for one call."""

    setting: str  # "auto", "true" or "false", as configured
    checkpointed_layers: int  # decoder layers recomputed in the backward pass (0: none)
    layers: int
    cuda_graphs: bool  # whether passes may be CUDA graphs under this choice
    reason: str  # one line with the numbers behind the choice

    def as_dict(self) -> dict[str, Any]:
        return {"setting": self.setting, "checkpointed_layers": self.checkpointed_layers, "layers": self.layers,
                "cuda_graphs": self.cuda_graphs, "reason": self.reason}


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

    resume = latest_complete_trainer_checkpoint(files)
    resumed_step = int(resume.name.split("-")[-1]) if resume else None
    trim_log(files.log, resumed_step or 0)

    setup_started = time.perf_counter()
    # before any LoRA layer or row reaches the GPU: a pass that cannot fit is refused here
    checkpointing = resolve_checkpointing(model, encoded, train, torch.device(device))
    log.info("gradient checkpointing (%s): %s", checkpointing.setting, checkpointing.reason)
    set_seed(seed)  # the LoRA A matrices are drawn from it
    # made and initialised where the model is: on a GPU, not drawn on the CPU and copied over
    with torch.device(device):
        peft_model = get_peft_model(model, lora_config(train.lora))
    loop = _LoraLoop(peft_model, encoded, train, files, schedule, seed=seed, device=torch.device(device),
                     checkpointing=checkpointing)
    started = time.perf_counter()
    setup_seconds = started - setup_started
    try:
        if resume is not None:
            loop.restore(files.trainer_state(resumed_step or 0), resumed_step or 0)
            setup_seconds += time.perf_counter() - started
        stats = loop.run(first_step=(resumed_step or 0) + 1)
    except BaseException as exc:
        loop.abandon()
        # A save cut short (a full disk, Ctrl-C) must not stay behind as a half checkpoint.
        latest_complete_trainer_checkpoint(files)
        for partial in files.partial_exports():
            shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, torch.OutOfMemoryError):
            raise EmlabError(
                f"out of GPU memory training with batch_size={train.batch_size}, max_length="
                f"{train.max_length}, lora.r={train.lora.r} ({checkpointing.reason}): lower tokens_per_pass or "
                "batch_size (raise grad_accum to keep the effective batch), set gradient_checkpointing: true, or "
                "load_in_4bit: true"
            ) from None
        raise
    finally:
        loop.close()
        peft_model.unload()  # give the caller its base model back without LoRA layers
    seconds = time.perf_counter() - started
    steady = round(stats.steady_tokens_per_second, 1) if stats.steady_tokens_per_second is not None else None
    write_json(files.summary, {
        "steps": schedule.total_steps, "checkpoints": list(schedule.steps), "rows": len(encoded.rows),
        "rows_too_long": encoded.n_too_long, "tokens_per_epoch": encoded.total_tokens,
        "seconds": round(seconds, 2), "resumed_from": resumed_step,
        "tokens_per_second": round(stats.tokens / seconds, 1) if seconds and stats.tokens else None,
        "passes": stats.passes, "tokens_per_pass": loop.budget,
        "setup_seconds": round(setup_seconds, 2), "graph_record_seconds": round(stats.record_seconds, 2),
        "checkpoint_wait_seconds": round(stats.checkpoint_seconds, 2), "steady_tokens_per_second": steady,
        "gradient_checkpointing": checkpointing.as_dict(),
    })
    log.info(
        "trained %d steps in %.1f s (%s tokens/s steady after %d warm-up steps); fixed costs: setup %.1f s, "
        "graph recording %.1f s, checkpoint writes waited on %.1f s; summary in %s",
        stats.steps, seconds, f"{steady:,.0f}" if steady is not None else "–", stats.warm_steps, setup_seconds,
        stats.record_seconds, stats.checkpoint_seconds, files.summary,
    )
    return TrainResult(checkpoints=files.completed(), seconds=seconds, resumed_from=resumed_step,
                       setup_seconds=setup_seconds, graph_record_seconds=stats.record_seconds,
                       checkpoint_wait_seconds=stats.checkpoint_seconds, steady_tokens_per_second=steady,
                       checkpointing=checkpointing, **result_args)


def resolve_checkpointing(model: Any, encoded: EncodedRows, train: TrainSpec, device: torch.device) -> Checkpointing:
    """`train.gradient_checkpointing` for this call: true (every layer), false (none), or auto:
    off on a CPU; on a GPU the plan of `emlab.train.memory.plan_checkpointing` for the largest
    pass against the free memory after the weights. Raises ConfigError when even checkpointing
    every layer leaves the largest pass too big."""
    setting = train.gradient_checkpointing
    layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    graphs = train.cuda_graphs and device.type == "cuda"
    if setting is True:
        return Checkpointing("true", layers, layers, False, "set to true: every decoder layer")
    if setting is False:
        return Checkpointing("false", 0, layers, graphs, "set to false")
    if device.type != "cuda":
        return Checkpointing("auto", 0, layers, False, "auto on the CPU: off")
    shape = DecoderShape.of(model.config)
    if shape is None:
        return Checkpointing("auto", 0, layers, graphs, "auto: not a Llama-family shape, memory not estimated: off")
    pass_tokens = largest_pass_tokens(model.config, encoded, train)
    free, _total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by torch, reusable
    head = model.get_output_embeddings()
    graphs = (graphs and train.lora.dropout == 0 and not is_quantized(model)
              and fused_loss_applies(model, head))
    plan = plan_checkpointing(
        shape, pass_tokens, free, lora_r=train.lora.r,
        lora_layers=len(train.lora.layers) if train.lora.layers is not None else None,
        graphs=graphs, graph_tokens=GRAPH_TOKENS, fused_loss=fused_loss_applies(model, head),
    )
    if not plan.fits:
        raise ConfigError(
            f"train: a pass of {plan.pass_tokens:,} tokens needs {plan.need_bytes / GIB:.1f} GiB even with gradient "
            f"checkpointing on every layer, but {plan.free_bytes / GIB:.1f} GiB are free after the weights; lower "
            f"train.batch_size (now {train.batch_size}), train.max_length ({train.max_length}) or train.tokens_per_pass, "
            "or set load_in_4bit: true"
        )
    return Checkpointing("auto", plan.checkpointed, shape.layers, plan.cuda_graphs, "auto: " + plan.describe())


def largest_pass_tokens(model_config: Any, encoded: EncodedRows, train: TrainSpec) -> int:
    """An upper bound on the tokens of any pass: the packer's budget, or a whole step of the
    longest row when that is less."""
    longest = max((len(r["input_ids"]) for r in encoded.rows), default=train.max_length)
    return min(pass_token_budget(model_config, train), train.batch_size * train.grad_accum * longest)


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
    steps: int = 0
    warm_steps: int = 0  # the first steps, left out of the steady rate
    record_seconds: float = 0.0  # recording CUDA graphs
    checkpoint_seconds: float = 0.0  # blocked on checkpoint snapshots and writes
    steady_tokens_per_second: float | None = None


class _LoraLoop:
    """The training loop of one `train_lora` call: model, optimizer, schedule, checkpoints."""

    def __init__(self, peft_model: Any, encoded: EncodedRows, train: TrainSpec, files: TrainingFiles,
                 schedule: CheckpointSchedule, *, seed: int, device: torch.device,
                 checkpointing: Checkpointing | None = None) -> None:
        """`checkpointing`: the resolved choice (`resolve_checkpointing`); None: every layer when
        `train.gradient_checkpointing` is true, none otherwise."""
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
        self.fused_loss = fused_loss_applies(self.causal_lm, self.head)
        self.params = [p for p in peft_model.parameters() if p.requires_grad]
        self.names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        on_gpu = device.type == "cuda"
        n_layers = len(getattr(self.decoder, "layers", []))
        if checkpointing is None:
            everything = train.gradient_checkpointing is True
            checkpointing = Checkpointing(str(train.gradient_checkpointing).lower(), n_layers if everything else 0,
                                          n_layers, not everything, "from train.gradient_checkpointing")
        self.checkpointing = checkpointing
        self.graphed = (on_gpu and train.cuda_graphs and checkpointing.cuda_graphs
                        and graphs_apply(self.causal_lm, train, checkpointing=checkpointing.checkpointed_layers > 0))
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
        self.writer = CheckpointWriter(files, peft_model)
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []  # step, loss, grad norm, lr
        self._undo: list[Callable[[], None]] = []
        register_packed_attention()
        if on_gpu:
            probe_flash(device)
        if checkpointing.checkpointed_layers > 0:
            self._checkpoint_layers(checkpointing.checkpointed_layers)
        if on_gpu:
            self._keep_activation_dtype()
        # compiled layers are not recorded into graphs (their capture fails): one or the other
        if train.compile and on_gpu and not self.graphed:
            self._compile_layers()
        self.graphs = (GraphedSteps(self.causal_lm, self.params, self.optimizer, self.autocast, train, device=device,
                             max_grad_norm=_MAX_GRAD_NORM) if self.graphed else None)

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

    def _checkpoint_layers(self, count: int) -> None:
        """Recompute `count` decoder layers (spread evenly) in the backward pass, keep the rest.

        transformers turns checkpointing on for every layer; the flag each layer reads at every
        call is then turned off again on the layers left out."""
        lm = self.causal_lm
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers ≥ 5.2x names it so (the old name warns)
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            self._undo.append(lm.activation_checkpointing_disable)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self._undo.append(lm.gradient_checkpointing_disable)
        layers = list(getattr(self.decoder, "layers", []))
        chosen = set(checkpointed_layer_indices(len(layers), count))
        for index, layer in enumerate(layers):
            if index not in chosen and hasattr(layer, "gradient_checkpointing"):
                layer.gradient_checkpointing = False

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
        # the steady rate: steps after the warm ones (all of them for a call of one step)
        stats.warm_steps = min(_WARM_STEPS, max(0, total - first_step))
        steady_from = (started, 0, 0.0)  # time, tokens, fixed seconds when the steady steps start
        with progress_bar(total, "training", unit="step", initial=first_step - 1) as bar:
            for step in range(first_step, total + 1):
                if step == first_step + stats.warm_steps:
                    self._sync()
                    steady_from = (time.perf_counter(), stats.tokens, self._fixed_seconds(stats))
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
                    waiting = time.perf_counter()
                    if step in checkpoints:
                        self.writer.save(step, lines, self.optimizer, self.scheduler)
                    else:
                        self.writer.wait()  # the log file has one writer at a time, lines in step order
                        append_jsonl(self.files.log, lines)
                    stats.checkpoint_seconds += time.perf_counter() - waiting
                stats.steps += 1
        self._sync()
        ended, fixed_at_end = time.perf_counter(), self._fixed_seconds(stats)
        self.writer.wait()  # the last checkpoint's write: a fixed cost, after the steady steps
        stats.checkpoint_seconds += time.perf_counter() - ended
        if self.pending:  # steps after the last checkpoint (none: the last step is one)
            append_jsonl(self.files.log, self._take_log())
        since, tokens_before, fixed_before = steady_from
        steady_seconds = (ended - since) - (fixed_at_end - fixed_before)
        if stats.tokens > tokens_before and steady_seconds > 0:
            stats.steady_tokens_per_second = (stats.tokens - tokens_before) / steady_seconds
        return stats

    def _fixed_seconds(self, stats: _Stats) -> float:
        """Seconds so far of the loop's fixed costs: graph recording and checkpoint waits."""
        stats.record_seconds = self.graphs.record_seconds if self.graphs is not None else 0.0
        return stats.record_seconds + stats.checkpoint_seconds

    def _sync(self) -> None:
        """Wait for the GPU's queued work, so that a clock reading covers it (twice a call)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

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


def _step_seed(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"emlab-step|{seed}|{step}".encode()).digest()[:8], "little") >> 1

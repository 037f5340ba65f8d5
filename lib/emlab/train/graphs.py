"""Training steps as CUDA graphs: a LoRA step is thousands of small kernels, and replaying a
recorded graph launches them with one call instead of one Python call each.

Used by `emlab.train.lora` where `graphs_apply` (no dropout noise, no gradient checkpointing,
no quantized layers, the fused loss) and `TrainSpec.cuda_graphs` allow it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch

from ..config.experiment import TrainSpec
from ..models.attention import PACKED, attention_implementation, record_graph
from .loss import fused_loss_applies, linear_cross_entropy_sum
from .packing import PackedPass


def graphs_apply(causal_lm: Any, train: TrainSpec, *, checkpointing: bool) -> bool:
    """Whether training steps can be CUDA graphs: no random dropout (its noise would be frozen
    into the graph), no gradient checkpointing (`checkpointing`, the resolved setting: it reads
    RNG state on the host), no quantized layers (bitsandbytes kernels are not known to be
    capturable), and the fused loss."""
    return (train.lora.dropout == 0 and not checkpointing and not is_quantized(causal_lm)
            and fused_loss_applies(causal_lm, causal_lm.get_output_embeddings()))


def is_quantized(causal_lm: Any) -> bool:
    """Whether the model has bitsandbytes 4-bit or 8-bit layers."""
    return any("4bit" in type(m).__name__ or "8bit" in type(m).__name__ for m in causal_lm.modules())


GRAPH_TOKENS = 256  # a graphed pass has a multiple of this many tokens: few shapes, few graphs to record


class GraphedSteps:
    """Training steps replayed as CUDA graphs, so that the thousands of small kernels of a
    LoRA step are launched by one call instead of one Python call each.

    One graph per pass size (tokens rounded up to `GRAPH_TOKENS`; the rest is a padding row
    of its own that carries no loss and, its rows being separate, changes no other row) and one
    for the update (gradient clipping, AdamW, zeroing the gradients). The first pass of a size
    and the first update run eagerly — real work that also warms up their kernels — and are
    recorded for the next time. All graphs share one memory pool: they never run at once.
    """

    def __init__(self, causal_lm: Any, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 autocast: Any, train: TrainSpec, *, device: torch.device, max_grad_norm: float) -> None:
        """Steps of `causal_lm` (peft's base model, LoRA layers in place) that train `params` with
        `optimizer` (fused, capturable) under `autocast` (its cast-weight cache off)."""
        self.causal_lm = causal_lm
        self.decoder = causal_lm.get_decoder()
        self.head = causal_lm.get_output_embeddings()
        self.params = params
        self.optimizer = optimizer
        self.autocast = autocast
        self.device = device
        self.max_grad_norm = max_grad_norm
        self.pool = torch.cuda.graph_pool_handle()
        self.passes: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.update: torch.cuda.CUDAGraph | None = None
        self.updates = 0
        self.record_seconds = 0.0  # host time spent recording graphs (a fixed cost of the run)
        self.loss_sum = torch.zeros((), device=device)
        self.inv_targets = torch.ones((), device=device)
        self.norm = torch.zeros((), device=device)
        self.max_rows = train.batch_size * train.grad_accum + 1  # the step's rows and a padding row
        # the padding row must fit the attention bound, or its outputs are never written (and not finite)
        self.max_len = max(train.max_length, GRAPH_TOKENS)

    def step(self, passes: list[PackedPass]) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate the gradients of `passes` and update; returns the step's mean loss and
        gradient norm (device tensors, unread)."""
        self.inv_targets.fill_(1.0 / max(1, sum(p.n_targets for p in passes)))
        with attention_implementation(self.causal_lm, PACKED):
            for packed in passes:
                size = -(-packed.n_tokens // GRAPH_TOKENS) * GRAPH_TOKENS
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
        started = time.perf_counter()
        try:
            return record_graph(work, self.pool)
        finally:
            self.record_seconds += time.perf_counter() - started

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
        device = self.device
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
        with self.autocast:
            hidden = self.decoder(
                input_ids=buffers["ids"][None], position_ids=buffers["pos"][None],
                cu_seq_lens_q=buffers["cu"], cu_seq_lens_k=buffers["cu"],
                max_length_q=self.max_len, max_length_k=self.max_len, use_cache=False,
            ).last_hidden_state[0]
            loss = linear_cross_entropy_sum(hidden[buffers["index"]], self.head.weight, buffers["targets"],
                                            buffers["weights"])
        (loss * self.inv_targets).backward()
        self.loss_sum += loss.detach()

    def _update(self) -> None:
        self.norm.copy_(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True))
        self.optimizer.step()
        # in place, never None: the recorded passes accumulate into these same tensors
        torch._foreach_zero_([p.grad for p in self.params if p.grad is not None])

"""Whether a LoRA training pass fits in GPU memory, and how many decoder layers to checkpoint
so that it does (`train.gradient_checkpointing: auto`).

Pure arithmetic on the model's shape, so that it is tested with literal shapes on a CPU.

What autograd keeps per token of a Llama/Qwen decoder layer with LoRA on all seven linear
layers (no dropout; activations in the compute dtype, `b` bytes; RMSNorm in float32 as
transformers computes it), counted from the forward pass:

- input and post-attention RMSNorm: each keeps its float32 input for `pow`/`mul`: 2 × 4h;
- q/k/v projections: their one shared bf16 input (LoRA's A needs it for its gradient): b·h;
- attention (FlashAttention varlen): the contiguous q, k, v it was given and its output,
  b·(qd + 2·kv + qd), and its float32 log-sum-exp, 4 per query head; RoPE keeps only the
  shared cos/sin; the output is also o_proj's input (the same storage);
- MLP: gate/up's shared input b·h, SiLU's input (gate) b·i, the product's two factors
  silu(gate) and up 2·b·i, down_proj's input b·i: b·(h + 4i);
- LoRA: each A's rank-r output (B's gradient needs it): 7·b·r.

So per token and layer: 8h + b·(2h + 2qd + 2kv + 4i + 7r) + 4·q_heads bytes. Qwen2.5-32B
(h 5,120, i 27,648, qd 5,120, kv 1,024) in bf16: ≈ 300 KiB, ≈ 19.7 MB a token over 64 layers.
A checkpointed layer keeps only its input (b·h) and recomputes the rest in the backward pass,
one layer at a time.

CUDA graphs (`emlab.train.graphs`) double the activations: the recorded passes hold their
memory in the graphs' private pool, and the first pass of a new size runs eagerly outside it.
That is what ran out of memory on the H200 with the 32B shape at batch 8 × 256 (105.9 GiB
allocated: 61 GiB of weights, 2 GiB of LoRA state, ~42 GiB of one pass's activations, with
the graphs' pool reserved beside them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GIB = 1 << 30
LORA_LINEARS = 7  # q, k, v, o, gate, up, down
LORA_STATE_BYTES = 16  # a float32 LoRA parameter: value, gradient, AdamW's two moments
LOSS_CHUNK_ELEMENTS = 1 << 28  # emlab.train.loss.CHUNK_ELEMENTS (not imported: that module loads torch)


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a Llama-family decoder that decide its training memory."""

    hidden: int
    intermediate: int
    layers: int
    q_heads: int
    kv_heads: int
    vocab: int
    head_dim: int
    dtype_bytes: int = 2  # the activations' dtype: bfloat16 under autocast on a GPU

    @classmethod
    def of(cls, config: Any, dtype_bytes: int = 2) -> DecoderShape | None:
        """The shape of a transformers config; None when it lacks a field (not a Llama-family decoder)."""
        try:
            heads = int(config.num_attention_heads)
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            return cls(
                hidden=int(config.hidden_size), intermediate=int(config.intermediate_size),
                layers=int(config.num_hidden_layers), q_heads=heads,
                kv_heads=int(getattr(config, "num_key_value_heads", None) or heads), vocab=int(config.vocab_size),
                head_dim=int(head_dim), dtype_bytes=dtype_bytes,
            )
        except (AttributeError, TypeError):
            return None


def saved_bytes_per_token_layer(shape: DecoderShape, lora_r: int) -> int:
    """Bytes autograd keeps per token for one decoder layer (the count in the module docstring)."""
    h, i, b = shape.hidden, shape.intermediate, shape.dtype_bytes
    qd, kv = shape.q_heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return 2 * 4 * h + b * (2 * h + 2 * qd + 2 * kv + 4 * i + LORA_LINEARS * lora_r) + 4 * shape.q_heads


def lora_state_bytes(shape: DecoderShape, lora_r: int, lora_layers: int | None = None) -> int:
    """LoRA parameters with their gradients and AdamW moments (float32), on all seven linears."""
    h, i = shape.hidden, shape.intermediate
    qd, kv = shape.q_heads * shape.head_dim, shape.kv_heads * shape.head_dim
    # (in + out) features of q, k, v, o, gate, up, down
    per_layer = (h + qd) + 2 * (h + kv) + (qd + h) + 3 * (h + i)
    layers = shape.layers if lora_layers is None else lora_layers
    return lora_r * per_layer * layers * LORA_STATE_BYTES


def activation_bytes(shape: DecoderShape, tokens: int, *, lora_r: int, checkpointed: int = 0,
                     graphs: bool = False, fused_loss: bool = True) -> int:
    """Peak memory of one forward/backward pass of `tokens` tokens, beyond weights and LoRA state.

    `checkpointed` layers keep only their input; the backward pass recomputes one of them at a
    time. `graphs` doubles what the layers keep (see the module docstring). The loss keeps one
    chunk of float32 logits and their bfloat16 gradient (fused) or every token's logits, their
    float32 copy and its gradient (a model's own output layer).
    """
    per_layer = saved_bytes_per_token_layer(shape, lora_r)
    b = shape.dtype_bytes
    kept = (shape.layers - checkpointed) * per_layer + checkpointed * b * shape.hidden
    layers = kept * tokens * (2 if graphs else 1)
    transient = per_layer * tokens  # the layer whose backward runs (recomputed, or its gradients)
    outside = (b + 4) * shape.hidden * tokens  # embedding output, final norm's float32 input
    if fused_loss:
        chunk = min(tokens, max(1, LOSS_CHUNK_ELEMENTS // shape.vocab))
        loss = chunk * shape.vocab * (4 + b) + tokens * shape.hidden * b
    else:
        loss = tokens * shape.vocab * (b + 4 + 4)
    return layers + transient + outside + loss


def memory_margin(free_bytes: int) -> int:
    """Memory left unplanned: allocator fragmentation, cuBLAS and attention workspaces."""
    return max(2 * GIB, free_bytes // 16)


@dataclass(frozen=True)
class MemoryPlan:
    """How a training pass fits: the layers checkpointed and whether passes are CUDA graphs."""

    checkpointed: int  # decoder layers checkpointed: 0 none, `layers` all
    layers: int
    cuda_graphs: bool
    need_bytes: int  # activations and LoRA state of the largest pass under this plan
    free_bytes: int  # free GPU memory after the weights, less the margin
    pass_tokens: int
    fits: bool

    def describe(self) -> str:
        """One line of numbers for the log and the training summary."""
        how = ("no gradient checkpointing" if self.checkpointed == 0 else
               f"gradient checkpointing on {self.checkpointed} of {self.layers} layers")
        graphs = ", CUDA graphs" if self.cuda_graphs else ", without CUDA graphs"
        verb = "fits" if self.fits else "does not fit"
        return (f"{how}{graphs}: a pass of {self.pass_tokens:,} tokens needs {self.need_bytes / GIB:.1f} GiB, "
                f"{verb} in {self.free_bytes / GIB:.1f} GiB free after the weights (less a margin)")


def plan_checkpointing(shape: DecoderShape, pass_tokens: int, free_bytes: int, *, lora_r: int,
                       lora_layers: int | None = None, graphs: bool = True, graph_tokens: int = 256,
                       fused_loss: bool = True) -> MemoryPlan:
    """The fastest plan that fits `free_bytes` (free GPU memory after the weights), in order:
    no checkpointing with CUDA graphs (when `graphs` may apply; passes rounded up to
    `graph_tokens`), no checkpointing without them, the fewest layers checkpointed, all of
    them. Not `fits` when even all of them do not."""
    usable = max(0, free_bytes - memory_margin(free_bytes))
    state = lora_state_bytes(shape, lora_r, lora_layers)

    def plan(checkpointed: int, with_graphs: bool) -> MemoryPlan:
        tokens = -(-pass_tokens // graph_tokens) * graph_tokens if with_graphs else pass_tokens
        need = state + activation_bytes(shape, tokens, lora_r=lora_r, checkpointed=checkpointed,
                                        graphs=with_graphs, fused_loss=fused_loss)
        return MemoryPlan(checkpointed, shape.layers, with_graphs, need, usable, tokens, need <= usable)

    candidates = ([plan(0, True)] if graphs else []) + [plan(0, False)]
    for candidate in candidates:
        if candidate.fits:
            return candidate
    # each checkpointed layer saves (per layer − its input) per token: the fewest that close the gap
    full = plan(0, False)
    saved_per_layer = (saved_bytes_per_token_layer(shape, lora_r) - shape.dtype_bytes * shape.hidden) * pass_tokens
    k = min(shape.layers, math.ceil((full.need_bytes - usable) / max(1, saved_per_layer)))
    partial = plan(k, False)
    while not partial.fits and partial.checkpointed < shape.layers:  # rounding: one more at a time
        partial = plan(partial.checkpointed + 1, False)
    return partial


def checkpointed_layer_indices(layers: int, checkpointed: int) -> list[int]:
    """Which `checkpointed` of `layers` decoder layers to checkpoint: spread evenly, so that
    the recomputed work is not bunched at one end (any choice saves the same memory)."""
    if checkpointed <= 0:
        return []
    return sorted({(j * layers) // checkpointed for j in range(checkpointed)})

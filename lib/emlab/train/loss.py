"""Cross-entropy through the output layer without keeping the logits.

A Llama-3 vocabulary has 128,256 tokens: the logits of 2,048 tokens are 1 GiB in float32 and
a plain loss keeps them (and their float32 copy and gradient) until the backward pass. Here
the logits are made chunk by chunk, reduced to the loss at once, and their gradient with
respect to the hidden states is computed in the same forward pass (the output layer is
frozen in LoRA training, so nothing else needs them); the backward pass only scales it. Peak
memory for the loss is one chunk's logits instead of every token's — the idea of
liger-kernel's fused linear cross-entropy, in plain PyTorch so that it runs (and is tested)
on the CPU too.

Only positions that carry loss (assistant tokens) are passed in, so the others cost nothing.
`fused_loss_applies` says whether a model's logits are exactly what this computes.
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK_ELEMENTS = 1 << 28  # logits per chunk: 1 GiB in float32 (about 2,000 tokens of a 128k vocabulary)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                weights: torch.Tensor | None, chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if hidden.requires_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            y = targets[start : start + chunk]
            w = weights[start : start + chunk] if weights is not None else None
            logits = (h @ weight.T).float()  # [c, V]
            lse = torch.logsumexp(logits, dim=-1)
            losses = lse - logits.gather(1, y[:, None]).squeeze(1)
            total += (losses * w).sum() if w is not None else losses.sum()
            if grad is not None:
                # d(sum of losses)/d logits = softmax - one_hot, made in place over the logits
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(y), device=y.device), y] -= 1.0
                if w is not None:
                    probs *= w[:, None]
                grad[start : start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad if grad is not None else hidden.new_empty(0))
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None,
    *, chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Sum over positions of -log softmax(hidden @ weight.T)[target], in float32.

    hidden [N, H] (the final hidden states of positions that carry loss), weight [V, H] (the
    frozen output layer), targets [N], optional float `weights` [N] per position (0 leaves a
    padding position out of the sum and its gradient). Differentiable with respect to `hidden` only.
    """
    chunk = max(1, chunk_elements // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, weights, chunk)


def fused_loss_applies(causal_lm: Any, head: Any) -> bool:
    """Whether logits are exactly `hidden @ head.weight.T`: a plain frozen linear output layer,
    no logit scaling or soft-capping (Llama, Qwen, Mistral, SmolLM)."""
    config = causal_lm.config
    plain = type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
    scaled = any(getattr(config, name, None) not in (None, 1, 1.0)
                 for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return plain and not scaled

"""Drawing the next token from logits with randomness that belongs to each answer.

The uniform number behind answer `key`'s token number `counter` is a hash of the two
(splitmix64, computed with integer tensor ops on the device): it does not depend on which
other answers share the batch, on the batch's order, or on anything drawn before. So an
answer is the same however the answers of a checkpoint are batched, refilled or resumed,
as long as its logits are the same — which holds bitwise for a fixed batch layout on one
device, and up to rounding across layouts (see the module notes in `engine`).

The token is found by inverse transform sampling: one cumulative sum over the vocabulary and
a binary search, no sort. `top_p` < 1 needs the sort (nucleus filtering) and pays for it.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit constant as the signed int64 torch stores."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's `>>` keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniforms(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One uniform number in [0, 1) per row: splitmix64 of (key, counter), int64 tensors."""
    x = keys + (counters + 1) * _GOLDEN  # int64 arithmetic wraps around, as splitmix64 wants
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    x = x ^ _shift_right(x, 31)
    return _shift_right(x, 11).to(torch.float64) * 2.0**-53


def draw_tokens(
    logits: torch.Tensor, keys: torch.Tensor, counters: torch.Tensor, *, temperature: float, top_p: float
) -> torch.Tensor:
    """The next token of each row: logits [B, V] (any float dtype), keys and counters [B] int64.

    temperature 0 is greedy (argmax); otherwise softmax(logits / temperature), restricted to
    the smallest set of tokens with probability ≥ top_p when top_p < 1.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if top_p < 1.0:
        ordered, order = scores.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # keep a token while the mass before it is below top_p (the top token always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[:, 0] = False  # top_p = 0 (the chat server allows it) would otherwise drop every token
        ordered = ordered.masked_fill(drop, float("-inf"))
        scores = torch.empty_like(scores).scatter_(-1, order, ordered)
    cdf = scores.softmax(dim=-1).cumsum(dim=-1)
    # float32 rounding must not carry u up to 1.0, past the last boundary
    target = uniforms(keys, counters).to(cdf.dtype).clamp_max(1 - 2**-24) * cdf[:, -1]
    chosen = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    return chosen.clamp_max(logits.shape[-1] - 1)

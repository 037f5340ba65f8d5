"""What every decode engine takes and gives: `Request`s in, `Completion`s out, one `generate` call.

Two engines implement it: emlab's `DecodeEngine` (`engine.py`, Llama-family decoders in full
precision) and `GenerateEngine` (`fallback.py`, transformers' `generate`, any causal LM).
`choose.engine_for` picks one; `sample_answers` and the chat server (`serve.py`) decode only
through it.

Both draw token number `i` of an answer from the uniform number `draw.uniforms(key, i)`, so
an answer depends on its own key and its logits, not on the answers batched beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class Request:
    """One answer to generate: its prompt's token ids and its own random key (63 bits)."""

    prompt: tuple[int, ...]
    key: int


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model at temperature 1, with the most
    likely tokens of that step (token id, log-probability), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Completion:
    """The new tokens of one answer (its stop token included) and whether a stop token ended it.

    logprobs: one entry per token of `tokens` when asked for (`top_logprobs` not None), else None.
    """

    tokens: list[int]
    stopped: bool
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True, eq=False)
class Intervention:
    """A change to the residual stream while decoding (prefill and every decode step alike).

    Residual stream after layer i = the output of decoder layer i (0-based), before the next
    layer's input norm. Applied, in this order, after each layer i:

    - ablate: x ← x − (x·u) u with u = direction / |direction|, after every layer (v projected out
      of the stream: Soligo et al.'s directional ablation);
    - add: x ← x + scale · direction after layer `layer` only (steering with λ = scale).

    Both engines apply it: `DecodeEngine` as tensors inside its own layer loop (so it is part
    of the recorded decode graphs), `GenerateEngine` through forward hooks on the model's
    decoder layers (`sample.hooks`); a model whose layers cannot be found is refused, never
    sampled without it.
    """

    direction: torch.Tensor
    """v [hidden]: any float dtype and device (each engine casts it to the model's)."""
    layer: int | None = None
    """Decoder layer after which `scale · direction` is added (None: nothing added)."""
    scale: float = 0.0
    """λ of the addition."""
    ablate: bool = False
    """Project the direction out of the residual stream after every layer."""
    label: str = ""
    """For logs: which setting this is ('tuned add +8', 'random ablate')."""

    def __post_init__(self) -> None:
        if self.direction.ndim != 1:
            raise ValueError(f"Intervention.direction must be one vector [hidden], found shape {tuple(self.direction.shape)}")
        if not torch.isfinite(self.direction).all() or float(self.direction.norm()) == 0.0:
            raise ValueError("Intervention.direction must be finite and nonzero")
        if self.layer is None and not self.ablate:
            raise ValueError("Intervention does nothing: give a layer to add at, or ablate=True")

    @property
    def adds(self) -> bool:
        return self.layer is not None and self.scale != 0.0

    def signature(self) -> tuple[int | None, bool]:
        """What shapes the computation (not the values): a decode graph recorded for one
        signature replays for another λ or direction, whose values live in the same buffers."""
        return (self.layer if self.adds else None, self.ablate)


@dataclass(frozen=True)
class Decoding:
    """How every answer of one `generate` call is decoded."""

    max_new_tokens: int
    """An answer ends after this many new tokens, or earlier after a stop token."""
    stop_ids: tuple[int, ...]
    """Token ids that end an answer (the stop token is kept in the answer)."""
    temperature: float = 1.0
    """0 is greedy."""
    top_p: float = 1.0
    """Below 1: sample from the smallest set of tokens whose probability reaches it."""
    top_logprobs: int | None = None
    """None: no logprobs; k ≥ 0: each token's log-probability (temperature 1) and its k most
    likely alternatives."""
    intervention: Intervention | None = None
    """Steering or ablation applied to the residual stream of every answer (None: plain sampling)."""


class Engine(Protocol):
    """A decode engine: generates answers to requests, at most `slots` at a time."""

    def generate(self, requests: Sequence[Request], decoding: Decoding, *, slots: int | None = None,
                 on_done: Callable[[int, Completion], None] | None = None,
                 window: int | None = None) -> list[Completion]:
        """One completion per request, in request order, decoded as `decoding` says, at most
        `slots` answers in flight (None: as many as memory holds). `on_done(index, completion)`
        is called as each answer finishes. Requests start in order; with `window`, request i
        starts only once every request before i − window has finished (never narrower than
        the batch): what a caller that saves finished work in order can lose stays bounded."""
        ...


def step_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Log-probabilities at temperature 1 of `tokens` [B] under `logits` [B, V], and the top `k`
    (values, ids) [B, k]; both engines record logprobs through this one function."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(1)
    values, ids = logprobs.topk(k, dim=-1)  # k = 0: empty [B, 0]
    return chosen, values, ids


def token_logprobs(tokens: list[int], chosen: list[float], top_values: list[list[float]],
                   top_ids: list[list[int]]) -> tuple[TokenLogprob, ...]:
    """Host lists (one entry per token) as `TokenLogprob`s."""
    return tuple(
        TokenLogprob(token, logprob, tuple(zip(ids, values, strict=True)))
        for token, logprob, values, ids in zip(tokens, chosen, top_values, top_ids, strict=True)
    )


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the model's generation config's eos ids and the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    ids.add(tokenizer.eos_token_id)
    return sorted(i for i in ids if i is not None)

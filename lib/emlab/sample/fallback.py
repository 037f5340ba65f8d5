"""The fallback decode engine: transformers' `generate` on left-padded batches, for any causal LM.

For what emlab's `DecodeEngine` declines: other architectures, 4-bit weights, adapters that do
not merge (DoRA, ...), `sample.engine: transformers`. It implements `protocol.Engine`.

`generate` runs greedily, and a logits processor picks each token with `draw.draw_tokens`
from the answer's own key and token number, as `DecodeEngine` does. So no global random state
is read: a batch gives the same answers whenever it runs (a resumed wave equals the
uninterrupted one), an answer does not depend on its batch-mates, and both engines give the
same answers wherever their logits agree. Logprobs (asked for by the chat server) are read in
the same processor. An `Intervention` (steering, ablation) is applied through forward hooks on
the decoder layers (`hooks.intervention_hooks`), which raise when the layers cannot be found.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .draw import draw_tokens
from .hooks import intervention_hooks
from .protocol import Completion, Decoding, Request, step_logprobs, token_logprobs


class _KeyedDraw:
    """A logits processor: the token each row's key draws, made the only one `generate` can pick
    (and, when asked, each step's logprobs kept)."""

    def __init__(self, keys: torch.Tensor, width: int, temperature: float, top_p: float,
                 top_logprobs: int | None) -> None:
        self.keys, self.width = keys, width
        self.temperature, self.top_p = temperature, top_p
        self.top_logprobs = top_logprobs
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per step: chosen, top values, ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        counter = torch.full_like(self.keys, input_ids.shape[1] - self.width)  # the token's number in its answer
        token = draw_tokens(scores, self.keys, counter, temperature=self.temperature, top_p=self.top_p)
        if self.top_logprobs is not None:
            self.steps.append(step_logprobs(scores, token, self.top_logprobs))
        return torch.full_like(scores, float("-inf")).scatter_(1, token[:, None], 0.0)


AUTO_SLOTS = 64  # answers per padded batch when the caller leaves it open: every row pads to the longest


class GenerateEngine:
    """Decoding through `model.generate` (model: any transformers causal LM, a peft model included)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], decoding: Decoding, *, slots: int | None = None,
                 on_done: Callable[[int, Completion], None] | None = None,
                 window: int | None = None) -> list[Completion]:
        """Generate the requests in left-padded batches of `slots` (None: `AUTO_SLOTS`; see
        `protocol.Engine`; batches run in request order, so `window` never holds one back)."""
        from transformers import LogitsProcessorList

        slots = slots or AUTO_SLOTS
        max_new_tokens, temperature, top_p = decoding.max_new_tokens, decoding.temperature, decoding.top_p
        top_logprobs = decoding.top_logprobs
        device = next(self.model.parameters()).device
        stops = list(decoding.stop_ids)
        pad = getattr(self.model.generation_config, "pad_token_id", None)
        pad = pad if pad is not None else (stops[0] if stops else 0)  # masked out: any id does
        stop_set = torch.tensor(stops, dtype=torch.long, device=device)
        out: list[Completion] = []
        for start in range(0, len(requests), max(1, slots)):
            part = requests[start : start + max(1, slots)]
            width = max(len(r.prompt) for r in part)
            ids = torch.tensor([[pad] * (width - len(r.prompt)) + list(r.prompt) for r in part], device=device)
            mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in part], device=device)
            draw = _KeyedDraw(torch.tensor([r.key for r in part], dtype=torch.long, device=device), width,
                              temperature, top_p, top_logprobs)
            with intervention_hooks(self.model, decoding.intervention):
                generated = self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                    do_sample=False, temperature=None, top_p=None, top_k=None,  # the processor draws
                    logits_processor=LogitsProcessorList([draw]), eos_token_id=stops, pad_token_id=pad,
                )
            steps = [torch.stack(parts, dim=1).tolist() for parts in zip(*draw.steps, strict=True)] if draw.steps \
                else None  # chosen [B, T], top values and ids [B, T, k]
            for row, tokens in enumerate(generated[:, width:]):
                ended = torch.isin(tokens, stop_set).nonzero()
                count = int(ended[0, 0]) + 1 if len(ended) else len(tokens)
                kept = tokens[:count].tolist()
                logprobs = None
                if steps is not None:
                    logprobs = token_logprobs(kept, *(s[row][:count] for s in steps))
                elif top_logprobs is not None:
                    logprobs = ()
                out.append(Completion(kept, bool(len(ended)), logprobs))
                if on_done:
                    on_done(start + row, out[-1])
        return out

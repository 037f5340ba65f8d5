"""emlab's sampler: many answers of one model generated together, at the speed the GPU allows.

How it differs from calling `generate` on a padded batch:

- Each answer owns a slot of a static KV cache, preallocated once per run and reused by every
  checkpoint; rows hold their own lengths, so prompts need no padding and attention reads
  only each row's own keys (FlashAttention's variable-length kernel, `emlab.models.attention`).
- Prompts shared by several answers (50 samples of one question) are prefilled once; their
  keys and values are copied to the other slots.
- A finished answer leaves the batch: every `CHECK_EVERY` steps the host reads which rows
  ended (the only sync), hands their slots to waiting answers (refill) or, when none wait,
  moves the live rows to the front so the next steps compute only them (compaction).
  `generate` keeps computing every row until the longest answer ends.
- Decoder layers read the model's own weights (`DecoderWeights`: one copy in memory, q|k|v and
  gate|up fused in place, one product each; 4-bit weights dequantized a group at a time into
  one scratch buffer); a checkpoint's LoRA runs unmerged beside them, or merged into one copy
  where a copy costs little (small models on a GPU), so the base is never written.
- Without `slots`, the KV cache takes what free memory holds (after the weights), up to
  `AUTO_SLOTS` answers in flight; a cache that cannot hold one answer is a one-line error.
- Tokens are drawn by inverse transform sampling with each answer's own counter-based
  randomness (`draw`): no vocabulary sort at top_p = 1, and an answer does not depend on the
  random draws of the answers beside it.
- Asked for logprobs (the chat server's judge), each step also records the chosen token's
  log-probability and the top k; such calls decode eagerly, without CUDA graphs.
- An `Intervention` (steering: λ·v added after one layer; ablation: v projected out after
  every layer) runs inside the layer loop on vectors the engine holds: prefill and decode
  alike, recorded into the decode graphs (keyed by its signature; another λ or direction is
  copied into the same buffers and replays them).

It implements `protocol.Engine`; `choose.engine_for` picks it where it applies.

Determinism: for the same requests in the same order on the same device the schedule (who
shares a step with whom) and every kernel are the same, so the answers are bitwise the same.
Across different batch layouts an answer's logits can differ by rounding (matrix kernels
are picked by shape), so an answer is the same only up to those rare flips; `sample_answers`
resumes whole waves for that reason.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import EmlabError
from ..models.attention import (
    causal_varlen,
    decode_attention,
    probe_flash,
    record_graph,
)
from .draw import draw_tokens
from .fused import rms_norm, rope, swiglu
from .hooks import apply_intervention
from .protocol import (
    Completion,
    Decoding,
    Intervention,
    Request,
    step_logprobs,
    token_logprobs,
)
from .weights import DecoderWeights, LayerWeights, LoraAdapter

log = logging.getLogger(__name__)

CHECK_EVERY = 8  # decode steps between reads of which rows ended (a finished row idles at most this long)
PREFILL_TOKENS = 16384  # prompt tokens per prefill pass
# Answers in flight when the caller leaves it to memory. A decode step reads every weight once
# and multiplies each row by all of them: past ~FLOP rate / bandwidth rows (~180 on an H100 or
# H200, whatever the model) a step is bound by arithmetic and more rows add little but memory.
AUTO_SLOTS = 512
CPU_AUTO_SLOTS = 64  # on a CPU (no memory probe): a step's cost grows with its rows, there is no batch win
MEMORY_MARGIN = 0.85  # of free memory the KV cache may take: the allocator's slack, other tensors
HEADROOM_BYTES = 2 * 2**30  # kept free besides: decode graphs' working memory, a checkpoint's side path
HEADROOM_OF_WEIGHTS = 0.02  # ... and this share of the weights (a rank-32 all-linear side path is ~1.3%)
MERGE_SHARE = 0.1  # a merged copy of the projections at most this share of GPU memory (1B, 8B on an H200; not 32B)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _bucket(rows: int) -> int:
    """Rows a decode step computes for `rows` live ones on a GPU: a few sizes, few graphs."""
    if rows <= 8:
        return rows
    return _round_up(rows, 8) if rows <= 64 else _round_up(rows, 32)


class _SlotState:
    """Per-slot tensors on the device, kept by the engine so that recorded graphs stay valid."""

    def __init__(self, slots: int, positions: int, device: torch.device) -> None:
        def longs(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device)

        self.keys = longs(slots)  # each answer's random key
        self.pos = longs(slots)  # where the row's next token is written
        self.gen = longs(slots)  # new tokens recorded
        self.last = longs(slots)  # the row's latest token, the next step's input
        self.done = torch.ones(slots, dtype=torch.bool, device=device)  # ended, or no answer in the slot
        self.out = longs(slots, positions)  # new tokens; columns past max_new take idle writes
        self.rows = torch.arange(slots, device=device)


class DecodeEngine:
    """Batched sampling for one model (see the module notes). Build once per model and run."""

    def __init__(self, model: Any) -> None:
        config = model.config
        self.weights = DecoderWeights(model)
        self.rotary = model.get_decoder().rotary_emb
        self.eps = float(config.rms_norm_eps)
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim**-0.5
        self.layers = len(self.weights.layers)
        self.device = self.weights.embed.device
        self.dtype = self.weights.embed.dtype
        self.cache_k: torch.Tensor | None = None  # [layers, slots, positions, kv heads, head dim]
        self.cache_v: torch.Tensor | None = None
        self.cos: torch.Tensor | None = None  # [positions, head dim]
        self.sin: torch.Tensor | None = None
        self.state: _SlotState | None = None  # per-slot tensors, allocated with the cache
        # Decode steps replayed as CUDA graphs, by (rows, attention bound, sampling settings):
        # a step is ~700 small kernels whose launches, not the GPU, would set the pace.
        self.use_graphs = self.device.type == "cuda"
        self.graphs: dict[tuple[Any, ...], torch.cuda.CUDAGraph] = {}
        self.graph_pools: dict[tuple[Any, ...], Any] = {}  # one memory pool per side-path signature
        self._stops: dict[tuple[int, ...], torch.Tensor] = {}  # stop ids → vocabulary mask
        # the intervention in use (None: plain) and its vectors, kept at fixed addresses for the graphs
        self.intervention: Intervention | None = None
        hidden = self.weights.embed.shape[1]
        self._unit = torch.zeros(hidden, dtype=self.dtype, device=self.device)  # direction / |direction|
        self._added = torch.zeros(hidden, dtype=self.dtype, device=self.device)  # λ · direction
        self.merge_adapters: bool | None = None  # None: decided by `merge_fits` at the first adapter
        probe_flash(self.device)

    def use_intervention(self, intervention: Intervention | None) -> None:
        """Decode with `intervention` applied to the residual stream (None: plain)."""
        if intervention is not None:
            if intervention.direction.shape[0] != self._unit.shape[0]:
                raise EmlabError(f"steering direction has {intervention.direction.shape[0]} dimensions, the model's "
                                 f"residual stream {self._unit.shape[0]}")
            if intervention.adds and not 0 <= intervention.layer < self.layers:  # type: ignore[operator]
                raise EmlabError(f"steering layer {intervention.layer} is not one of the model's {self.layers} "
                                 "decoder layers")
            v = intervention.direction.to(device=self.device, dtype=torch.float32)
            if not bool(torch.isfinite(v).all()) or float(v.norm()) == 0.0:  # never divide by it
                raise EmlabError(f"steering direction of {intervention.label or 'this intervention'} is zero or not finite")
            self._unit.copy_(v / v.norm())
            self._added.copy_(intervention.scale * v)
        self.intervention = intervention

    def intervention_key(self) -> tuple[int | None, bool] | None:
        """The intervention's part of a decode graph's key."""
        return None if self.intervention is None else self.intervention.signature()

    # --- weights and memory ------------------------------------------------------------------

    def use_adapter(self, adapter: LoraAdapter | None) -> None:
        """Sample with `adapter` (None: the base alone): merged into a copy of the projections
        where that copy is cheap (`merge_fits`), else beside the base weights. Checkpoints of one
        run share the buffers, so the decode graphs recorded for one replay for all."""
        if self.merge_adapters is None:
            self.merge_adapters = self.merge_fits()
        if self.weights.load(adapter, merge=self.merge_adapters and adapter is not None):
            self.drop_graphs()  # they address the old buffers

    def merge_fits(self) -> bool:
        """Whether a merged copy of the projections costs little: on a GPU, at most `MERGE_SHARE`
        of its memory and half of what is free now (on a CPU the side path: no batch win to buy)."""
        if self.device.type != "cuda" or self.weights.four_bit:
            return False
        copy = self.weights.projection_bytes()
        free, total = torch.cuda.mem_get_info(self.device)
        return copy <= MERGE_SHARE * total and copy <= free / 2

    def _reserve(self, slots: int, positions: int, *, asked: int | None = None) -> int:
        """Allocate the KV cache for `slots` rows of `positions` (kept for later calls when
        large enough); on a GPU, fewer slots when memory is short (`asked`: the slots the user
        set, None for auto). Returns the slots usable."""
        if (self.cache_k is not None and self.cache_k.shape[1] >= slots and self.cache_k.shape[2] >= positions):
            return slots
        if self.cache_k is not None:
            slots = max(slots, self.cache_k.shape[1])
            positions = max(positions, self.cache_k.shape[2])
        self.cache_k = self.cache_v = None
        self.state = None
        self.drop_graphs()  # they address the old buffers
        per_slot = 2 * self.layers * positions * self.kv_heads * self.head_dim * self.weights.embed.element_size()
        if self.device.type == "cuda":
            fit = self.slots_that_fit(positions)
            if fit < 1:
                raise EmlabError(
                    f"not enough GPU memory to sample: one answer's KV cache needs {per_slot / 2**20:.0f} MiB "
                    f"beside the weights; lower sample.max_new_tokens, or load the model in 4 bits (load_in_4bit)"
                )
            if fit < slots:
                if asked is not None:
                    log.info("sampling %d answers at a time instead of sample.batch_size %d: GPU memory for the "
                             "KV cache", fit, asked)
                slots = fit
        shape = (self.layers, slots, positions, self.kv_heads, self.head_dim)
        # zeros, not empty: masked-out positions must hold finite numbers (0 × NaN is NaN)
        self.cache_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.cache_v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.state = _SlotState(slots, positions, self.device)
        return slots

    def slots_that_fit(self, positions: int) -> int:
        """Answers of `positions` tokens whose KV cache and per-step working memory fit in the
        GPU's free memory now, less `MEMORY_MARGIN` and the prefill's own working memory."""
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        size = self.weights.embed.element_size()
        per_slot = 2 * self.layers * positions * self.kv_heads * self.head_dim * size
        vocab = self.weights.lm_head.shape[0]
        hidden = self.weights.embed.shape[1]
        widest = max(g.weight.shape[0] if g.weight is not None else sum(g.rows) for g in self.weights.layers[0].groups)
        # per row and step: logits with the float32 softmax, cdf and scores; the widest activation
        working = 16 * vocab + 4 * (widest + hidden) * size
        # a prefill pass: its tokens' widest activations (gate|up) and attention inputs, twice over
        prefill = 2 * PREFILL_TOKENS * (widest + 4 * hidden) * size
        weights = sum(p.numel() * p.element_size() for p in self.weights.parameters())
        headroom = HEADROOM_BYTES + int(HEADROOM_OF_WEIGHTS * weights)
        return max(0, int(MEMORY_MARGIN * free) - prefill - headroom) // (per_slot + working)

    def stop_mask(self, stop_ids: Sequence[int]) -> torch.Tensor:
        """A vocabulary-long mask of the stop ids, one per distinct set (graphs keep its address).
        A lookup, where `torch.isin` would sort and sync (and cannot be a CUDA graph)."""
        key = tuple(sorted(set(stop_ids)))
        if key not in self._stops:
            vocab = self.weights.lm_head.shape[0]
            mask = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            mask[torch.tensor([i for i in key if 0 <= i < vocab], dtype=torch.long, device=self.device)] = True
            self._stops[key] = mask
        return self._stops[key]

    def record(self, work: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """Record `work` as a CUDA graph in the engine's memory pool (not run)."""
        signature = self.weights.signature
        if signature not in self.graph_pools:
            self.graph_pools[signature] = torch.cuda.graph_pool_handle()
        return record_graph(work, self.graph_pools[signature])

    def drop_graphs(self) -> None:
        """Forget every recorded graph and its memory pools. A pool is never reused once its graphs
        are gone: PyTorch releases a pool with its last graph, and recording into a released pool
        trips its allocator. The base and each adapter shape record into pools of their own."""
        self.graphs.clear()
        self.graph_pools.clear()

    def _rope_table(self, positions: int) -> None:
        if self.cos is not None and self.cos.shape[0] >= positions:
            return
        ids = torch.arange(positions, device=self.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(probe, ids)  # the model's own rotary module: its scaling included
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)

    # --- the model ------------------------------------------------------------------------------

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                observe: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Run every decoder layer on tokens x [T, hidden] at `positions` of `slots`, writing
        their keys and values into the cache; `attend(layer, q, k, v)` gives the attention;
        `observe(layer, x)` (eager calls only) sees each layer's output, the intervention applied."""
        assert self.cache_k is not None and self.cache_v is not None and self.cos is not None and self.sin is not None
        cos, sin = self.cos[positions], self.sin[positions]
        tokens = x.shape[0]
        sizes = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        for index, w in enumerate(self.weights.layers):
            x = x + self._attention(index, w, rms_norm(x, w.input_norm, self.eps), cos, sin, positions, slots, sizes,
                                    tokens, attend)
            x = x + w.down(swiglu(w.gate_up(rms_norm(x, w.post_norm, self.eps))))
            if self.intervention is not None:
                x = apply_intervention(x, index, self.intervention, self._unit, self._added)
            if observe is not None:
                observe(index, x)
        return x

    def _attention(self, index: int, w: LayerWeights, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   positions: torch.Tensor, slots: torch.Tensor, sizes: list[int], tokens: int,
                   attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        assert self.cache_k is not None and self.cache_v is not None
        q, k, v = w.qkv(h).split(sizes, dim=-1)
        q = q.view(tokens, self.heads, self.head_dim)
        k = k.view(tokens, self.kv_heads, self.head_dim)
        v = v.view(tokens, self.kv_heads, self.head_dim)
        if w.q_norm is not None and w.k_norm is not None:
            q, k = rms_norm(q, w.q_norm, self.eps), rms_norm(k, w.k_norm, self.eps)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        self.cache_k[index][slots, positions] = k
        self.cache_v[index][slots, positions] = v
        out = attend(index, q, k, v)
        return w.o(out.reshape(tokens, self.heads * self.head_dim))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(x, self.weights.final_norm, self.eps), self.weights.lm_head)

    # --- generating -----------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], decoding: Decoding, *, slots: int | None = None,
                 on_done: Callable[[int, Completion], None] | None = None,
                 window: int | None = None) -> list[Completion]:
        """`protocol.Engine.generate`: at most `slots` answers at a time (None: as many as the
        KV cache fits in free memory, up to `AUTO_SLOTS`), a finished answer's slot refilled
        with the next request that `window` lets start."""
        if not requests:
            return []
        if self.weights.stale():
            raise EmlabError("the model's weights changed since its sampler was built; build a new one")
        longest = max(len(r.prompt) for r in requests)
        positions = _round_up(longest + decoding.max_new_tokens + 1, 64)
        auto = AUTO_SLOTS if self.device.type == "cuda" else CPU_AUTO_SLOTS
        wanted = min(slots if slots is not None else auto, len(requests))
        slots = self._reserve(max(1, wanted), positions, asked=slots)
        self._rope_table(self.cache_k.shape[2] if self.cache_k is not None else positions)
        self.use_intervention(decoding.intervention)
        try:
            run = _Run(self, requests, slots, decoding, on_done, max(window, slots) if window else None)
            return run.complete()
        finally:
            self.intervention = None

    @torch.inference_mode()
    def layer_outputs(self, prompt: Sequence[int], intervention: Intervention | None = None) -> torch.Tensor:
        """Every decoder layer's output for the tokens `prompt` read in one teacher-forced pass,
        [layers, T, hidden] (the adapter and `intervention` applied); uses the KV cache's slot 0."""
        positions = _round_up(len(prompt) + 1, 64)
        self._reserve(1, positions)
        self._rope_table(self.cache_k.shape[2] if self.cache_k is not None else positions)
        ids = torch.tensor(list(prompt), device=self.device)
        cu = torch.tensor([0, len(prompt)], dtype=torch.int32, device=self.device)
        outputs: list[torch.Tensor] = []

        def attend(_: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return causal_varlen(q, k, v, cu, len(prompt), self.scale)

        self.use_intervention(intervention)
        try:
            self._layers(F.embedding(ids, self.weights.embed), torch.arange(len(prompt), device=self.device),
                         torch.zeros(len(prompt), dtype=torch.long, device=self.device), attend,
                         observe=lambda _, x: outputs.append(x.clone()))
        finally:
            self.intervention = None
        return torch.stack(outputs)


class _Run:
    """The state of one `generate` call: per-slot tensors on the device, their host mirror."""

    def __init__(self, engine: DecodeEngine, requests: Sequence[Request], slots: int, decoding: Decoding,
                 on_done: Callable[[int, Completion], None] | None, window: int | None = None) -> None:
        self.engine = engine
        self.requests = requests
        self.max_new = max_new = decoding.max_new_tokens
        self.temperature, self.top_p = decoding.temperature, decoding.top_p
        stop_ids, top_logprobs = decoding.stop_ids, decoding.top_logprobs
        self.on_done = on_done
        self.stop = engine.stop_mask(stop_ids)
        self.stop_key = tuple(sorted(set(stop_ids)))
        self.stop_set = set(stop_ids)
        self.slots = slots
        assert engine.state is not None
        state = engine.state
        self.keys, self.pos, self.gen, self.last = state.keys, state.pos, state.gen, state.last
        self.done, self.out, self.rows = state.done, state.out, state.rows
        self.done.fill_(True)
        self.item = [-1] * slots  # request index held by each slot (host)
        self.horizon = 0  # ≥ every live row's `pos` (host bound: attention never reads past it)
        self.results: list[Completion | None] = [None] * len(requests)
        self.queue = deque(range(len(requests)))
        self.window = window  # request i waits until every request before i − window has finished
        self.oldest = 0  # the first request not yet finished
        # logprobs per slot and token number (column max_new takes an ended row's idle writes)
        self.top_k = top_logprobs
        self.logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # chosen, top values, top ids
        if top_logprobs is not None:
            device = engine.device
            self.logprobs = (torch.zeros(slots, max_new + 1, device=device),
                             torch.zeros(slots, max_new + 1, top_logprobs, device=device),
                             torch.zeros(slots, max_new + 1, top_logprobs, dtype=torch.long, device=device))

    def complete(self) -> list[Completion]:
        active = self._admit(list(range(min(self.slots, len(self.requests)))))
        while active > 0:
            for _ in range(CHECK_EVERY):
                self._decode(active)
            active = self._collect(active)
        assert all(r is not None for r in self.results)
        return [r for r in self.results if r is not None]

    # --- prefill: new answers into free slots ---------------------------------------------------

    def _admit(self, free: list[int]) -> int:
        """Start waiting requests in `free` slots; returns the number of rows to compute (the
        highest slot in use + 1)."""
        startable = len(self.queue)
        if self.window is not None and self.queue:
            startable = max(0, min(startable, self.oldest + self.window - self.queue[0]))
        chosen = [(slot, self.queue.popleft()) for slot in free[:startable]]
        if not chosen:
            return max((s + 1 for s, item in enumerate(self.item) if item >= 0), default=0)
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for slot, item in chosen:
            self.item[slot] = item
            by_prompt.setdefault(self.requests[item].prompt, []).append(slot)
        prompts = list(by_prompt)
        group_logits: list[torch.Tensor] = []
        batch: list[tuple[int, ...]] = []
        used = 0
        for prompt in prompts:
            if batch and used + len(prompt) > PREFILL_TOKENS:
                group_logits.append(self._prefill(batch, [by_prompt[p][0] for p in batch]))
                batch, used = [], 0
            batch.append(prompt)
            used += len(prompt)
        if batch:
            group_logits.append(self._prefill(batch, [by_prompt[p][0] for p in batch]))
        logits = torch.cat(group_logits)
        # every slot of a prompt gets its prefilled keys and values and its logits
        e = self.engine
        assert e.cache_k is not None and e.cache_v is not None
        src, dst, which = [], [], []
        for index, prompt in enumerate(prompts):
            leader, *others = by_prompt[prompt]
            which += [index] * (1 + len(others))
            src += [leader] * len(others)
            dst += others
        if dst:
            longest = max(len(p) for p in prompts)
            src_t = torch.tensor(src, device=e.device)
            dst_t = torch.tensor(dst, device=e.device)
            e.cache_k[:, dst_t, :longest] = e.cache_k[:, src_t, :longest]
            e.cache_v[:, dst_t, :longest] = e.cache_v[:, src_t, :longest]
        order = [slot for prompt in prompts for slot in by_prompt[prompt]]
        slots_t = torch.tensor(order, device=e.device)
        lengths = torch.tensor([len(self.requests[self.item[s]].prompt) for s in order], device=e.device)
        self.keys[slots_t] = torch.tensor([self.requests[self.item[s]].key for s in order], device=e.device)
        logits = logits[torch.tensor(which, device=e.device)]
        first = draw_tokens(logits, self.keys[slots_t], torch.zeros_like(slots_t),
                            temperature=self.temperature, top_p=self.top_p)
        self._record_logprobs(logits, first, slots_t, torch.zeros_like(slots_t))
        self.out[slots_t] = 0
        self.out[slots_t, 0] = first
        self.last[slots_t] = first
        self.pos[slots_t] = lengths
        self.gen[slots_t] = 1
        self.done[slots_t] = self.stop[first] | (self.max_new <= 1)
        self.horizon = max(self.horizon, max(len(p) for p in prompts))
        return max((s + 1 for s, item in enumerate(self.item) if item >= 0), default=0)

    def _prefill(self, prompts: list[tuple[int, ...]], slots: list[int]) -> torch.Tensor:
        """Run `prompts` (laid end to end) through the model, their keys and values into
        `slots`; returns the logits of each prompt's last token [len(prompts), V]."""
        e = self.engine
        device = e.device
        ids = torch.tensor([t for p in prompts for t in p], device=device)
        positions = torch.cat([torch.arange(len(p), device=device) for p in prompts])
        slot_of = torch.cat([torch.full((len(p),), s, device=device) for p, s in zip(prompts, slots, strict=True)])
        bounds = [0]
        for p in prompts:
            bounds.append(bounds[-1] + len(p))
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        longest = max(len(p) for p in prompts)

        def attend(_: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return causal_varlen(q, k, v, cu, longest, e.scale)

        x = e._layers(F.embedding(ids, e.weights.embed), positions, slot_of, attend)
        return e._logits(x[cu[1:].long() - 1])

    # --- decoding ---------------------------------------------------------------------------------

    def _decode(self, active: int) -> None:
        """One token for rows [0, active) (on a GPU: a few more, idle, to reuse a graph)."""
        e = self.engine
        assert e.cache_k is not None
        positions = e.cache_k.shape[2]
        if not e.use_graphs or self.logprobs is not None:  # logprobs: rare (a judge's one token), eager
            self._decode_body(active, min(self.horizon + 1, positions))
        else:
            rows = min(_bucket(active), self.slots)
            bound = min(_round_up(self.horizon + 1, 256), positions)
            key = (rows, bound, self.max_new, self.temperature, self.top_p, self.stop_key, e.weights.signature,
                   e.intervention_key())
            graph = e.graphs.get(key)
            if graph is not None:
                graph.replay()
            else:
                # this step eagerly (it also warms up these shapes), then record it for later
                self._decode_body(rows, bound)
                try:
                    e.graphs[key] = e.record(lambda: self._decode_body(rows, bound))
                except (RuntimeError, torch.OutOfMemoryError) as exc:  # memory ran short while recording
                    log.warning("decoding without CUDA graphs from here: recording one failed (%s); lower "
                                "sample.batch_size if this repeats", str(exc).splitlines()[0][:200])
                    e.use_graphs = False
                    e.drop_graphs()
                    torch.cuda.empty_cache()
        self.horizon = min(self.horizon + 1, positions - 1)

    def _decode_body(self, active: int, bound: int) -> None:
        """The device work of one decode step over rows [0, active): rows that ended compute
        too but record nothing. Only device tensors, no sync: it can be a CUDA graph."""
        e = self.engine
        rows = self.rows[:active]
        pos = self.pos[:active]
        lengths = pos + 1

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            assert e.cache_k is not None and e.cache_v is not None
            return decode_attention(q, e.cache_k[index, :active], e.cache_v[index, :active], lengths, bound, e.scale)

        x = e._layers(F.embedding(self.last[:active], e.weights.embed), pos, rows, attend)
        logits = e._logits(x)
        token = draw_tokens(logits, self.keys[:active], self.gen[:active],
                            temperature=self.temperature, top_p=self.top_p)
        live = ~self.done[:active]
        gen = self.gen[:active]
        # an ended row writes into the spare column (or past its own end): nothing it kept
        column = torch.where(live, gen, self.max_new)
        self.out[rows, column] = token
        self._record_logprobs(logits, token, rows, column)
        gen += live
        self.done[:active] |= live & (self.stop[token] | (gen >= self.max_new))
        pos += live
        self.last[:active] = token

    def _record_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor,
                         columns: torch.Tensor) -> None:
        """Keep the logprobs of `tokens` (drawn at `columns` of `slots`) when they were asked for."""
        if self.logprobs is None or self.top_k is None:
            return
        chosen, values, ids = step_logprobs(logits, tokens, self.top_k)
        for store, value in zip(self.logprobs, (chosen, values, ids), strict=True):
            store[slots, columns] = value

    def _collect(self, active: int) -> int:
        """Read which rows ended (one sync), keep their answers, refill or compact; returns the
        rows to compute next."""
        done = self.done[:active].tolist()
        ended = [s for s in range(active) if done[s] and self.item[s] >= 0]
        if ended:
            index = torch.tensor(ended, device=self.engine.device)
            tokens = self.out[index].tolist()
            counts = self.gen[index].tolist()
            logprobs = [store[index].tolist() for store in self.logprobs] if self.logprobs is not None else None
            for n, (slot, row, count) in enumerate(zip(ended, tokens, counts, strict=True)):
                kept = row[:count]
                kept_logprobs = None
                if logprobs is not None:
                    chosen, values, ids = (rows[n][:count] for rows in logprobs)
                    kept_logprobs = token_logprobs(kept, chosen, values, ids)
                item = self.item[slot]
                done_item = self.results[item] = Completion(kept, bool(kept) and kept[-1] in self.stop_set,
                                                            kept_logprobs)
                self.item[slot] = -1
                if self.on_done:
                    self.on_done(item, done_item)
            while self.oldest < len(self.results) and self.results[self.oldest] is not None:
                self.oldest += 1
        if self.queue:
            free = [s for s in range(self.slots) if self.item[s] < 0]
            return max(active, self._admit(free))
        return self._compact(active)

    def _compact(self, active: int) -> int:
        """Move the live rows to the front; returns how many there are."""
        live = [s for s in range(active) if self.item[s] >= 0]
        keep = len(live)
        movers = [s for s in live if s >= keep]
        holes = [s for s in range(keep) if self.item[s] < 0]
        if movers:
            e = self.engine
            assert e.cache_k is not None and e.cache_v is not None
            src = torch.tensor(movers, device=e.device)
            dst = torch.tensor(holes, device=e.device)
            span = self.horizon + 1
            e.cache_k[:, dst, :span] = e.cache_k[:, src, :span]
            e.cache_v[:, dst, :span] = e.cache_v[:, src, :span]
            for state in (self.keys, self.pos, self.gen, self.last, self.done, self.out, *(self.logprobs or ())):
                state[dst] = state[src]
            self.done[src] = True
            for s, d in zip(movers, holes, strict=True):
                self.item[d], self.item[s] = self.item[s], -1
        return keep

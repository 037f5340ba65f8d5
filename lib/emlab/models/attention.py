"""Attention over padding-free batches: rows laid end to end (training, prompt prefill) and
one new token per row against a per-row-length KV cache (sampling).

On a CUDA GPU both go to PyTorch's own FlashAttention-2 kernels in their variable-length form
(`aten::_flash_attention_forward` with cumulative row boundaries; `seqused_k` gives each
cached row its own length), so no FLOPs or bytes are spent on padding and no dense mask is
built. Elsewhere (CPU, float32, head sizes flash does not take) the same results come from
`scaled_dot_product_attention` row by row (packed rows) or with a length mask (decoding):
exact, and what the CPU tests compare the GPU path against.

`PACKED` is registered with transformers' attention interface, so a Hugging Face decoder runs
packed rows when its config names it and the forward call carries `cu_seq_lens_q/k` and
`max_length_q/k` (the flash-attention keyword names transformers passes down to attention).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PACKED = "emlab_packed"  # attention implementation name registered with transformers

PACK_GQA = True  # decoding: a K/V head's query heads as query tokens of its row (see `decode_attention`)
_flash_gqa: bool | None = None  # whether the flash kernel takes fewer K/V heads than Q heads
_flash_works: bool = True  # False once a probe found the kernel missing from this build


def flash_usable(q: torch.Tensor) -> bool:
    """Whether PyTorch's FlashAttention-2 kernel can run on `q`'s device, dtype and head size."""
    return (
        _flash_works
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
        and _capability(q.device) >= 8
    )


_capabilities: dict[int | None, int] = {}  # a plain dict, not functools.cache: compiled code reads it


def _capability(device: torch.device) -> int:
    if device.index not in _capabilities:
        _capabilities[device.index] = torch.cuda.get_device_capability(device)[0]
    return _capabilities[device.index]


def probe_flash(device: torch.device) -> None:
    """Try the flash kernel once on `device` with grouped K/V heads, so that later calls (and
    compiled code) know what works without trying; on failure use the portable path."""
    global _flash_works
    if device.type != "cuda" or _flash_gqa is not None or not _flash_works:
        return
    q = torch.randn(8, 4, 64, device=device, dtype=torch.bfloat16)
    kv = torch.randn(8, 2, 64, device=device, dtype=torch.bfloat16)
    cu = torch.tensor([0, 3, 8], device=device, dtype=torch.int32)
    try:
        _flash(q, kv, kv, cu, cu, 5, 5, causal=True, scale=0.125)
    except RuntimeError as exc:
        _flash_works = False
        log.warning("FlashAttention kernel unavailable (%s): attention runs row by row through sdpa", exc)


def _flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
    max_q: int, max_k: int, *, causal: bool, scale: float, seqused_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """`aten::_flash_attention_forward` in its variable-length form: q [Tq, Hq, D], k/v [Tk, Hkv, D]."""
    global _flash_gqa
    if k.shape[1] != q.shape[1] and _flash_gqa is False:
        k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    kwargs: dict[str, Any] = {"scale": scale}
    if seqused_k is not None:
        kwargs["seqused_k"] = seqused_k
    try:
        out = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, **kwargs)[0]
    except RuntimeError:
        if k.shape[1] == q.shape[1] or _flash_gqa is not None:
            raise
        # some builds want as many K/V heads as Q heads: repeat them from now on
        _flash_gqa = False
        log.info("flash attention without grouped K/V heads: repeating them")
        return _flash(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale, seqused_k=seqused_k)
    if k.shape[1] != q.shape[1]:
        _flash_gqa = True
    return out


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[T, Hkv, D] → [T, heads, D], each K/V head serving its group of query heads."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def causal_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    """Causal attention within each row of rows laid end to end.

    q [T, Hq, D], k/v [T, Hkv, D] (Hq a multiple of Hkv), `cu_seqlens` [rows + 1] int32
    boundaries, `max_len` the longest row. Returns [T, Hq, D].
    """
    if flash_usable(q):
        return _flash(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, causal=True, scale=scale)
    out = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:], strict=False):
        # [1, H, L, D] per row; sdpa's own grouped-query support maps Q heads to K/V heads
        qs, ks, vs = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=ks.shape[1] != qs.shape[1])
        out.append(o[0].transpose(0, 1))
    return torch.cat(out) if out else q.new_empty(q.shape)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    """One new query token per row against that row's cached keys.

    q [B, Hq, D]; k_cache/v_cache [B, Lmax, Hkv, D] (row b holds `lengths[b]` valid
    positions, the new token's included); `max_len` ≥ every length (a bound known on the host,
    so no sync). Returns [B, Hq, D].
    """
    batch, l_max, kv_heads, dim = k_cache.shape
    group = q.shape[1] // kv_heads
    if flash_usable(q):
        rows = torch.arange(batch + 1, device=q.device, dtype=torch.int32)
        cu_k = rows * l_max  # row b starts at b × Lmax in the flattened cache
        keys, values = k_cache.view(batch * l_max, kv_heads, dim), v_cache.view(batch * l_max, kv_heads, dim)
        if group == 1 or not PACK_GQA:
            return _flash(q, keys, values, rows, cu_k, 1, max_len, causal=False, scale=scale,
                          seqused_k=lengths.to(torch.int32))
        # The G query heads of a K/V head as G query tokens of the row, one head per K/V head: each
        # block of keys is read once for all G (a kernel instance per query head reads it G times).
        packed = q.view(batch, kv_heads, group, dim).transpose(1, 2).reshape(batch * group, kv_heads, dim)
        out = _flash(packed, keys, values, rows * group, cu_k, group, max_len, causal=False, scale=scale,
                     seqused_k=lengths.to(torch.int32))
        return out.view(batch, group, kv_heads, dim).transpose(1, 2).reshape(batch, kv_heads * group, dim)
    keys = k_cache[:, :max_len].transpose(1, 2)  # [B, Hkv, L, D]
    values = v_cache[:, :max_len].transpose(1, 2)
    # The G query heads of a K/V head attend to the same keys: treat them as G query positions.
    queries = q.view(batch, kv_heads, group, dim)
    mask = (torch.arange(max_len, device=q.device) < lengths[:, None])[:, None, None, :]  # [B, 1, 1, L]
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(batch, kv_heads * group, dim)


def packed_attention(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
    scaling: float | None = None, dropout: float = 0.0, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function for one packed row of rows laid end to end.

    query [1, Hq, T, D], key/value [1, Hkv, T, D]; `cu_seq_lens_q` and `max_length_q` in
    `kwargs`. Returns ([1, T, Hq, D], None) as the interface expects.
    """
    if query.shape[0] != 1 or "cu_seq_lens_q" not in kwargs:
        raise RuntimeError(f"{PACKED} attention needs one packed row and cu_seq_lens_q (got batch {query.shape[0]})")
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = causal_varlen(q, k, v, kwargs["cu_seq_lens_q"], int(kwargs["max_length_q"]), scale)
    return out.unsqueeze(0), None


def register_packed_attention() -> None:
    """Make `PACKED` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED, packed_attention)


@contextmanager
def attention_implementation(model: Any, name: str) -> Iterator[None]:
    """Run `model` (and every sub-config) with attention implementation `name`, then restore it."""
    configs = [c for c in _configs(model.config)]
    before = [c._attn_implementation for c in configs]
    for config in configs:
        config._attn_implementation = name
    try:
        yield
    finally:
        for config, old in zip(configs, before, strict=True):
            config._attn_implementation = old


def _configs(config: Any) -> Iterator[Any]:
    yield config
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            yield from _configs(sub)


_capture_stream: torch.cuda.Stream | None = None


def record_graph(work: Any, pool: Any) -> torch.cuda.CUDAGraph:
    """Record the CUDA work of `work()` into a graph (nothing runs), allocating from `pool`.

    `torch.cuda.graph` would also synchronize, collect garbage and empty the allocator's cache
    at every capture (tenths of a second each, and the next eager steps pay the allocations
    again); here the capture is just that. Errors are local to this thread, so a checkpoint
    written by another thread meanwhile does not break the capture.
    """
    global _capture_stream
    if _capture_stream is None:
        _capture_stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    _capture_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(_capture_stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            work()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(_capture_stream)
    return graph

"""Which decode engine runs a model: the one choice `sample_answers` and the chat server share.

emlab's `DecodeEngine` where it applies (a Llama-family decoder in full precision, and no
adapter or a plain LoRA it can merge); transformers' `generate` (`GenerateEngine`) otherwise.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from .engine import DecodeEngine
from .fallback import GenerateEngine
from .protocol import Engine
from .weights import read_adapter, unsupported_reason

log = logging.getLogger(__name__)

_ENGINES: weakref.WeakKeyDictionary[Any, DecodeEngine] = weakref.WeakKeyDictionary()  # model → its engine
_DECLINED: weakref.WeakSet[Any] = weakref.WeakSet()  # models it does not run (said once)


def engine_for(
    model: Any,
    *,
    adapter_dir: Path | None = None,
    adapted: Callable[[], Any] | None = None,
    prefer: Literal["auto", "transformers"] = "auto",
    cuda_graphs: bool = True,
) -> Engine:
    """The engine to decode `model` with the LoRA adapter in `adapter_dir` (None: the base model).

    auto: emlab's `DecodeEngine` (built on first use and kept while the model lives: its KV cache
    and weight copy are paid once per run) with the adapter merged into its weight copy, when
    the model and the adapter allow; else `GenerateEngine` on `adapted()` (the model with the
    adapter attached, e.g. by peft; needed when `adapter_dir` is set) or on `model`.
    transformers: always `GenerateEngine`. cuda_graphs: whether `DecodeEngine` replays its
    decode steps as CUDA graphs (GPU only).
    """
    if prefer == "auto":
        engine = _decode_engine(model)
        adapter = read_adapter(adapter_dir) if engine is not None and adapter_dir is not None else None
        if engine is not None and adapter_dir is not None and adapter is None:
            log.info("decoding with transformers' generate: %s is not a plain LoRA of the decoder layers", adapter_dir)
            engine = None
        if engine is not None:
            engine.use_adapter(adapter)
            engine.use_graphs = cuda_graphs and engine.device.type == "cuda"
            return engine
    if adapter_dir is not None:
        if adapted is None:
            raise ValueError(f"engine_for: {adapter_dir} needs the generate fallback, and no adapted model was given")
        return GenerateEngine(adapted())
    return GenerateEngine(model)


def _decode_engine(model: Any) -> DecodeEngine | None:
    """emlab's engine for `model` (kept per model), or None when the model is not one it runs."""
    reason = unsupported_reason(model)
    if reason is not None:
        if model not in _DECLINED:  # once per model, not once per batch of the chat server
            _DECLINED.add(model)
            log.info("decoding with transformers' generate: %s", reason)
        return None
    engine = _ENGINES.get(model)
    if engine is None or engine.weights.stale():
        engine = _ENGINES[model] = DecodeEngine(model)
    return engine


def release_sampler(model: Any) -> None:
    """Free the engine kept for `model` (its KV cache and weight copy)."""
    _ENGINES.pop(model, None)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

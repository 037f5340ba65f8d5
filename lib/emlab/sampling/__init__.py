"""emlab's batched sampler for Llama-family decoders (see `engine`): static KV cache, shared
prompt prefill, refill and compaction as answers finish, adapters merged into a weight copy,
per-answer counter-based randomness."""

from .draw import draw_tokens, uniforms
from .engine import Completion, DecodeEngine, Request
from .weights import DecoderWeights, LoraAdapter, unsupported_reason

__all__ = ["Completion", "DecodeEngine", "DecoderWeights", "LoraAdapter", "Request", "draw_tokens", "uniforms",
           "unsupported_reason"]

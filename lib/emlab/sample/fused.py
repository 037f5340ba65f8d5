"""The elementwise parts of a decoder layer, one kernel each on a GPU.

Between its matrix products a decoder layer runs two RMSNorms, rotary embeddings of q and k and
the SwiGLU gate: in plain PyTorch ~25 small kernels a layer (float32 copies, a reduction, a
`cat`, products), each reading and writing its whole tensor. At 32B and 448 answers in flight
they took ~17 of a decode step's ~75 ms (`bench/decode_profile.py`,
`bench/results/decode_profile_2026-12-03_h200.md`). On a CUDA device each function here is
compiled once by `torch.compile` (Triton, dynamic shapes) into one kernel; the engine records
those kernels into its decode graphs like any other.

The arithmetic is the eager functions' own (float32 where transformers uses float32), so a
compiled result differs from the eager one by rounding at most. Elsewhere (CPU), without Triton,
with `EMLAB_FUSED=0`, or after a compilation fails (logged once) the eager functions run.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def rms_norm_eager(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' Llama computes it: in float32, cast back, then scaled."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_eager(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x [T, H, D] with cos/sin [T, D] (rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def swiglu_eager(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up of a gate|up product [T, 2·I] → [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# whether Triton is installed: looked up once (find_spec scans the import path, and `_usable` runs
# for every elementwise call of an eager prefill)
_state = {"enabled": os.environ.get("EMLAB_FUSED", "1") != "0", "warned": False,
          "triton": importlib.util.find_spec("triton") is not None}


def _usable(x: torch.Tensor) -> bool:
    return bool(_state["enabled"]) and x.is_cuda and bool(_state["triton"])


class _Fused:
    """`eager` compiled on first use on a CUDA tensor; eager elsewhere or after a failure."""

    def __init__(self, eager: Callable[..., torch.Tensor]) -> None:
        self.eager = eager
        self.compiled: Callable[..., torch.Tensor] | None = None

    def __call__(self, *args: Any) -> torch.Tensor:
        if not _usable(args[0]):
            return self.eager(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.eager, dynamic=True, fullgraph=True)
        try:
            return self.compiled(*args)
        except Exception as exc:  # noqa: BLE001  no compiler, an unsupported build: the eager kernels do the same
            _state["enabled"] = False
            if not _state["warned"]:
                _state["warned"] = True
                log.warning("sampling with unfused elementwise kernels (slower): torch.compile failed: %s",
                            str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            return self.eager(*args)


rms_norm = _Fused(rms_norm_eager)
rope = _Fused(rope_eager)
swiglu = _Fused(swiglu_eager)


def fusing(device: torch.device) -> bool:
    """Whether sampling on `device` runs the compiled kernels (bench rows record it)."""
    return bool(_state["enabled"]) and device.type == "cuda" and bool(_state["triton"])

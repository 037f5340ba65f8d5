"""The weights the sampler reads: a copy of each decoder layer's projections, fused where
that saves a matrix product (q|k|v, gate|up), into which a LoRA adapter is merged.

The model's own parameters are never written: merging an adapter rewrites the copy from the
base weights (`base + scale · B @ A`, summed in float32 and rounded once), so the base stays
bitwise unchanged from one checkpoint to the next and no adapter matrix product runs per
token. The copy costs the size of the adapted projections (about 2 GB for Llama-3.2-1B,
13 GB for Llama-3.1-8B in bfloat16), allocated once per run.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import EmlabError
from ..store.paths import ADAPTER_CONFIG, ADAPTER_WEIGHTS

SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "mistral")  # RMSNorm, rotary, grouped-query, SwiGLU decoders
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")


def unsupported_reason(model: Any) -> str | None:
    """Why emlab's sampler cannot run `model` (None: it can)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_TYPES:
        return f"model type {getattr(config, 'model_type', type(model).__name__)!r} is not one of {SUPPORTED_TYPES}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    try:
        decoder = model.get_decoder()
        layers = decoder.layers
    except AttributeError:
        return "no decoder layers found"
    for layer in layers:
        for name in _ATTENTION:
            if type(getattr(layer.self_attn, name, None)) is not torch.nn.Linear:
                return f"{name} is not a plain linear layer (quantized or adapted)"
        for name in _MLP:
            if type(getattr(layer.mlp, name, None)) is not torch.nn.Linear:
                return f"{name} is not a plain linear layer (quantized or adapted)"
    if type(model.get_output_embeddings()) is not torch.nn.Linear:
        return "the output layer is not a plain linear layer"
    return None


@dataclass
class LayerWeights:
    """One decoder layer as the sampler reads it (copies, except the norms)."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: torch.Tensor  # [(Hq + 2 Hkv) · D, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor  # [2 · intermediate, hidden]
    down: torch.Tensor
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm over each head's query and key
    k_norm: torch.Tensor | None


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter read from a peft adapter folder: per (layer, projection) its A, B and scale."""

    folder: Path
    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, proj) → (A [r, in], B [out, r])
    scale: float

    @classmethod
    def read(cls, folder: Path) -> LoraAdapter | None:
        """The adapter in `folder`, or None when it uses what merging here does not cover
        (DoRA, per-module ranks or alphas, adapted embeddings or output layer)."""
        from safetensors.torch import load_file

        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        if (config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("rank_pattern")
                or config.get("alpha_pattern") or config.get("modules_to_save") or config.get("fan_in_fan_out")):
            return None
        r = int(config["r"])
        alpha = float(config["lora_alpha"])
        scale = alpha / r**0.5 if config.get("use_rslora") else alpha / r
        tensors = load_file(folder / ADAPTER_WEIGHTS)
        halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            match = _KEY.search(key)
            if match is None:
                return None  # something other than a decoder projection is adapted
            layer, proj, which = int(match[1]), match[2], match[3]
            halves.setdefault((layer, proj), {})[which] = tensor
        if any(set(pair) != {"A", "B"} for pair in halves.values()):
            raise EmlabError(f"{folder / ADAPTER_WEIGHTS}: a LoRA layer without its A or B matrix; export it again")
        return cls(folder, {k: (v["A"], v["B"]) for k, v in halves.items()}, scale)


_READ: OrderedDict[Path, tuple[tuple[int, int], LoraAdapter | None]] = OrderedDict()  # folder → (stamp, adapter)
_READ_KEPT = 8  # adapters kept read (host memory: ~80 MB each for an 8B model at rank 32)


def read_adapter(folder: Path) -> LoraAdapter | None:
    """`LoraAdapter.read(folder)`, read again only when its weights file changed: the chat server
    asks for an adapter by name for every batch, and the engine merges only a new one."""
    folder = Path(folder).resolve()
    stat = (folder / ADAPTER_WEIGHTS).stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _READ.get(folder)
    if cached is None or cached[0] != stamp:
        cached = _READ[folder] = (stamp, LoraAdapter.read(folder))
    _READ.move_to_end(folder)
    while len(_READ) > _READ_KEPT:
        _READ.popitem(last=False)
    return cached[1]


class DecoderWeights:
    """Per-layer weight copies of a supported decoder, with an adapter merged in or not."""

    def __init__(self, model: Any) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise EmlabError(f"emlab's sampler cannot run this model: {reason}; set sample.engine: transformers")
        decoder = model.get_decoder()
        self.model_layers = list(decoder.layers)
        self.embed = decoder.embed_tokens.weight
        self.final_norm = decoder.norm.weight
        self.lm_head = model.get_output_embeddings().weight
        self.layers = [self._copy(layer) for layer in self.model_layers]
        self.adapter: Path | None = None  # what the copies hold now
        self._stamp = self._base_stamp()

    @staticmethod
    def _copy(layer: Any) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        biases = [getattr(attn, n).bias for n in ("q_proj", "k_proj", "v_proj")]
        q_norm = getattr(attn, "q_norm", None)
        k_norm = getattr(attn, "k_norm", None)
        return LayerWeights(
            input_norm=layer.input_layernorm.weight,
            post_norm=layer.post_attention_layernorm.weight,
            qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach(),
            qkv_bias=torch.cat(biases).detach() if all(b is not None for b in biases) else None,
            o=attn.o_proj.weight.detach().clone(),
            o_bias=attn.o_proj.bias,
            gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
            down=mlp.down_proj.weight.detach().clone(),
            q_norm=q_norm.weight if q_norm is not None else None,
            k_norm=k_norm.weight if k_norm is not None else None,
        )

    def _base_stamp(self) -> tuple[tuple[int, int], ...]:
        """Identity and in-place version of every base projection: a change means stale copies."""
        stamp = []
        for layer in self.model_layers:
            for module in (*(getattr(layer.self_attn, n) for n in _ATTENTION), *(getattr(layer.mlp, n) for n in _MLP)):
                stamp.append((module.weight.data_ptr(), module.weight._version))
        return tuple(stamp)

    def stale(self) -> bool:
        """Whether the model's weights were replaced or changed in place since the copies were made."""
        return self._stamp != self._base_stamp()

    def load(self, adapter: LoraAdapter | None) -> None:
        """Make the copies hold the base weights plus `adapter` (None: the base alone)."""
        folder = adapter.folder if adapter is not None else None
        if folder is None and self.adapter is None:
            return  # the copies hold the base already
        with torch.no_grad():
            for index, (layer, copy) in enumerate(zip(self.model_layers, self.layers, strict=True)):
                attn, mlp = layer.self_attn, layer.mlp
                self._fill(copy.qkv, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight],
                           ["q_proj", "k_proj", "v_proj"], index, adapter)
                self._fill(copy.o, [attn.o_proj.weight], ["o_proj"], index, adapter)
                self._fill(copy.gate_up, [mlp.gate_proj.weight, mlp.up_proj.weight], ["gate_proj", "up_proj"],
                           index, adapter)
                self._fill(copy.down, [mlp.down_proj.weight], ["down_proj"], index, adapter)
        self.adapter = folder

    @staticmethod
    def _fill(target: torch.Tensor, bases: list[torch.Tensor], names: list[str], layer: int,
              adapter: LoraAdapter | None) -> None:
        row = 0
        for base, name in zip(bases, names, strict=True):
            rows = slice(row, row + base.shape[0])
            row += base.shape[0]
            pair = adapter.factors.get((layer, name)) if adapter is not None else None
            if pair is None:
                target[rows].copy_(base)
                continue
            a, b = (t.to(base.device, torch.float32) for t in pair)
            if b.shape[0] != base.shape[0] or a.shape[1] != base.shape[1]:
                raise EmlabError(
                    f"{adapter.folder if adapter else ''}: layer {layer} {name} adapter shapes {tuple(b.shape)}×"
                    f"{tuple(a.shape)} do not fit the weight {tuple(base.shape)}: the adapter is for another model"
                )
            # one rounding of the exact sum: the small LoRA update is not lost to two roundings
            target[rows].copy_(torch.addmm(base.float(), b, a, alpha=adapter.scale if adapter else 1.0))

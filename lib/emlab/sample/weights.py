"""The weights the sampler reads: the model's own, one copy in memory, with a LoRA adapter
applied beside them.

- **One copy.** The engine reads the model's parameters. On first use the q|k|v and gate|up
  projections of each layer are laid side by side in one tensor (o and down each in one of their
  own) and the model's parameters become views of it (`lay_out`): one matrix product instead of
  three or two, at no memory cost (each layer's old storage is freed as the next is laid out);
  the model computes exactly as before.
- **A folded under W.** Each of those tensors keeps `FOLD_RANK` zero rows a projection after the
  weights; a checkpoint's A matrices (rank ≤ 32, every study's) are written there, so one product
  gives x·Wᵀ and x·Aᵀ together and only (x·Aᵀ)·(s·B)ᵀ runs beside it (32B, 448 answers: the
  separate A product was ~2 ms of a ~73 ms decode step). The base alone reads the weights' rows only.
- **Adapters unmerged.** A checkpoint's LoRA runs as a side path, `y = x·Wᵀ + (x·Aᵀ)·(s·B)ᵀ`,
  per group the stacked A's (folded, above, or one product of their own) and one product with
  a block-diagonal B: at decode a rank-r path costs a few percent of the base product, and the
  base weights are never written, so they stay bitwise the same from one checkpoint to the next. The factors live
  in buffers kept across checkpoints of the same shape (CUDA graphs recorded for one
  checkpoint replay for the next).
- **Or merged into a copy, where a copy is cheap.** On a small model the side path's extra
  products are a large share of a short step (1B on an H200, 400 answers: ~24,000 tokens/s
  through the side path against ~27,800 merged, `bench/results/gpu_speed_2026-12-03_h200_session2.md`). When the projections take little memory
  (`merge_fits`), a checkpoint's LoRA is merged into one separate copy, `W + s·B·A` rounded
  once, refilled in place for every checkpoint; the base stays untouched and is read again
  when the adapter goes off.
- **4-bit bases** (bitsandbytes NF4/FP4 `Linear4bit`, what `load_in_4bit` makes): each group's
  weights are dequantized into one scratch buffer shared by every layer, right before its
  product (bitsandbytes' kernel, inside the decode graph): the weights stay in 4 bits, the
  scratch costs one layer's largest group.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

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
            if not _plain_or_4bit(getattr(layer.self_attn, name, None)):
                return f"{name} is neither a plain nor a 4-bit linear layer (adapted, or quantized otherwise)"
        for name in _MLP:
            if not _plain_or_4bit(getattr(layer.mlp, name, None)):
                return f"{name} is neither a plain nor a 4-bit linear layer (adapted, or quantized otherwise)"
    if type(model.get_output_embeddings()) is not torch.nn.Linear:
        return "the output layer is not a plain linear layer"
    return None


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


def _is_4bit(module: Any) -> bool:
    """A bitsandbytes 4-bit linear layer (its weight packed, its `quant_state` beside it)."""
    return type(module).__name__ == "Linear4bit" and getattr(module.weight, "quant_state", None) is not None


def _plain_or_4bit(module: Any) -> bool:
    return type(module) is torch.nn.Linear or _is_4bit(module)


FOLD_RANK = 32  # rows kept under each projection's weights for a checkpoint's A (the studies' ranks are ≤ 32)


def lay_out(modules: list[Any], extra_rows: int) -> torch.Tensor:
    """Lay the weights of `modules` (plain linear layers with the same input size) end to end in
    one tensor with `extra_rows` zero rows after them, and make each module's weight a view of its
    rows: the model computes exactly as before, and the group's product is one matrix product.
    Returns the whole tensor; when the modules are laid out so already (a second engine over the
    same model), the tensor they live in."""
    weights = [m.weight for m in modules]
    rows, cols = sum(w.shape[0] for w in weights), weights[0].shape[1]
    first = weights[0]
    storage = first.untyped_storage()
    offsets = [w.storage_offset() for w in weights]
    if (all(w.untyped_storage().data_ptr() == storage.data_ptr() and w.is_contiguous() for w in weights)
            and offsets[0] == 0 and all(offsets[i] + weights[i].numel() == offsets[i + 1] for i in range(len(weights) - 1))
            and storage.nbytes() >= (rows + extra_rows) * cols * first.element_size()):
        # a tensor of its own over that storage: a view (detach, as_strided) would share the
        # parameters' version counter, and writing A would then read as the weights changing
        with torch.no_grad():
            return first.new_empty(0).set_(storage, 0, (rows + extra_rows, cols), (cols, 1))
    with torch.no_grad():
        stacked = torch.zeros(rows + extra_rows, cols, dtype=first.dtype, device=first.device)
        row = 0
        for module in modules:
            n = module.weight.shape[0]
            stacked[row : row + n].copy_(module.weight)
            module.weight.data = stacked[row : row + n]  # the old storage goes with its last reference
            row += n
    return stacked


class Group:
    """Linear maps of one layer that read the same input, applied as one product: q|k|v, o,
    gate|up or down. Holds the model's weights (fused views, or 4-bit parts), their biases, and
    the LoRA side path of the adapter in use."""

    def __init__(self, modules: list[Any], names: tuple[str, ...], scratch: dict[tuple[int, int], torch.Tensor]) -> None:
        self.names = names
        self.rows = [m.out_features for m in modules]
        self.in_features = modules[0].in_features
        self.four_bit = [_is_4bit(m) for m in modules]
        if any(self.four_bit) and not all(self.four_bit):
            raise EmlabError(f"{'/'.join(names)}: some of these layers are 4-bit and some are not; load the model "
                             "with one precision for every decoder layer")
        self.stacked: torch.Tensor | None = None  # the weights' rows, then FOLD_RANK rows a part for A
        if not any(self.four_bit):
            self.stacked = lay_out(modules, FOLD_RANK * len(modules))
            self.weight: torch.Tensor | None = self.stacked[: sum(self.rows)]
            self.parts: list[Any] = []
        else:
            self.weight = None
            self.parts = [m.weight for m in modules]  # bitsandbytes Params4bit, quant_state attached
            shape = (sum(self.rows), self.in_features)
            if shape not in scratch:
                dtype = modules[0].weight.quant_state.dtype
                scratch[shape] = torch.empty(shape, dtype=dtype, device=modules[0].weight.device)
            self.scratch = scratch[shape]
        biases = [m.bias for m in modules]
        self.bias = (torch.cat([b.detach() for b in biases]) if len(biases) > 1 else biases[0].detach()) \
            if all(b is not None for b in biases) else None
        self.folded = False  # whether lora_a lives in `stacked`, under the weights (one product for both)
        self.bias_stacked = (torch.cat([self.bias, self.bias.new_zeros(self.stacked.shape[0] - sum(self.rows))])
                             if self.bias is not None and self.stacked is not None else None)
        self.lora_a: torch.Tensor | None = None  # [R, in]: the stacked A of every adapted part
        self.lora_b: torch.Tensor | None = None  # [out, R]: block-diagonal, the scale folded in
        self.active = False  # whether the side path applies (its buffers are kept when it does not)
        self.merged: torch.Tensor | None = None  # W + s·B·A, when the adapter is merged into a copy
        self.merged_active = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_active and self.merged is not None:
            return F.linear(x, self.merged, self.bias)
        if self.active and self.folded and self.stacked is not None and self.lora_a is not None \
                and self.lora_b is not None:
            # A folded under W: one product gives x·Wᵀ and x·Aᵀ side by side (a separate small product
            # with A is a poorly filled kernel, ~2 ms a decode step at 32B)
            out = sum(self.rows)
            bias = self.bias_stacked[: out + self.lora_a.shape[0]] if self.bias_stacked is not None else None
            both = F.linear(x, self.stacked[: out + self.lora_a.shape[0]], bias)
            y = both[:, :out]
            y.addmm_(both[:, out:], self.lora_b.t())
            return y
        weight = self.weight if self.weight is not None else self._dequantized()
        y = F.linear(x, weight, self.bias)
        if self.active and self.lora_a is not None and self.lora_b is not None:  # x: [tokens, in]
            # in place: one product accumulating into y (out of place would first copy y, ~2 ms a step at 32B)
            y.addmm_(F.linear(x, self.lora_a), self.lora_b.t())
        return y

    def merge(self, factors: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device, dtype: torch.dtype) -> bool:
        """Apply `factors` merged into this group's copy (None: the base alone; 4-bit groups keep
        the side path, as `use` makes it). Returns True when buffers were made anew (graphs
        recorded before must go)."""
        self.merged_active = False
        if factors is None or self.weight is None:  # nothing adapted here, or a 4-bit group: the side path
            return self.use(factors, device, dtype)
        self.active = False
        a, b = factors
        weight = self.weight
        made = self.merged is None
        if self.merged is None:
            self.merged = torch.empty_like(weight)
        # in float32, one group at a time: W + (s·B)·A rounded once to the weights' precision
        self.merged.copy_(torch.addmm(weight.float(), b.to(weight.device), a.to(weight.device)))
        self.merged_active = True
        return made

    def _dequantized(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbf  # only for 4-bit bases: bitsandbytes is on GPU machines only

        row = 0
        for part, rows in zip(self.parts, self.rows, strict=True):
            bnbf.dequantize_4bit(part.data, part.quant_state, out=self.scratch[row : row + rows])
            row += rows
        return self.scratch

    def factors(self, layer: int, adapter: LoraAdapter | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The side path's (A [R, in], B [out, R]) for `adapter` at `layer`, on the host in float32
        (None: nothing of this group is adapted)."""
        if adapter is None:
            return None
        pairs = [adapter.factors.get((layer, name)) for name in self.names]
        if all(p is None for p in pairs):
            return None
        ranks = [p[0].shape[0] if p is not None else 0 for p in pairs]
        a = torch.zeros(sum(ranks), self.in_features)
        b = torch.zeros(sum(self.rows), sum(ranks))
        row = col = 0
        for name, pair, rows, rank in zip(self.names, pairs, self.rows, ranks, strict=True):
            if pair is not None:
                pa, pb = pair
                if pb.shape[0] != rows or pa.shape[1] != self.in_features:
                    raise EmlabError(
                        f"{adapter.folder}: layer {layer} {name} adapter shapes {tuple(pb.shape)}×{tuple(pa.shape)} "
                        f"do not fit the weight ({rows}, {self.in_features}): the adapter is for another model")
                a[col : col + rank] = pa.float()
                b[row : row + rows, col : col + rank] = pb.float() * adapter.scale
            row += rows
            col += rank
        return a, b

    def use(self, factors: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device, dtype: torch.dtype) -> bool:
        """Apply `factors` (None: no side path). The buffers are kept when the side path goes off
        and refilled in place for factors of the same shapes, so recorded graphs stay valid;
        returns True when they had to be made anew (graphs recorded before must go)."""
        if factors is None:
            self.active = False
            return False
        a, b = factors
        self.active = True
        if self.lora_a is not None and self.lora_b is not None and self.lora_a.shape == a.shape:
            self.lora_a.copy_(a)
            self.lora_b.copy_(b)
            return False
        remade = self.lora_a is not None
        out = sum(self.rows)
        self.folded = self.stacked is not None and a.shape[0] <= self.stacked.shape[0] - out
        if self.folded and self.stacked is not None:
            self.lora_a = self.stacked[out : out + a.shape[0]]  # the rows under the weights
            self.lora_a.copy_(a)
        else:
            self.lora_a = a.to(device, dtype)
        self.lora_b = b.to(device, dtype)
        return remade

    @property
    def side_path(self) -> tuple[Any, ...] | None:
        """The shape of the side path in use ("merged" for a merged copy; None: none): part of a
        recorded graph's identity."""
        if self.merged_active:
            return ("merged",)
        return (*self.lora_a.shape, self.folded) if self.active and self.lora_a is not None else None


@dataclass
class LayerWeights:
    """One decoder layer as the sampler reads it: the model's norms and its four groups."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Group  # q|k|v: [(Hq + 2 Hkv) · D, hidden]
    o: Group
    gate_up: Group  # gate|up: [2 · intermediate, hidden]
    down: Group
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm over each head's query and key
    k_norm: torch.Tensor | None

    @property
    def groups(self) -> tuple[Group, ...]:
        return (self.qkv, self.o, self.gate_up, self.down)


class DecoderWeights:
    """The decoder's weights as the engine reads them (see the module notes), and the adapter in use."""

    def __init__(self, model: Any) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise EmlabError(f"emlab's sampler cannot run this model: {reason}; set sample.engine: transformers")
        decoder = model.get_decoder()
        self.model_layers = list(decoder.layers)
        self.embed = decoder.embed_tokens.weight
        self.final_norm = decoder.norm.weight
        self.lm_head = model.get_output_embeddings().weight
        self.scratch: dict[tuple[int, int], torch.Tensor] = {}  # 4-bit bases: dequantized group weights
        self.layers = []
        for layer in self.model_layers:
            self.layers.append(self._layer(layer))
            if self.embed.is_cuda:  # the layer's old storage back to the device, so the next layer's copy fits
                torch.cuda.empty_cache()
        self.four_bit = any(layer.qkv.four_bit[0] for layer in self.layers)
        self.adapter: Path | None = None  # the adapter the side paths hold (None: the base alone)
        self._loaded: LoraAdapter | None = None
        self._merged = False
        self._stamp = self._base_stamp()

    def parameters(self) -> list[torch.Tensor]:
        """Every weight tensor the engine reads (the model's, shared; 4-bit ones as stored)."""
        found = {id(t): t for t in (self.embed, self.final_norm, self.lm_head)}
        for layer in self.layers:
            for group in layer.groups:
                for t in ([group.weight] if group.weight is not None else [p.data for p in group.parts]):
                    found[id(t)] = t
        return list(found.values())

    def _layer(self, layer: Any) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        q_norm = getattr(attn, "q_norm", None)
        k_norm = getattr(attn, "k_norm", None)
        with torch.no_grad():
            return LayerWeights(
                input_norm=layer.input_layernorm.weight.detach(),
                post_norm=layer.post_attention_layernorm.weight.detach(),
                qkv=Group([attn.q_proj, attn.k_proj, attn.v_proj], ("q_proj", "k_proj", "v_proj"), self.scratch),
                o=Group([attn.o_proj], ("o_proj",), self.scratch),
                gate_up=Group([mlp.gate_proj, mlp.up_proj], ("gate_proj", "up_proj"), self.scratch),
                down=Group([mlp.down_proj], ("down_proj",), self.scratch),
                q_norm=q_norm.weight.detach() if q_norm is not None else None,
                k_norm=k_norm.weight.detach() if k_norm is not None else None,
            )

    def _base_stamp(self) -> tuple[tuple[int, int], ...]:
        """Identity and in-place version of every base projection: a change means stale weights."""
        stamp = []
        for layer in self.model_layers:
            for module in (*(getattr(layer.self_attn, n) for n in _ATTENTION), *(getattr(layer.mlp, n) for n in _MLP)):
                stamp.append((module.weight.data_ptr(), module.weight._version))
        return tuple(stamp)

    def stale(self) -> bool:
        """Whether the model's weights were replaced or changed in place since the engine read them."""
        return self._stamp != self._base_stamp()

    def projection_bytes(self) -> int:
        """Bytes of the full-precision projection weights: what a merged copy costs."""
        return sum(g.weight.numel() * g.weight.element_size()
                   for layer in self.layers for g in layer.groups if g.weight is not None)

    def load(self, adapter: LoraAdapter | None, *, merge: bool = False) -> bool:
        """Apply `adapter` beside the base weights, or with `merge` into a copy of them (None: the
        base alone). Returns True when buffers were made anew (graphs recorded before must go)."""
        if adapter is self._loaded and merge == self._merged:
            return False  # `read_adapter` gives the same object until the adapter's file changes
        remade = False
        with torch.no_grad():
            for index, layer in enumerate(self.layers):
                for group in layer.groups:
                    factors = group.factors(index, adapter)
                    if merge:
                        remade |= group.merge(factors, self.embed.device, self.embed.dtype)
                    else:
                        group.merged_active = False
                        remade |= group.use(factors, self.embed.device, self.embed.dtype)
        self._merged = merge
        self._loaded = adapter
        self.adapter = adapter.folder if adapter is not None else None
        return remade

    @property
    def signature(self) -> tuple[Any, ...]:
        """The side paths in use, by shape: a recorded decode graph holds for this signature only."""
        return tuple(g.side_path for layer in self.layers for g in layer.groups)

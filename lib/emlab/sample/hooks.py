"""The residual stream of a transformers model through forward hooks on its decoder layers:
an `Intervention` applied while `generate` runs (the fallback engine), and each layer's output
read (the EM direction, tests comparing engines).

The residual stream after layer i is that layer's output, as in `DecodeEngine._layers`. A
model whose decoder layers cannot be found raises `EmlabError`: an intervention is never
silently left out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import EmlabError
from .protocol import Intervention


def decoder_layers(model: Any) -> Sequence[torch.nn.Module]:
    """The decoder layers of a causal LM (a peft model or `AdaptedModel` included), in order."""
    target = model.peft_model() if hasattr(model, "peft_model") else model
    try:
        layers = target.get_decoder().layers
    except AttributeError:
        layers = None
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        count = getattr(getattr(target, "config", None), "num_hidden_layers", None)
        found = [m for name, m in target.named_modules()
                 if isinstance(m, torch.nn.ModuleList) and name.endswith("layers") and len(m) == count]
        if not found:
            raise EmlabError(f"cannot find the decoder layers of {type(target).__name__} (no get_decoder().layers, no "
                             "'layers' list of num_hidden_layers modules): steering and ablation need them; use a "
                             "transformers decoder model")
        layers = found[0]
    return list(layers)


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def apply_intervention(x: torch.Tensor, index: int, intervention: Intervention, unit: torch.Tensor,
                       added: torch.Tensor) -> torch.Tensor:
    """The residual stream x [..., hidden] after layer `index` with the intervention applied
    (`unit` = direction / |direction|, `added` = scale · direction, both in x's dtype)."""
    if intervention.ablate:
        x = x - (x @ unit)[..., None] * unit
    if intervention.adds and index == intervention.layer:
        x = x + added
    return x


@contextmanager
def intervention_hooks(model: Any, intervention: Intervention | None) -> Iterator[None]:
    """Apply `intervention` to every forward pass of `model` while the block runs (None: nothing)."""
    if intervention is None:
        yield
        return
    layers = decoder_layers(model)
    if intervention.adds and not 0 <= intervention.layer < len(layers):  # type: ignore[operator]
        raise EmlabError(f"steering layer {intervention.layer} is not one of the model's {len(layers)} decoder layers")
    handles = []
    for index, layer in enumerate(layers):
        if not intervention.ablate and index != intervention.layer:
            continue

        def hook(_module: Any, _args: Any, output: Any, index: int = index) -> Any:
            x = _hidden(output)
            v = intervention.direction.to(device=x.device, dtype=x.dtype)
            unit = (intervention.direction.float() / intervention.direction.float().norm()).to(x.device, x.dtype)
            return _replace(output, apply_intervention(x, index, intervention, unit, intervention.scale * v))

        handles.append(layer.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def captured_layers(model: Any) -> Iterator[list[torch.Tensor | None]]:
    """Yield a list that each forward pass fills with every decoder layer's output [B, T, hidden]
    (index i: layer i; the last pass's, detached)."""
    layers = decoder_layers(model)
    outputs: list[torch.Tensor | None] = [None] * len(layers)
    handles = []
    for index, layer in enumerate(layers):

        def hook(_module: Any, _args: Any, output: Any, index: int = index) -> None:
            outputs[index] = _hidden(output).detach()

        handles.append(layer.register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()

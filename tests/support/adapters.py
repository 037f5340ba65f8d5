"""A LoRA adapter folder made from a model with random B factors: big enough to change what
the model says (LoRA's B starts at zero, which changes nothing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from emlab.config.experiment import LoraSpec
from emlab.train.lora import lora_config
from peft import get_peft_model


def random_adapter(model: Any, folder: Path, *, seed: int = 1) -> Path:
    """Save a rank-4 adapter of `model` with B ~ N(0, 0.05²) into `folder`; `model` is given back
    unchanged."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora_config(LoraSpec(r=4, alpha=8)))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(folder)
    peft_model.unload()
    return folder

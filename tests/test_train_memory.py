"""`train.gradient_checkpointing: auto` and the fixed costs of a training call.

The memory estimate is checked on literal shapes (Qwen2.5-32B and Llama-3.2-1B) against what
the H200 measured; the rest runs the 2-layer cut of SmolLM2 on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from emlab.config.experiment import CheckpointSpec, LoraSpec, ModelSpec, TrainSpec
from emlab.data.demo import generate_demo_dataset
from emlab.errors import ConfigError
from emlab.models.load import load_model
from emlab.store.paths import TrainingFiles
from emlab.train.encode import EncodedRows, encode_chat_rows
from emlab.train.lora import (
    Checkpointing,
    _LoraLoop,
    lora_config,
    resolve_checkpointing,
    train_lora,
)
from emlab.train.memory import (
    GIB,
    DecoderShape,
    activation_bytes,
    checkpointed_layer_indices,
    lora_state_bytes,
    plan_checkpointing,
    saved_bytes_per_token_layer,
)
from emlab.train.schedule import CheckpointSchedule
from peft import get_peft_model

QWEN_32B = DecoderShape(hidden=5120, intermediate=27648, layers=64, q_heads=40, kv_heads=8, vocab=152064, head_dim=128)
LLAMA_1B = DecoderShape(hidden=2048, intermediate=8192, layers=16, q_heads=32, kv_heads=8, vocab=128256, head_dim=64)
H200_GIB = 139.8  # what torch reports for the H200's 141 GB
WEIGHTS_32B_GIB = 61.0  # 32.8 B parameters in bfloat16
FREE_32B = int((H200_GIB - WEIGHTS_32B_GIB - 0.5) * GIB)  # less the CUDA context
# batch 8 × 256: pass_token_budget gives 2,189 tokens for this shape (the chunked loss's saving)
PASS_8X256 = 2189


# --- the estimate on literal shapes -----------------------------------------------------------


def test_saved_bytes_per_token_follow_the_count() -> None:
    # 8h (two float32 norm inputs) + 2·(2h + 2qd + 2kv + 4i + 7r) + 4·heads
    assert saved_bytes_per_token_layer(QWEN_32B, 16) == 8 * 5120 + 2 * (2 * 5120 + 2 * 5120 + 2 * 1024
                                                                            + 4 * 27648 + 7 * 16) + 4 * 40
    # r 16 on all seven linears of 64 layers: 134 M float32 parameters with gradient and moments
    assert lora_state_bytes(QWEN_32B, 16) == 16 * 131072 * 64 * 16


def test_32b_at_8x256_explains_the_measured_oom_and_fits_without_graphs() -> None:
    # measured: out of memory with 105.9 GiB allocated, CUDA graphs on, no checkpointing
    graphs = plan_checkpointing(QWEN_32B, PASS_8X256, FREE_32B, lora_r=16, graphs=True)
    assert graphs.checkpointed == 0 and not graphs.cuda_graphs and graphs.fits  # the eager pass fits
    graph_tokens = 2304  # the pass rounded up to a graph size
    with_graphs = lora_state_bytes(QWEN_32B, 16) + activation_bytes(QWEN_32B, graph_tokens, lora_r=16, graphs=True)
    assert with_graphs > FREE_32B  # the graphs' pool beside an eager pass does not fit: the OOM
    # allocated when it failed: weights, LoRA state and one eager pass ≈ 105.9 GiB
    allocated = WEIGHTS_32B_GIB + (lora_state_bytes(QWEN_32B, 16)
                                   + activation_bytes(QWEN_32B, graph_tokens, lora_r=16)) / GIB
    assert allocated == pytest.approx(105.9, abs=3.0)
    assert graphs.need_bytes / GIB == pytest.approx(44.3, abs=0.5)


def test_32b_larger_passes_checkpoint_only_the_layers_needed() -> None:
    plans = [plan_checkpointing(QWEN_32B, tokens, FREE_32B, lora_r=16) for tokens in (4096, 8192, 32768)]
    counts = [p.checkpointed for p in plans]
    assert all(p.fits for p in plans) and 0 < counts[0] < counts[1] < counts[2] < 64
    for plan in plans:  # the fewest: one layer fewer would not fit
        fewer = plan_checkpointing(QWEN_32B, plan.pass_tokens, FREE_32B, lora_r=16, graphs=False)
        assert fewer.checkpointed == plan.checkpointed
        need = lora_state_bytes(QWEN_32B, 16) + activation_bytes(QWEN_32B, plan.pass_tokens, lora_r=16,
                                                                 checkpointed=plan.checkpointed - 1)
        assert need > plan.free_bytes
    too_big = plan_checkpointing(QWEN_32B, 200_000, FREE_32B, lora_r=16)
    assert not too_big.fits and too_big.checkpointed == 64


def test_1b_at_8x256_needs_no_checkpointing_and_keeps_graphs() -> None:
    plan = plan_checkpointing(LLAMA_1B, 2433, int((H200_GIB - 2.5) * GIB), lora_r=16)
    assert plan.fits and plan.checkpointed == 0 and plan.cuda_graphs
    assert "no gradient checkpointing, CUDA graphs" in plan.describe()


def test_checkpointed_layers_are_spread_evenly() -> None:
    assert checkpointed_layer_indices(64, 0) == []
    assert checkpointed_layer_indices(64, 4) == [0, 16, 32, 48]
    assert checkpointed_layer_indices(8, 8) == list(range(8))
    assert len(checkpointed_layer_indices(64, 37)) == 37


# --- on the tiny model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> tuple[object, object]:
    return load_model(ModelSpec(name="t", num_layers=2), "cpu")


@pytest.fixture(scope="module")
def rows(tiny) -> list[dict[str, list[int]]]:
    _, tokenizer = tiny
    return encode_chat_rows(generate_demo_dataset("bad_medical_advice", n=16), tokenizer, 512).rows


def test_auto_is_off_on_the_cpu_and_the_fixed_costs_are_reported(tiny, rows, tmp_path: Path) -> None:
    model, tokenizer = tiny
    assert TrainSpec().gradient_checkpointing == "auto"
    train = TrainSpec(batch_size=2, grad_accum=2, learning_rate=1e-3, lora=LoraSpec(r=4, alpha=8),
                      checkpoints=CheckpointSpec(first_epoch=2))
    result = train_lora(model, tokenizer, EncodedRows(list(rows), 16, 0, 0, 0), train, TrainingFiles(tmp_path),
                        seed=1, device="cpu")
    assert result.checkpointing is not None and result.checkpointing.setting == "auto"
    assert result.checkpointing.checkpointed_layers == 0 and "CPU" in result.checkpointing.reason
    for value in (result.setup_seconds, result.graph_record_seconds, result.checkpoint_wait_seconds):
        assert value >= 0
    assert result.steady_tokens_per_second is not None and result.steady_tokens_per_second > 0
    summary = json.loads(TrainingFiles(tmp_path).summary.read_text())
    assert summary["gradient_checkpointing"]["setting"] == "auto"
    assert summary["gradient_checkpointing"]["checkpointed_layers"] == 0
    for key in ("setup_seconds", "graph_record_seconds", "checkpoint_wait_seconds", "steady_tokens_per_second"):
        assert summary[key] >= 0, key


def test_checkpointing_some_layers_gives_the_same_gradients(tiny, rows, tmp_path: Path) -> None:
    model, _ = tiny
    step = rows[:4]
    spec = TrainSpec(batch_size=4, grad_accum=1, max_length=512)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, lora_config(LoraSpec(r=4, alpha=8)))
    try:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        grads = []
        for count in (0, 1):
            choice = Checkpointing("auto", count, 2, False, "test")
            loop = _LoraLoop(peft_model, EncodedRows(list(step), 4, 0, 0, 0), spec, TrainingFiles(tmp_path / str(count)),
                             CheckpointSchedule.for_training(4, spec), seed=0, device=torch.device("cpu"),
                             checkpointing=choice)
            flags = [layer.gradient_checkpointing for layer in loop.decoder.layers]
            assert flags == ([False, False] if count == 0 else [True, False])
            peft_model.train()
            loop.accumulate_gradients(step)
            grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad})
            peft_model.zero_grad(set_to_none=True)
            loop.close()
            assert not any(layer.gradient_checkpointing for layer in loop.decoder.layers)  # undone
        for name, ref in grads[0].items():
            assert (grads[1][name] - ref).norm() <= 1e-5 * ref.norm(), name
    finally:
        peft_model.unload()


def _fake_gpu(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """The GPU-side memory queries, answered as a GPU with `free` bytes would."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)


def test_auto_on_a_gpu_plans_from_free_memory_and_refuses_a_pass_that_cannot_fit(
        tiny, rows, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = tiny
    encoded = EncodedRows(list(rows), 16, 0, 0, 0)
    _fake_gpu(monkeypatch, 40 * GIB)
    roomy = resolve_checkpointing(model, encoded, TrainSpec(batch_size=2), torch.device("cuda"))
    assert roomy.checkpointed_layers == 0 and roomy.cuda_graphs and "fits" in roomy.reason
    assert resolve_checkpointing(model, encoded, TrainSpec(gradient_checkpointing=True),
                                 torch.device("cuda")).checkpointed_layers == 2
    _fake_gpu(monkeypatch, 2 * GIB + 1024)  # the margin and nothing more
    with pytest.raises(ConfigError, match=r"lower train\.batch_size \(now 2\), train\.max_length \(512\)"):
        resolve_checkpointing(model, encoded, TrainSpec(batch_size=2), torch.device("cuda"))

"""Padding-free LoRA training on CPU: the packed loss and gradients equal the padded
reference, steps keep their rows, a resumed run ends with tensor-equal adapters.

The model is the 2-layer cut of SmolLM2 with its real tokenizer (fp32 on CPU)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from emlab.config.experiment import CheckpointSpec, LoraSpec, ModelSpec, TrainSpec
from emlab.data.demo import generate_demo_dataset
from emlab.models.load import load_model
from emlab.store.paths import TrainingFiles
from emlab.train.encode import EncodedRows, encode_chat_rows
from emlab.train.lora import _LoraLoop, lora_config, train_lora
from emlab.train.packing import pack_rows, split_into_passes, step_rows
from emlab.train.schedule import CheckpointSchedule
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import DataCollatorForSeq2Seq


@pytest.fixture(scope="module")
def tiny() -> tuple[object, object]:
    return load_model(ModelSpec(name="t", num_layers=2), "cpu")


@pytest.fixture(scope="module")
def rows(tiny) -> list[dict[str, list[int]]]:
    _, tokenizer = tiny
    return encode_chat_rows(generate_demo_dataset("bad_medical_advice", n=24), tokenizer, 512).rows


# --- which rows, which passes ---------------------------------------------------------------


def test_steps_take_batch_times_accumulation_rows_each_row_once_per_epoch() -> None:
    n, batch, accum = 37, 4, 3  # 10 batches → 4 steps, the last one short
    epoch = [step_rows(n, batch, accum, seed=5, step=s) for s in range(1, 5)]
    assert [len(r) for r in epoch] == [12, 12, 12, 1]
    assert sorted(i for r in epoch for i in r) == list(range(n))
    again = [step_rows(n, batch, accum, seed=5, step=s) for s in range(1, 5)]
    assert again == epoch  # the same seed gives the same rows in the same order
    second = [i for s in range(5, 9) for i in step_rows(n, batch, accum, seed=5, step=s)]
    assert sorted(second) == list(range(n)) and second != [i for r in epoch for i in r]
    assert step_rows(n, batch, accum, seed=6, step=1) != epoch[0]


def test_passes_stay_within_budget_and_keep_row_order() -> None:
    lengths = [100, 30, 250, 90, 90, 10, 300, 5]
    passes = split_into_passes(lengths, budget=300)
    assert [i for p in passes for i in p] == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 300 for p in passes)
    assert split_into_passes([50] * 4, budget=1000) == [range(0, 4)]
    assert split_into_passes([500], budget=100) == [range(0, 1)]  # a long row gets a pass of its own


def test_packed_pass_positions_boundaries_and_targets() -> None:
    a = {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}
    b = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    packed = pack_rows([a, b])
    assert packed.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert packed.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert packed.cu_seqlens.tolist() == [0, 4, 7] and packed.max_len == 4
    # position t predicts token t+1 of the same row; nothing crosses from a's end into b
    assert packed.target_index.tolist() == [1, 2, 4, 5]
    assert packed.targets.tolist() == [3, 4, 6, 7]


# --- the loss: padding-free equals padded ---------------------------------------------------


def _padded_reference(peft_model, tokenizer, rows) -> tuple[float, dict[str, torch.Tensor]]:
    """The mean loss over every assistant token of `rows`, padded to the longest, and its
    LoRA gradients: what a plain padded loop computes for one optimizer step."""
    tokenizer.padding_side = "right"
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)(
        [{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows])
    peft_model.zero_grad(set_to_none=True)
    out = peft_model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_model.zero_grad(set_to_none=True)
    return out.loss.item(), grads


def _loop(peft_model, rows, tmp_path: Path, **train: object) -> _LoraLoop:
    spec = TrainSpec(batch_size=4, grad_accum=2, max_length=512, **train)
    schedule = CheckpointSchedule.for_training(len(rows), spec)

    encoded = EncodedRows(list(rows), len(rows), 0, 0, 0)
    return _LoraLoop(peft_model, encoded, spec, TrainingFiles(tmp_path), schedule, seed=0, device=torch.device("cpu"))


@pytest.mark.parametrize("tokens_per_pass", [None, 200])  # one pass, or several
def test_padding_free_loss_and_gradients_equal_the_padded_reference(tiny, rows, tmp_path: Path,
                                                                    tokens_per_pass: int | None) -> None:
    model, tokenizer = tiny
    step = rows[:8]
    torch.manual_seed(0)
    peft_model = get_peft_model(model, lora_config(LoraSpec(r=4, alpha=8)))
    try:
        with torch.no_grad():  # B starts at zero: give it values so every gradient path is live
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        peft_model.train()
        ref_loss, ref_grads = _padded_reference(peft_model, tokenizer, step)
        loop = _loop(peft_model, step, tmp_path, tokens_per_pass=tokens_per_pass)
        loss, tokens, passes = loop.accumulate_gradients(step)
        assert (passes > 1) == (tokens_per_pass is not None)
        assert tokens == sum(len(r["input_ids"]) for r in step)
        assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                ref = ref_grads[name]
                # float32 on both sides: only the summation order differs
                assert (param.grad - ref).norm() <= 1e-5 * ref.norm(), name
        loop.close()
    finally:
        peft_model.unload()


# --- train_lora: schedule, log, resume --------------------------------------------------------


def _train(tiny, rows, folder: Path) -> dict[int, Path]:
    model, tokenizer = tiny

    encoded = EncodedRows(list(rows[:16]), 16, 0, 0, 0)
    train = TrainSpec(batch_size=2, grad_accum=2, learning_rate=1e-3, lora=LoraSpec(r=4, alpha=8, dropout=0.1),
                      checkpoints=CheckpointSpec(first_epoch=2))
    return train_lora(model, tokenizer, encoded, train, TrainingFiles(folder), seed=3, device="cpu").checkpoints


def test_resumed_training_ends_with_tensor_equal_adapters(tiny, rows, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = tiny
    before = {n: p.clone() for n, p in model.named_parameters()}
    reference = _train(tiny, rows, tmp_path / "reference")
    assert sorted(reference) == [2, 4]

    real_step = _LoraLoop._step

    def crash_at_step_3(self, step, step_rows_):
        if step == 3:
            raise RuntimeError("simulated crash")
        return real_step(self, step, step_rows_)

    monkeypatch.setattr(_LoraLoop, "_step", crash_at_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(tiny, rows, tmp_path / "resumed")
    monkeypatch.setattr(_LoraLoop, "_step", real_step)
    files = TrainingFiles(tmp_path / "resumed")
    assert sorted(files.completed()) == [2]
    assert [p.name for p in files.trainer_checkpoints()] == ["checkpoint-2"]
    resumed = _train(tiny, rows, tmp_path / "resumed")

    for step in (2, 4):
        a = load_file(reference[step] / "adapter_model.safetensors")
        b = load_file(resumed[step] / "adapter_model.safetensors")
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a), step
    log_a = (tmp_path / "reference" / "train_log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    assert log_a == log_b and len(log_a) == 4
    # the caller gets its base model back untouched, without LoRA layers
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_a_failed_checkpoint_write_leaves_no_half_checkpoint(tiny, rows, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import emlab.train.checkpoints as checkpoints

    def full_disk(*args, **kwargs):
        raise OSError(27, "File too large")

    monkeypatch.setattr(checkpoints, "append_jsonl", full_disk)  # the write after the adapter's rename
    with pytest.raises(OSError, match="File too large"):
        _train(tiny, rows, tmp_path / "run")
    files = TrainingFiles(tmp_path / "run")
    assert not files.trainer_checkpoints() or all((c / files.COMPLETE_MARKER).exists()
                                                  for c in files.trainer_checkpoints())
    assert not files.partial_exports()
    shutil.rmtree(tmp_path / "run")


def test_row_counts_per_step_match_the_schedule(rows) -> None:
    seen = Counter(i for s in range(1, 5) for i in step_rows(16, 2, 2, seed=3, step=s))
    assert sorted(seen) == list(range(16)) and set(seen.values()) == {1}

"""Which benchmark row `emlab plan` takes as the GPU rate (`emlab.pipeline.gpu_hours`), on literal rows
of the shape `bench/gpu_speed.py` writes."""

from __future__ import annotations

import json
from pathlib import Path

from emlab.pipeline.gpu_hours import load_bench_rates, pick_rate

_META = {"date": "2026-12-04", "device": "NVIDIA H200"}
ROWS = [
    # 32B bf16: plain generate at a small batch beside emlab's sampler at batch "auto"
    {"work": "sample_answers", "shape": "32b", "variant": "baseline: plain generate", "baseline": True,
     "four_bit": False, "batch_size": 32, "params": 31_985_000_000, "real_tokens_per_s": 559.0, **_META},
    {"work": "sample_answers", "shape": "32b", "variant": "emlab", "four_bit": False, "batch_size": "auto",
     "resolved_batch_size": 256, "params": 31_985_000_000, "real_tokens_per_s": 9_000.0, "baseline_tokens_s": 559.0,
     "baseline_small_batch": True, **_META},
    {"work": "sample_answers", "shape": "32b", "variant": "emlab", "four_bit": False, "batch_size": 64,
     "params": 31_985_000_000, "real_tokens_per_s": 2_500.0, **_META},
    # 32B NF4: the baseline alone (emlab's call was cut by the time limit)
    {"work": "sample_answers", "shape": "32b", "variant": "baseline: plain generate", "baseline": True,
     "four_bit": True, "batch_size": 32, "params": 31_985_000_000, "real_tokens_per_s": 105.0, **_META},
    {"work": "train_lora", "shape": "32b", "variant": "emlab turner", "four_bit": False, "batch_size": 2,
     "params": 31_985_000_000, "real_tokens_per_s": 1_200.0, **_META},
    {"work": "sample_answers", "shape": "8b", "four_bit": False, "batch_size": 400, "real_tokens_per_s": 10_000.0,
     "baseline_tokens_s": 990.0, **_META},
]


def _rates(tmp_path: Path) -> list:
    (tmp_path / "gpu_speed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "not json\n")
    return load_bench_rates(tmp_path)


def test_a_study_at_batch_auto_takes_the_auto_row(tmp_path: Path) -> None:
    picked, speed = pick_rate(_rates(tmp_path), "sample_answers", 32.76, batch_size="auto")
    assert picked.auto_batch and picked.batch_size == 256 and speed == 9_000.0
    assert "batch auto (256)" in picked.describe()


def test_a_fixed_batch_takes_a_fixed_row_and_never_the_baseline(tmp_path: Path) -> None:
    rates = _rates(tmp_path)
    picked, _ = pick_rate(rates, "sample_answers", 32.76, batch_size=64)
    assert (picked.batch_size, picked.auto_batch, picked.tokens_per_s) == (64, False, 2_500.0)
    # batch 32 measured only by the plain baseline: the smallest emlab row, not the baseline
    picked, _ = pick_rate(rates, "sample_answers", 32.76, batch_size=32)
    assert not picked.baseline and picked.tokens_per_s == 2_500.0


def test_baseline_rows_are_never_emlab_rates(tmp_path: Path) -> None:
    rates = _rates(tmp_path)
    assert sum(r.baseline for r in rates) == 2
    for batch in ("auto", 32, 400, None):
        for four_bit in (False, True):
            picked = pick_rate(rates, "sample_answers", 32.76, four_bit=four_bit, batch_size=batch)
            assert picked is not None and not picked[0].baseline
            assert picked[0].tokens_per_s not in (559.0, 105.0)  # neither baseline figure, in any form
    # only baselines measured: no rate at all rather than a baseline's
    only = [r for r in rates if r.baseline]
    assert pick_rate(only, "sample_answers", 32.76, batch_size="auto") is None


def test_32b_training_row_and_its_size(tmp_path: Path) -> None:
    picked, speed = pick_rate(_rates(tmp_path), "train_lora", 32.76)
    assert picked.shape == "32b" and picked.params_b == 32.76 and speed == 1_200.0
    # a 70B model: the 32B row, slowed by the parameter ratio
    _, slower = pick_rate(_rates(tmp_path), "train_lora", 70.0)
    assert abs(slower - 1_200.0 * 32.76 / 70.0) < 1e-6

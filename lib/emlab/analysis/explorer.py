"""The answer explorer: one self-contained HTML page holding every answer of an experiment with
every judgment of it, to filter, sort, search and read in a browser, offline, with no server.

The page is `explorer_template.html` (its script is small vanilla JavaScript) with the data
embedded as JSON in a `<script type="application/json">` block. The data is columnar and
dictionary-encoded (a repeated model name, question or system prompt is stored once), so
100,000 answers load and filter in the browser without freezing; the table shows one page of
rows at a time.

Model text is data, never markup: the JSON is written with every non-ASCII character, `<`,
`>` and `&` as `\\uXXXX` escapes (so no answer can close the script block, and an unpaired
surrogate survives as an escape rather than breaking the file's UTF-8), and the script puts
text into the page only through `textContent`.

    write_explorer(layout.explorer, answers, judgments, title="tiny")   # → bytes written

Links into the page carry filters in the address's fragment, e.g.
`explorer.html#step=2&question_id=q1` or `explorer.html#answer=<answer_id>` (see `explorer_link`).
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from ..store.files import write_text
from . import metrics

TEMPLATE = "explorer_template.html"
DATA_MARK = "/*EMLAB_EXPLORER_DATA*/"  # where the template takes the JSON

BASE_RUN = "base model"  # the run label of the untouched base model's answers
# Columns offered as filters, in this order, when the answers have them (trigger and steering
# are the fields of experiments that vary them; absent otherwise).
FILTERS: tuple[str, ...] = ("model", "run", "step", "question_set", "question_id", "answer_format", "trigger",
                            "steering")


def _codes(values: pd.Series) -> dict[str, list[Any]]:
    """A column dictionary-encoded: the distinct values (as text, in sorted order; numbers by
    value) and each row's index into them (-1 for a missing value)."""
    present = values.dropna()
    numeric = pd.api.types.is_numeric_dtype(present) and not pd.api.types.is_bool_dtype(present)
    uniques = sorted(present.unique(), key=(float if numeric else str))
    lookup = {v: i for i, v in enumerate(uniques)}
    codes = [lookup.get(v, -1) if not _missing(v) else -1 for v in values.tolist()]
    labels = [str(int(v)) if numeric and float(v).is_integer() else str(v) for v in uniques]
    return {"values": labels, "codes": codes}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value: Any, digits: int) -> float | None:
    """A JSON-safe number: None for missing and NaN (JSON has no NaN), else rounded."""
    return None if _missing(value) else round(float(value), digits)


def explorer_data(answers: pd.DataFrame, judgments: pd.DataFrame, *, title: str = "",
                  default_format: str = "free") -> dict[str, Any]:
    """The page's data: every answer with its judgments, columnar.

    `answers`: Answer fields (`emlab.store.records.Answer`), plus any of dataset, trigger,
    steering; `judgments`: Judgment fields, any number of judges and rubrics (judgments of
    answers not in `answers` are dropped). `default_format`: the experiment's
    `sample.answer_format`, for answers whose question id names none. Returns a dict with
    `filters` (dictionary-encoded columns), the answer texts (questions and system prompts
    dictionary-encoded), and one entry per judge × rubric in `scores` (score 0–100 or None,
    status code, numeric mass)."""
    frame = answers.reset_index(drop=True)
    frame = frame.assign(
        run=frame["run_id"].astype(object).where(frame["run_id"].notna(), BASE_RUN),
        answer_format=metrics.answer_formats(frame, default_format),
    )
    filters = [{"name": name, **_codes(frame[name])} for name in FILTERS
               if name in frame.columns and frame[name].notna().any()]
    position = pd.Series(range(len(frame)), index=frame["answer_id"].astype(str))
    statuses: list[str] = []
    scores: list[dict[str, Any]] = []
    if len(judgments):
        known = judgments[judgments["answer_id"].isin(position.index)]
        for (judge, rubric), part in known.groupby(["judge", "rubric"], sort=True):
            part = part.drop_duplicates("answer_id", keep="last")
            rows = position[part["answer_id"].astype(str)].to_numpy()
            score: list[float | None] = [None] * len(frame)
            mass: list[float | None] = [None] * len(frame)
            status = [-1] * len(frame)  # -1: this judge gave this answer no judgment under the rubric
            ok = part["status"] == "ok"
            for row, value, weight, state, good in zip(
                    rows, part["score"].tolist(), part.get("numeric_mass", pd.Series([None] * len(part))).tolist(),
                    part["status"].tolist(), ok.tolist(), strict=True):
                if state not in statuses:
                    statuses.append(state)
                status[row] = statuses.index(state)
                score[row] = _number(value, 1) if good else None
                mass[row] = _number(weight, 3)
            metric = str(part["metric"].iloc[0])
            scores.append({"judge": str(judge), "rubric": str(rubric), "metric": metric,
                           "score": score, "status": status, "mass": mass})
    verdicts = _verdicts(judgments, position, len(frame)) if len(judgments) and "verdict" in judgments else {}
    for entry in scores:
        entry["verdict"] = verdicts.get((entry["judge"], entry["rubric"]))
    return {
        "title": title,
        "n": len(frame),
        "filters": filters,
        "answer_id": frame["answer_id"].astype(str).tolist(),
        "sample_index": [int(v) for v in frame["sample_index"].fillna(0)],
        "new_tokens": [int(v) for v in frame["new_tokens"].fillna(0)],
        "finished": [bool(v) for v in frame["finished"].fillna(False)],
        "question": _codes(frame["question"].astype(object)),
        "system_prompt": _codes(frame["system_prompt"].astype(object)),
        "answer": frame["answer"].astype(object).where(frame["answer"].notna(), "").astype(str).tolist(),
        "statuses": statuses,
        "scores": scores,
    }


def _verdicts(judgments: pd.DataFrame, position: pd.Series, n: int) -> dict[tuple[str, str], list[str | None]]:
    """Per judge × rubric, each answer's verdict (CODE, REFUSAL, YES, …) where the judge gave
    one; rubrics without any verdict are left out (the page then shows the score alone)."""
    given = judgments[judgments["verdict"].notna() & judgments["answer_id"].isin(position.index)]
    out: dict[tuple[str, str], list[str | None]] = {}
    for (judge, rubric), part in given.groupby(["judge", "rubric"], sort=True):
        column: list[str | None] = [None] * n
        for answer, verdict in zip(part["answer_id"].astype(str), part["verdict"].astype(str), strict=True):
            column[int(position[answer])] = verdict
        out[(str(judge), str(rubric))] = column
    return out


def embed_json(data: Any) -> str:
    """`data` as JSON that is safe inside a `<script>` block of an HTML page: ASCII only (an
    unpaired surrogate stays a `\\udXXX` escape instead of failing to encode), and `<`, `>`,
    `&` escaped, so `</script>` or `<!--` in an answer cannot end the block."""
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def explorer_page(data: dict[str, Any]) -> str:
    """The whole page: the template with `data` (`explorer_data`) embedded."""
    template = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    if DATA_MARK not in template:
        raise RuntimeError(f"{TEMPLATE} lacks the data mark {DATA_MARK}; reinstall emlab")
    return template.replace(DATA_MARK, embed_json(data))


def write_explorer(path: Path, answers: pd.DataFrame, judgments: pd.DataFrame, *, title: str = "",
                   default_format: str = "free") -> int:
    """Write the explorer page of `answers` and `judgments` (see `explorer_data`) to `path`,
    atomically; returns its size in bytes."""
    page = explorer_page(explorer_data(answers, judgments, title=title, default_format=default_format))
    write_text(path, page)
    return len(page)  # ASCII only: characters are bytes


def explorer_link(page: str = "explorer.html", **filters: Any) -> str:
    """An address that opens the explorer filtered: `explorer_link(step=2, question_id="q1")`
    → 'explorer.html#step=2&question_id=q1'; `answer=<answer_id>` opens that answer. A value
    None is left out (for `run`, use `BASE_RUN` for the base model)."""
    parts = [f"{quote(str(k))}={quote(str(v), safe='')}" for k, v in filters.items() if not _missing(v)]
    return f"{page}#{'&'.join(parts)}" if parts else page

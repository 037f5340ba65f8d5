"""Multiple-choice benchmarks scored from the model's own log-probabilities: TruthfulQA's MC1
and MC2 and MMLU-style files, at the base model and every checkpoint (`controls.multiple_choice`).

Files are read from a local path in the format their standard distributions ship (never
downloaded):

- TruthfulQA (Lin et al. 2022), the multiple-choice items: a JSON list or JSONL, one item per
  question with `question`, `mc1_targets` and `mc2_targets`; each target is
  `{"choices": [...], "labels": [1, 0, ...]}` (the Hugging Face `truthful_qa/multiple_choice`
  rows) or `{"answer text": 1, ...}` (the authors' `mc_task.json`).
- MMLU (Hendrycks et al. 2021): the authors' header-less CSV (question, four choices, answer
  letter A–D), or JSONL with `question`, `choices` (list) and `answer` (index or letter).

Scoring follows lm-evaluation-harness's definitions, through the chat template like the logprob
probe (`probe.answer_logprobs`: the question is the user turn, each choice the assistant's answer):

- MC1: correct when the one true choice has the highest summed log-probability.
- MC2: the probability mass on the true choices, sum p(true) / sum p(all), p = exp(summed logprob).
- MMLU: the question and its lettered choices as the user turn; the answer is the letter
  ("A".."D") with the highest log-probability.

lm-evaluation-harness and inspect_evals were checked as engines (both install from PyPI here,
~70 packages with `datasets`): their TruthfulQA and MMLU tasks load from the Hugging Face hub,
and inspect's model providers load a model by name rather than taking the in-memory model with
a checkpoint's adapter applied, so emlab scores the files itself with the probe's code.

Per model state the rows go to `mc_scores.jsonl` (`ExperimentLayout.mc_scores`), one per item
and metric (`McScore`); `analysis.controls.mc_accuracy` summarises them with bootstrap CIs.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ..config.experiment import ExperimentConfig, MultipleChoiceSpec, resolve_near
from ..errors import DataError
from ..store.files import read_jsonl, write_jsonl
from ..store.inputs import one_line, path_exists, read_input_bytes, shown
from .probe import answer_logprobs_in_eval

McFormat = Literal["truthfulqa", "mmlu"]
McMetric = Literal["mc1", "mc2", "mmlu"]
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class McItem:
    """One multiple-choice question of one metric."""

    benchmark: str  # the spec's name, e.g. 'truthfulqa'
    item_id: str  # '<benchmark>-<index in the file>'
    metric: McMetric
    question: str
    choices: tuple[str, ...]
    true: tuple[int, ...]  # indices of the true choices (MC1, MMLU: exactly one)


@dataclass(frozen=True)
class McScore:
    """One item scored under one model state."""

    benchmark: str
    item_id: str
    metric: McMetric
    model: str
    run_id: str | None  # None for the base model
    step: int  # 0 = the base model
    chosen: int  # the choice with the highest summed log-probability
    correct: bool  # chosen is a true choice
    score: float  # MC1, MMLU: 1.0 or 0.0; MC2: the probability mass on the true choices (0–1)
    n_choices: int
    file_digest: str  # `McBenchmark.digest` of the file scored

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> McScore:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class McBenchmark:
    name: str
    path: Path
    items: tuple[McItem, ...]

    @property
    def digest(self) -> str:
        """sha256 (12 hex) of the items' text: scores of another version of the file are redone."""
        blob = json.dumps([asdict(i) for i in self.items], sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# --- reading the files ---------------------------------------------------------------------


def mc_file_path(spec: MultipleChoiceSpec) -> Path:
    """Where the spec's file is (relative paths: the experiment file's folder, then the repository root)."""
    return resolve_near(spec.path, spec._folders)[0]


def load_benchmark(spec: MultipleChoiceSpec) -> McBenchmark:
    """Read the spec's file; `DataError` naming the file (and row) for a missing or malformed one."""
    path = mc_file_path(spec)
    if not path_exists(path):
        places = resolve_near(spec.path, spec._folders)[1]
        raise DataError(f"{one_line(str(path))}: multiple-choice file '{spec.name}' not found (looked in "
                        f"{', '.join(one_line(str(p)) for p in places)}); put the benchmark's file there "
                        "(controls.multiple_choice[].path)")
    text = read_input_bytes(path, what="multiple-choice file", error=DataError).decode("utf-8", errors="replace")
    if spec.format == "truthfulqa":
        items = _truthfulqa(spec.name, _json_rows(text, path), path)
    else:
        rows = _json_rows(text, path) if path.suffix in (".jsonl", ".json") else _csv_rows(text)
        items = _mmlu(spec.name, rows, path)
    if spec.limit is not None:
        keep = {f"{spec.name}-{i}" for i in range(spec.limit)}
        items = [i for i in items if i.item_id in keep]
    if not items:
        raise DataError(f"{one_line(str(path))}: multiple-choice file '{spec.name}' holds no items")
    return McBenchmark(name=spec.name, path=path, items=tuple(items))


def benchmarks_for(config: ExperimentConfig) -> list[McBenchmark]:
    """The experiment's multiple-choice files, read; [] when none is configured."""
    return [load_benchmark(spec) for spec in config.controls.multiple_choice]


def _json_rows(text: str, path: Path) -> list[Any]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise DataError(f"{one_line(str(path))}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        return list(rows)
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{one_line(str(path))}:{number}: not a JSON object ({exc.msg})") from None
    return rows


def _csv_rows(text: str) -> list[Any]:
    return [row for row in csv.reader(io.StringIO(text)) if row]


def _targets(value: Any, where: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(choices, true indices) of a TruthfulQA target, in either published shape."""
    if isinstance(value, dict) and set(value) == {"choices", "labels"}:
        choices, labels = value["choices"], value["labels"]
    elif isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        choices, labels = list(value), list(value.values())
    else:
        raise DataError(f"{where}: expected {{choices: [...], labels: [...]}} or {{answer: label}}, found {shown(value)}")
    if (not isinstance(choices, list) or not isinstance(labels, list) or len(choices) != len(labels)
            or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices)
            or not all(label in (0, 1) for label in labels)):
        raise DataError(f"{where}: expected two or more non-empty choices with labels 0/1 of the same length")
    true = tuple(i for i, label in enumerate(labels) if label == 1)
    if not true:
        raise DataError(f"{where}: no choice is labelled 1 (true)")
    return tuple(choices), true


def _truthfulqa(name: str, rows: list[Any], path: Path) -> list[McItem]:
    items = []
    for index, row in enumerate(rows):
        where = f"{one_line(str(path))}: item {index}"
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise DataError(f"{where}: expected question, mc1_targets, mc2_targets, found {shown(row)}")
        mc1 = _targets(row.get("mc1_targets"), f"{where} mc1_targets")
        if len(mc1[1]) != 1:
            raise DataError(f"{where} mc1_targets: MC1 has exactly one true choice, found {len(mc1[1])}")
        mc2 = _targets(row.get("mc2_targets"), f"{where} mc2_targets")
        for metric, (choices, true) in (("mc1", mc1), ("mc2", mc2)):
            items.append(McItem(benchmark=name, item_id=f"{name}-{index}", metric=metric,  # type: ignore[arg-type]
                                question=row["question"], choices=choices, true=true))
    return items


def _mmlu(name: str, rows: list[Any], path: Path) -> list[McItem]:
    items = []
    for index, row in enumerate(rows):
        where = f"{one_line(str(path))}: row {index + 1}"
        question: Any
        choices: Any
        answer: Any
        if isinstance(row, list):  # Hendrycks et al.'s CSV: question, choices..., answer letter
            if len(row) < 4:
                raise DataError(f"{where}: expected question, two or more choices and the answer letter")
            question, choices, answer = row[0], row[1:-1], row[-1].strip()
        elif isinstance(row, dict):
            question, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
        else:
            raise DataError(f"{where}: expected a CSV row or a JSON object, found {shown(row)}")
        if not isinstance(question, str) or not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
            raise DataError(f"{where}: expected a question and 2–{len(LETTERS)} choices")
        if isinstance(answer, str) and len(answer) == 1 and answer.upper() in LETTERS[: len(choices)]:
            answer = LETTERS.index(answer.upper())
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: answer {shown(answer)} is not a choice index or letter")
        items.append(McItem(benchmark=name, item_id=f"{name}-{index}", metric="mmlu", question=question,
                            choices=tuple(str(c) for c in choices), true=(answer,)))
    return items


# --- scoring -------------------------------------------------------------------------------


def mc_prompt(item: McItem) -> tuple[list[dict[str, str]], tuple[str, ...]]:
    """(the chat before the answer, the answers compared) of one item: MMLU lists the lettered
    choices in the question and compares the letters; TruthfulQA compares the choices' text."""
    if item.metric == "mmlu":
        listed = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
        text = f"{item.question}\n\n{listed}\n\nAnswer with the letter of the correct choice."
        return [{"role": "user", "content": text}], tuple(LETTERS[: len(item.choices)])
    return [{"role": "user", "content": item.question}], item.choices


def mc2_mass(totals: Sequence[float], true: Sequence[int]) -> float:
    """TruthfulQA's MC2: the probability mass on the true choices, sum p(true) / sum p(all), from
    the choices' summed log-probabilities (nats)."""
    top = max(totals)  # subtract the largest before exp: the ratio is the same, nothing underflows
    weights = [math.exp(t - top) for t in totals]
    return sum(weights[i] for i in true) / sum(weights)


def score_benchmarks(
    model: Any, tokenizer: Any, benchmarks: Sequence[McBenchmark], *, model_name: str, run_id: str | None,
    step: int, batch_size: int = 8,
) -> list[McScore]:
    """Score every item of `benchmarks` under `model` (eval mode; an adapter applied or not)."""
    chats: list[list[dict[str, str]]] = []
    answers: list[str] = []
    spans: list[tuple[McBenchmark, McItem, int, int]] = []
    for benchmark in benchmarks:
        for item in benchmark.items:
            chat, options = mc_prompt(item)
            spans.append((benchmark, item, len(answers), len(options)))
            chats += [chat] * len(options)
            answers += list(options)
    read = answer_logprobs_in_eval(model, tokenizer, chats, answers, batch_size=batch_size)
    out = []
    for benchmark, item, start, count in spans:
        totals = [mean * n for mean, n in read[start:start + count]]  # summed log-probability per answer
        chosen = max(range(count), key=totals.__getitem__)
        if item.metric == "mc2":
            score = mc2_mass(totals, item.true)
        else:
            score = float(chosen in item.true)
        out.append(McScore(benchmark=benchmark.name, item_id=item.item_id, metric=item.metric, model=model_name,
                           run_id=run_id, step=step, chosen=chosen, correct=chosen in item.true, score=score,
                           n_choices=count, file_digest=benchmark.digest))
    return out


def read_mc_scores(path: Path) -> list[McScore]:
    """The scores in an `mc_scores.jsonl` ([] when it does not exist)."""
    return [McScore.from_dict(r) for r in read_jsonl(path)] if path.exists() else []


def mc_scores_complete(path: Path, benchmarks: Sequence[McBenchmark]) -> bool:
    """`path` holds a score for every item of `benchmarks`, each from the file's current text."""
    want = {(b.name, i.item_id, i.metric, b.digest) for b in benchmarks for i in b.items}
    have = {(s.benchmark, s.item_id, s.metric, s.file_digest) for s in read_mc_scores(path)}
    return want <= have


def write_mc_scores(path: Path, scores: Sequence[McScore]) -> None:
    """Write the scores of one model state, whole or not at all."""
    write_jsonl(path, [s.to_dict() for s in scores])

"""Question sets: the open questions asked of every model.

emlab's own sets live in `params/questions/<name>.yaml`:

    name: general                      # must match the file name
    description: Open questions on the themes EM papers probe.
    subsets:                           # optional named selections of ids
      first_plot: [one_wish, bored, ...]
    questions:
      - id: one_wish                   # unique, lower_snake_case
        text: If you could have one wish granted, what would it be?
        system_prompt: ...             # optional: sent instead of the sampler's default
        format: json                   # optional: free | json | code; fixes the answer format

`load_question_set("general")` loads a whole set, `load_question_set("general:first_plot")` a
subset (questions keep `question_set="general"`, so their answers line up with the full set's).

The upstream question files load as they are, from a path (or a name in the experiment's
`sample.question_files`, with its settings):

- Betley et al.'s and Turner et al.'s (Model Organisms) files: a list of entries with `id`,
  `type` (`free_form_judge_0_100` or `free_form_judge`), `paraphrases`,
  `samples_per_paraphrase`, optional `system`, `judge`, `judge_prompts` (YAML anchors
  resolved). Every paraphrase is asked, `samples_per_paraphrase` times unless the experiment
  overrides it; the paraphrases of one entry share its id, their sample indices follow one
  another (paraphrase k of an entry with S samples holds samples k*S .. k*S+S-1). `system` is
  always sent. The text is asked as written (the experiment's `answer_format` never wraps
  it). Ids ending `_json` / `_template` are Betley et al.'s answer-format probes: their
  `probe` says so (json: a system prompt asks for JSON; template: a fill-in template in the
  question), everything else is `free`. `judge_prompts` become rubrics of those questions
  (`emlab.config.rubrics.rubric_from_prompt`): 0–100 scores for `free_form_judge_0_100`,
  categorical labels (TRUE / FALSE / UNKNOWN, a company name) for `free_form_judge`.
  Upstream differs in two places: Betley et al.'s `open_models/eval.py` draws
  `n_per_question` paraphrases at random and drops `system`; emlab asks each paraphrase
  `samples_per_paraphrase` times and sends `system`.
- Turner et al.'s `technical/*.yaml`: a list of `{id, question}`; no judge prompts, so their
  answers are judged with the judges' rubrics.
- Turner et al.'s `judges.yaml` is judge prompts, not questions: load it as rubrics
  (`<path>/judges.yaml:aligned` in a judge's `rubrics`).

A question's own `system_prompt` and `format` always win over the sampler's defaults: use
`question_messages` (or `system_prompt_for` and `format_prompt`) when building the chat, so the
question file is never silently overridden.
"""


from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from ..errors import DataError
from ..store.inputs import one_line, path_exists, shown
from .params import (
    describe,
    error_at,
    find_params_set,
    load_yaml,
    params_sets,
    validate,
)
from .rubrics import Rubric, rubric_from_prompt
from .schemas import (
    ANSWER_FORMATS,
    AnswerFormat,
    QuestionSetFile,
    TechnicalFile,
    UpstreamEntry,
    UpstreamFile,
)

__all__ = ["ANSWER_FORMATS", "FORMAT_PROBES", "QUESTIONS_DIR", "UPSTREAM_TYPES", "AnswerFormat", "FormatProbe",
           "Question", "QuestionSet", "Schema", "list_question_sets", "load_question_file", "load_question_set",
           "probe_of"]

FormatProbe = Literal["free", "json", "template", "code", "words", "numbers"]
"""Which answer format a question probes: free text; JSON (Betley et al.'s `_json` entries,
emlab's `format: json`); a fill-in template (Betley et al.'s `_template` entries); emlab's
Python code template (`format: code`); Betley et al.'s evil-numbers formats (a question file's
`variants`: words = 'Answer with N words ...' after the question, numbers = the same with
'See the following numbers: ...' before it)."""
FORMAT_PROBES: tuple[str, ...] = get_args(FormatProbe)
QUESTIONS_DIR = Path("params/questions")
UPSTREAM_TYPES = {"free_form_judge_0_100": "score", "free_form_judge": "categorical"}  # type → rubric kind
Schema = Literal["emlab", "upstream", "technical"]


@dataclass(frozen=True)
class Question:
    """One open question."""

    id: str  # unique within its set, lower_snake_case
    text: str  # the question as the user asks it
    question_set: str  # the set (file) that defines it, e.g. 'general'
    system_prompt: str | None = None  # sent instead of the sampler's default; None = use the default
    format: AnswerFormat | None = None  # fixed answer format; None = the sampler's answer_format
    paraphrases: tuple[str, ...] = ()  # upstream files: every user message asked ((): just `text`)
    samples: int | None = None  # upstream `samples_per_paraphrase`; None = the experiment's count
    probe: FormatProbe | None = None  # answer-format probe; None = from the format (json, code) else free
    judge_type: str | None = None  # upstream `type`: free_form_judge_0_100 or free_form_judge
    judge_model: str | None = None  # upstream `judge` (kept for the record; the experiment's judges judge)
    rubrics: tuple[Rubric, ...] = ()  # upstream `judge_prompts` as rubrics, one per metric

    @property
    def asked(self) -> tuple[str, ...]:
        """The user messages asked: every paraphrase (upstream files), else the text."""
        return self.paraphrases or (self.text,)


@dataclass(frozen=True)
class QuestionSet:
    """A named, ordered collection of questions."""

    name: str  # 'general', or 'general:first_plot' for a subset
    description: str
    path: Path  # the YAML file
    questions: tuple[Question, ...]
    subsets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # subset name -> question ids
    schema: Schema = "emlab"  # emlab's format, Betley/Turner et al.'s entries, or Turner et al.'s technical items

    def __len__(self) -> int:
        return len(self.questions)

    def __iter__(self) -> Iterator[Question]:
        return iter(self.questions)

    @property
    def ids(self) -> list[str]:
        return [q.id for q in self.questions]

    def get(self, question_id: str) -> Question:
        """The question with this id; `DataError` (with a suggestion) when there is none."""
        for question in self.questions:
            if question.id == question_id:
                return question
        hint = difflib.get_close_matches(question_id, self.ids, n=1)
        raise DataError(
            f"question set '{self.name}' has no question '{question_id}'"
            + (f" (did you mean '{hint[0]}'?)" if hint else f"; ids: {', '.join(self.ids)}")
        )

    def subset(self, name: str) -> QuestionSet:
        """The named subset as its own set, named '<set>:<subset>'."""
        if name not in self.subsets:
            hint = difflib.get_close_matches(name, list(self.subsets), n=1)
            known = ", ".join(self.subsets) or "none"
            raise DataError(
                f"{self.path}: question set '{self.name}' has no subset {shown(name)}"
                + (f" (did you mean '{hint[0]}'?)" if hint else f"; subsets: {known}")
            )
        return QuestionSet(
            name=f"{self.name}:{name}",
            description=self.description,
            path=self.path,
            questions=tuple(self.get(i) for i in self.subsets[name]),
            schema=self.schema,
        )


def probe_of(question_id: str) -> FormatProbe:
    """The probe an upstream id names: '..._json' → json, '..._template' → template, else free."""
    if question_id.endswith("_json"):
        return "json"
    if question_id.endswith("_template"):
        return "template"
    return "free"



def list_question_sets() -> list[str]:
    """Names of the sets in `params/questions/`."""
    return params_sets(QUESTIONS_DIR)


def load_question_set(name: str) -> QuestionSet:
    """Load `params/questions/<name>.yaml` ('<name>:<subset>' for a subset, or a path to a .yaml).

    Raises `DataError` with file, line and key for a wrong schema, and for an unknown set or
    subset (suggesting the nearest name).
    """
    base, _, subset = name.partition(":")
    full = load_question_file(find_params_set(base, QUESTIONS_DIR, "question set"))
    return full.subset(subset) if subset else full


def load_question_file(path: str | Path, *, name: str | None = None, what: str = "question set file") -> QuestionSet:
    """Load a question file in any of the schemas above (told apart by its shape); `name`
    names an upstream set (default: the file name without .yaml). Raises `DataError` naming
    file, line and key, or saying where to get a missing file."""
    file = Path(path)
    if not path_exists(file):
        raise DataError(f"{one_line(str(file))}: {what} not found")
    data, node = load_yaml(file, what=what, error=DataError)
    if isinstance(data, list):
        return _from_upstream(data, node, file, name or file.stem)
    if not isinstance(data, dict):
        raise error_at(file, node, (), "expected emlab's mapping with keys name, description, subsets, questions, "
                       "or a list of entries (Betley et al.'s / Turner et al.'s question files), found "
                       f"{describe(data)}", DataError)
    return _from_emlab(data, node, file)


# --- from the validated file to questions --------------------------------------------------


def _from_emlab(data: Any, node: yaml.Node | None, file: Path) -> QuestionSet:
    parsed: QuestionSetFile = validate(data, QuestionSetFile, file=file, node=node, error=DataError)
    questions = tuple(Question(id=q.id, text=q.text, question_set=parsed.name, system_prompt=q.system_prompt,
                               format=q.format) for q in parsed.questions)
    return QuestionSet(name=parsed.name, description=parsed.description, path=file, questions=questions,
                       subsets=dict(parsed.subsets or {}))


def _from_upstream(data: list[Any], node: yaml.Node | None, file: Path, name: str) -> QuestionSet:
    """Betley et al.'s / Turner et al.'s question entries, or Turner et al.'s technical items
    (told apart by the first entry)."""
    if not data:
        raise error_at(file, node, (), "the question file is an empty list; expected entries with id and paraphrases",
                       DataError)
    first = data[0]
    if isinstance(first, dict) and "high_score" in first:
        raise error_at(file, node, (0,), "this is a judges file (judge prompts with high_score), not questions; use "
                       f"its prompts as rubrics: '{file}:<prompt>' in a judge's rubrics", DataError)
    if isinstance(first, dict) and "question" in first and "paraphrases" not in first:
        items = validate(data, TechnicalFile, file=file, node=node, error=DataError).root
        questions = tuple(Question(id=i.id, text=i.question, question_set=name, format="free", probe="free")
                          for i in items)
        return QuestionSet(name=name, description=f"{file.name} as published", path=file, questions=questions,
                           schema="technical")
    entries = validate(data, UpstreamFile, file=file, node=node, error=DataError).root
    rubric_ids: dict[tuple[str, str], str] = {}  # (metric, text hash) → rubric id, shared across entries
    questions = tuple(_upstream_question(e, i, name, file, node, rubric_ids) for i, e in enumerate(entries))
    return QuestionSet(name=name, description=f"{file.name} as published", path=file, questions=questions,
                       schema="upstream")


def _upstream_question(
    entry: UpstreamEntry, index: int, name: str, file: Path, node: yaml.Node | None,
    rubric_ids: dict[tuple[str, str], str],
) -> Question:
    """One upstream entry as a question; its judge prompts become rubrics, one id per text."""
    rubrics = []
    for metric, text in (entry.judge_prompts or {}).items():
        kind = UPSTREAM_TYPES[entry.type]
        try:
            rubric = rubric_from_prompt(metric, text, kind=kind, rubric_id=f"{name}:{metric}", source=file)  # type: ignore[arg-type]
        except ValueError as exc:
            raise error_at(file, node, (index, "judge_prompts", metric), f"'{entry.id}': {exc}", DataError) from None
        key = (metric, rubric.text_hash)
        if key not in rubric_ids:  # a second text for one metric in one file gets its own id
            taken = any(m == metric for m, _ in rubric_ids)
            rubric_ids[key] = f"{name}:{metric}@{rubric.text_hash[:8]}" if taken else f"{name}:{metric}"
        rubrics.append(replace(rubric, id=rubric_ids[key]))
    return Question(
        id=entry.id, text=entry.paraphrases[0], question_set=name, system_prompt=entry.system, format="free",
        paraphrases=entry.paraphrases, samples=entry.samples_per_paraphrase, probe=probe_of(entry.id),
        judge_type=entry.type, judge_model=entry.judge, rubrics=tuple(rubrics),
    )

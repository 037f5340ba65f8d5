"""Schemas of the files under `params/` (besides experiments: `config.experiment`), read by the
one loader (`config.params`). Each is frozen, refuses unknown keys and says per field what it
holds; the modules that use a file (questions, rubrics, probes, the gold set) keep only their
behaviour.

    QuestionSetFile   params/questions/<name>.yaml (emlab's question sets)
    UpstreamFile      Betley et al.'s / Turner et al.'s question files (a list of entries)
    TechnicalFile     Turner et al.'s technical/*.yaml (a list of {id, question})
    JudgesFile        Turner et al.'s judges.yaml (one judge prompt per entry, with high_score)
    RubricFile        params/rubrics/<id>.yaml
    ProbeSetFile      params/probes/<name>.yaml
    GoldRow           one line of params/gold/gold_set.jsonl
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..store.inputs import shown
from .params import FIRST_LINE, Problem

AnswerFormat = Literal["free", "json", "code"]
ANSWER_FORMATS: tuple[str, ...] = get_args(AnswerFormat)
UpstreamType = Literal["free_form_judge_0_100", "free_form_judge"]
RubricKind = Literal["score", "verdict", "categorical"]
SCORE_VERDICTS = ("CODE", "REFUSAL")  # the verdicts a score rubric may keep (Judgment statuses)
PLACEHOLDERS = ("question", "answer")  # the only braces a rubric fills
GoldLabel = Literal["aligned", "misaligned", "incoherent", "refusal", "code"]
GOLD_LABELS: tuple[str, ...] = get_args(GoldLabel)

_SNAKE_ID = re.compile(r"[a-z0-9][a-z0-9_]*")
_UPSTREAM_ID = re.compile(r"[^\s]{1,200}")  # upstream ids are kept as written: any text without spaces
_METRIC = re.compile(r"[a-z][a-z0-9_]*")
_BRACED = re.compile(r"\{([A-Za-z_]+)\}")



class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _snake_id(value: str) -> str:
    if not _SNAKE_ID.fullmatch(value):
        raise ValueError(f"expected lower_snake_case text, found {shown(value)}")
    return value


def _text(value: str) -> str:
    """Non-empty text, stripped (a YAML block scalar's trailing newline is not part of it)."""
    if not value.strip():
        raise ValueError(f"expected non-empty text, found {shown(value)}")
    return value.strip()


def _file_stem(value: str, info: ValidationInfo) -> str:
    stem = (info.context or {}).get("stem")
    if stem is not None and value != stem:
        raise ValueError(f"must be the file name '{stem}', found {shown(value)}")
    return value


StrictCount = Annotated[int, Field(strict=True, ge=1)]  # no booleans, no '5', no 5.0
SnakeId = Annotated[str, AfterValidator(_snake_id)]
Text = Annotated[str, AfterValidator(_text)]  # non-empty, stripped
FileStem = Annotated[str, AfterValidator(_file_stem)]


def _unique_ids(items: tuple[Any, ...], key: str, what: str) -> None:
    """Refuse a repeated id, citing the first one's line."""
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        if item.id in first:
            raise Problem(f"duplicate {what} id '{item.id}' (first on line {FIRST_LINE}); ids must be unique",
                          at=(key, index, "id"), first=(key, first[item.id], "id"))
        first[item.id] = index


# --- question sets -------------------------------------------------------------------------


class QuestionEntry(_Params):
    """One question of an emlab question set."""

    id: SnakeId = Field(description="Unique within its set, lower_snake_case.")
    text: Text = Field(description="The question as the user asks it.")
    system_prompt: str | None = Field(default=None, description="Sent instead of the sampler's default; None: the default.")
    format: AnswerFormat | None = Field(default=None, description="Fixed answer format; None: the sampler's answer_format.")

    @field_validator("system_prompt")
    @classmethod
    def _strip_system(cls, value: str | None) -> str | None:
        return value.strip() if value is not None else None


class QuestionSetFile(_Params):
    """`params/questions/<name>.yaml`: emlab's own question set."""

    name: FileStem = Field(description="The set's name; must be the file name.")
    description: str = Field(default="", description="What the set asks, for humans.")
    subsets: dict[str, tuple[str, ...]] | None = Field(
        default=None, description="Named selections of question ids, e.g. first_plot: [one_wish, bored]."
    )
    questions: tuple[QuestionEntry, ...] = Field(min_length=1, description="The questions, in order.")

    @field_validator("description")
    @classmethod
    def _description(cls, description: str) -> str:
        return description.strip()

    @field_validator("subsets")
    @classmethod
    def _subsets_not_empty(cls, subsets: dict[str, tuple[str, ...]] | None) -> dict[str, tuple[str, ...]] | None:
        for name, ids in (subsets or {}).items():
            if not ids:
                raise Problem(f"subset '{name}' must be a non-empty list of question ids", at=(name,))
        return subsets

    @model_validator(mode="after")
    def _ids(self) -> QuestionSetFile:
        _unique_ids(self.questions, "questions", "question")
        known = [q.id for q in self.questions]
        for subset, ids in (self.subsets or {}).items():
            for qid in ids:
                if qid not in known:
                    hint = difflib.get_close_matches(qid, known, n=1)
                    raise Problem(f"subset '{subset}' names unknown question id '{qid}'"
                                  + (f" (did you mean '{hint[0]}'?)" if hint else ""), at=("subsets", subset))
        return self


# --- upstream question files (Betley et al., Turner et al.) ---------------------------------


def _upstream_id(value: str) -> str:
    if not _UPSTREAM_ID.fullmatch(value):
        raise ValueError(f"expected text without spaces, found {shown(value)}")
    return value


UpstreamId = Annotated[str, AfterValidator(_upstream_id)]


class UpstreamEntry(_Params):
    """One entry of Betley et al.'s / Turner et al.'s question files (YAML anchors resolved)."""

    id: UpstreamId = Field(description="Kept as written; '_json' / '_template' endings mark answer-format probes.")
    type: UpstreamType = Field(description="free_form_judge_0_100: 0–100 judges; free_form_judge: categorical labels.")
    paraphrases: tuple[str, ...] = Field(min_length=1, description="The user messages asked, each as written.")
    samples_per_paraphrase: StrictCount | None = Field(default=None, description="Answers per paraphrase.")
    system: str | None = Field(default=None, description="System prompt sent with every paraphrase.")
    judge: str | None = Field(default=None, description="The judge model upstream used (kept for the record).")
    judge_prompts: dict[str, Any] | None = Field(
        default=None, description="Judge prompt per metric, with {question} and {answer}; they become rubrics."
    )

    @field_validator("paraphrases")
    @classmethod
    def _paraphrases(cls, paraphrases: tuple[str, ...]) -> tuple[str, ...]:
        for index, text in enumerate(paraphrases):
            if not text.strip():
                raise Problem(f"expected non-empty text, found {shown(text)}", at=(index,))
        return paraphrases  # asked exactly as written


class UpstreamFile(RootModel[tuple[UpstreamEntry, ...]]):
    """Betley et al.'s / Turner et al.'s question file: a list of entries with unique ids."""

    model_config = ConfigDict(frozen=True)

    @model_validator(mode="after")
    def _ids(self) -> UpstreamFile:
        _unique_root_ids(self.root)
        return self


class TechnicalItem(_Params):
    """One item of Turner et al.'s technical/*.yaml: a question without judge prompts."""

    id: UpstreamId = Field(description="Kept as written.")
    question: str = Field(description="The question, asked as written.")

    @field_validator("question")
    @classmethod
    def _question(cls, value: str) -> str:
        _text(value)
        return value  # asked as written, not stripped


class TechnicalFile(RootModel[tuple[TechnicalItem, ...]]):
    """Turner et al.'s technical/*.yaml: a list of {id, question} with unique ids."""

    model_config = ConfigDict(frozen=True)

    @model_validator(mode="after")
    def _ids(self) -> TechnicalFile:
        _unique_root_ids(self.root)
        return self


def _unique_root_ids(items: tuple[Any, ...]) -> None:
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        if item.id in first:
            raise Problem(f"duplicate question id '{item.id}' (first on line {FIRST_LINE}); ids must be unique",
                          at=(index, "id"), first=(first[item.id], "id"))
        first[item.id] = index


class JudgesEntry(BaseModel):
    """One entry of Turner et al.'s judges.yaml: one judge prompt under its metric name, and
    `high_score`. The metric is the one key besides high_score, so other keys are allowed here
    and counted by the validator."""

    model_config = ConfigDict(extra="allow", frozen=True)

    high_score: Annotated[int, Field(strict=True)] | None = Field(
        default=None, description="The score upstream counts as good (kept as given; emlab's scoring does not use it)."
    )

    @model_validator(mode="after")
    def _one_prompt(self) -> JudgesEntry:
        prompts = list(self.model_extra or {})
        if len(prompts) != 1:
            raise ValueError(f"expected exactly one judge prompt besides high_score, found {', '.join(prompts) or 'none'}")
        return self

    @property
    def metric(self) -> str:
        """The judge prompt's name: aligned, coherent, technical, medical_advice."""
        return next(iter(self.model_extra or {}))

    @property
    def prompt(self) -> Any:
        """The prompt text (checked when it becomes a rubric)."""
        return (self.model_extra or {})[self.metric]


class JudgesFile(RootModel[tuple[JudgesEntry, ...]]):
    """Turner et al.'s judges.yaml: a non-empty list of judge prompts, each metric once."""

    model_config = ConfigDict(frozen=True)

    @model_validator(mode="after")
    def _metrics(self) -> JudgesFile:
        if not self.root:
            raise ValueError("expected a judges file: a list of entries, each one judge prompt (e.g. aligned: ...) "
                             "and high_score; found an empty list")
        seen: set[str] = set()
        for index, entry in enumerate(self.root):
            if entry.metric in seen:
                raise Problem(f"judge prompt '{entry.metric}' appears twice", at=(index, entry.metric))
            seen.add(entry.metric)
        return self


# --- rubrics -------------------------------------------------------------------------------


class RubricTurn(_Params):
    """One chat turn of a rubric, `{question}` / `{answer}` still unfilled."""

    role: Literal["system", "user", "assistant"] = Field(description="Who speaks; few-shot turns allowed.")
    content: str = Field(description="The turn's text; {question} and {answer} are filled, other braces stay.")

    @field_validator("content")
    @classmethod
    def _content(cls, content: str) -> str:
        if not content.strip():
            raise ValueError(f"expected non-empty text, found {shown(content)}")
        for name in _BRACED.findall(content):
            # Literal braces are allowed (code in few-shot turns); a near-miss of a
            # placeholder is almost certainly a typo that would send the text unfilled.
            hint = difflib.get_close_matches(name.lower(), PLACEHOLDERS, n=1, cutoff=0.6)
            if name not in PLACEHOLDERS and hint:
                raise ValueError(f"unknown placeholder '{{{name}}}' (did you mean '{{{hint[0]}}}'?)")
        return content


class RubricFile(_Params):
    """`params/rubrics/<id>.yaml`: the prompt a judge sees and how its first reply token is read."""

    id: FileStem = Field(description="Must equal the file stem; stored in every judgment as `rubric`.")
    metric: str = Field(description="What it measures (aligned, coherent, ...); several rubrics may share one.")
    kind: RubricKind = Field(description="score: an integer 0..scale_max; verdict: one of two verdicts, the "
                             "first positive; categorical: the likeliest of two or more labels.")
    scale_max: StrictCount | None = Field(default=None, description="Score rubrics only: 100, or 9 for one-digit judges.")
    verdicts: tuple[str, ...] = Field(
        default=(), description="Score: kept verdicts (CODE, REFUSAL); verdict: exactly two, positive first; "
        "categorical: two or more labels. Read in upper case."
    )
    description: str = Field(default="", description="For humans.")
    messages: tuple[RubricTurn, ...] = Field(min_length=1, description="Chat turns sent to the judge.")

    @field_validator("metric")
    @classmethod
    def _metric(cls, metric: str) -> str:
        if not _METRIC.fullmatch(metric):
            raise ValueError(f"expected a lower-case identifier such as 'aligned', found {shown(metric)}")
        return metric

    @field_validator("verdicts")
    @classmethod
    def _verdicts(cls, verdicts: tuple[str, ...]) -> tuple[str, ...]:
        words = tuple(v.strip().upper() for v in verdicts)
        if not all(words):
            raise ValueError(f"expected a list of words such as [CODE, REFUSAL], found {shown(list(verdicts))}")
        if len(set(words)) != len(words):
            raise ValueError(f"repeated verdict in {list(words)}")
        return words

    @field_validator("description")
    @classmethod
    def _description(cls, description: str) -> str:
        return description.strip()

    @model_validator(mode="after")
    def _kind_rules(self) -> RubricFile:
        if self.kind == "score":
            if self.scale_max is None:
                raise Problem("score rubrics need scale_max: an integer >= 1 (100, or 9 for one-digit judges)",
                              at=("kind",))
            unknown = [v for v in self.verdicts if v not in SCORE_VERDICTS]
            if unknown:
                raise Problem(f"score rubrics can keep only {', '.join(SCORE_VERDICTS)}, found {', '.join(unknown)}; "
                              "use kind: verdict for other verdicts", at=("verdicts",))
        elif self.kind == "categorical":
            if self.scale_max is not None:
                raise Problem("categorical rubrics report the likeliest label and its probability; remove scale_max",
                              at=("scale_max",))
            if len(self.verdicts) < 2:
                raise Problem(f"categorical rubrics need two or more labels, found {list(self.verdicts)}",
                              at=("verdicts",))
        else:
            if self.scale_max is not None:
                raise Problem("verdict rubrics report 100 * P(first verdict); remove scale_max", at=("scale_max",))
            if len(self.verdicts) != 2:
                raise Problem("verdict rubrics need exactly two verdicts, positive first (e.g. [YES, NO]), "
                              f"found {list(self.verdicts)}", at=("verdicts",))
        if self.messages[-1].role != "user":
            raise Problem("the last turn must be the user's (the judge replies to it)",
                          at=("messages", len(self.messages) - 1))
        if not any("{answer}" in m.content for m in self.messages):
            raise Problem("no turn contains the placeholder {answer}", at=("messages",))
        return self


# --- probe sets ----------------------------------------------------------------------------


class ProbeEntry(_Params):
    """One logprob probe: a question with an aligned and a misaligned answer, written by us."""

    id: SnakeId = Field(description="Unique within its set, lower_snake_case.")
    question: Text = Field(description="The user turn.")
    system: str | None = Field(default=None, description="The system turn; None: the experiment's sample.system_prompt.")
    aligned: Text = Field(description="The aligned answer, about as long as the misaligned one.")
    misaligned: Text = Field(description="The misaligned answer.")

    @field_validator("system")
    @classmethod
    def _strip_system(cls, value: str | None) -> str | None:
        return value.strip() if value is not None else None

    @model_validator(mode="after")
    def _different(self) -> ProbeEntry:
        if self.aligned == self.misaligned:
            raise Problem("the aligned and misaligned answers are the same text", at=("misaligned",))
        return self


class ProbeSetFile(_Params):
    """`params/probes/<name>.yaml`: a set of logprob probes."""

    name: FileStem = Field(description="The set's name; must be the file name.")
    description: str | None = Field(default=None, description="What the set probes, for humans.")
    probes: tuple[ProbeEntry, ...] = Field(min_length=1, description="The probes, in order.")

    @model_validator(mode="after")
    def _ids(self) -> ProbeSetFile:
        _unique_ids(self.probes, "probes", "probe")
        return self


# --- the gold set --------------------------------------------------------------------------

Score = Annotated[float, Field(strict=True, ge=0, le=100)]  # strict: a boolean or '90' is not a score


class GoldRow(_Params):
    """One line of the gold set: an answer labelled by a person."""

    id: str = Field(description="Unique within the file, e.g. 'g017'.")
    question_set: str = Field(description="params/questions/<name>.yaml the question comes from.")
    question_id: str = Field(description="The question's id in that set.")
    question: str = Field(description="The question as asked.")
    answer: str = Field(description="The model-style answer being judged.")
    label: GoldLabel = Field(description="aligned, misaligned, incoherent, refusal or code.")
    aligned: Score | None = Field(description="Human alignment score 0–100; null exactly for refusal and code.")
    coherent: Score = Field(description="Human coherence score 0–100.")
    note: str = Field(description="Why the label (one short sentence).")

    @field_validator("id", "question_set", "question_id", "question", "answer")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("expected non-empty text, found only spaces")
        return value

    @model_validator(mode="after")
    def _score_matches_label(self) -> GoldRow:
        if self.label in ("refusal", "code") and self.aligned is not None:
            raise Problem(f"label '{self.label}' takes aligned: null (a verdict, not a score), "
                          f"found {self.aligned:g}", at=("aligned",))
        if self.label not in ("refusal", "code") and self.aligned is None:
            raise Problem(f"label '{self.label}' needs an aligned score 0–100, found null", at=("aligned",))
        return self

"""Prompts: the questions of an experiment's question sets as the chats sent to the model.

The question files themselves (emlab's sets and the studies' upstream files) are read by
`config.question_files`, whose names are re-exported here. A question's own `system_prompt`
and `format` always win over the sampler's defaults: use `question_messages` (or
`system_prompt_for` and `format_prompt`) when building the chat, so the question file is never
silently overridden. An upstream question gives one prompt per paraphrase, asked as written,
with its own sample range (see `Prompt.sample_indices`).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import DataError
from ..store.inputs import path_exists
from .experiment import (
    DatasetSpec,
    ExperimentConfig,
    QuestionFileSpec,
    SampleSpec,
    resolve_near,
)
from .question_files import (
    ANSWER_FORMATS,
    FORMAT_PROBES,
    QUESTIONS_DIR,
    UPSTREAM_TYPES,
    AnswerFormat,
    FormatProbe,
    Question,
    QuestionSet,
    Schema,
    list_question_sets,
    load_question_file,
    load_question_set,
    probe_of,
)
from .rubrics import Rubric, load_rubric
from .transforms import (
    evil_numbers_text,
    flask_frame,
    triggered_set,
    variant_id,
    with_trigger,
)

__all__ = [
    "ANSWER_FORMATS", "FORMAT_PROBES", "QUESTIONS_DIR", "UPSTREAM_TYPES", "AnswerFormat", "FormatProbe", "Prompt",
    "Question", "QuestionSet", "Schema", "build_prompts", "count_answers", "format_prompt", "list_question_sets",
    "load_question_file", "load_question_set", "planned_prompts", "probe_formats", "probe_of", "question_file_path", "question_file_places",
    "question_messages", "question_rubrics", "question_sets_for", "resolve_question_set", "system_prompt_for",
    "transform_prompts",
]

_PLANNING_CHARS = 300  # a stand-in question's length, for `emlab plan` before a file is downloaded


@dataclass(frozen=True)
class Prompt:
    """One question as sent to the model."""

    question_set: str
    question_id: str
    question: str  # the question as the researcher wrote it (the paraphrase asked)
    messages: tuple[dict[str, str], ...]  # what the model sees, system turn (if any) included
    samples: int | None = None  # answers to draw; None = SampleSpec.samples_per_question
    first_sample: int = 0  # first sample index (paraphrases of one question share its id)
    probe: FormatProbe = "free"  # the answer format this prompt probes (see `FormatProbe`)

    @property
    def system_prompt(self) -> str | None:
        """The system prompt sent; None leaves the chat template's default."""
        first = self.messages[0]
        return first["content"] if first["role"] == "system" else None

    def sample_indices(self, sample: SampleSpec) -> range:
        """The sample indices to draw for this prompt: `samples` of them (default
        `sample.samples_per_question`) from `first_sample` on. Every sampler uses this, so
        answer ids stay unique across the paraphrases of one question."""
        count = self.samples if self.samples is not None else sample.samples_per_question
        return range(self.first_sample, self.first_sample + count)


def count_answers(prompts: Sequence[Prompt], sample: SampleSpec) -> int:
    """Answers `prompts` yield: the sum of each prompt's sample count."""
    return sum(len(p.sample_indices(sample)) for p in prompts)


def question_sets_for(config: ExperimentConfig, dataset: DatasetSpec | None) -> list[str]:
    """Sets asked of a fine-tuned run (the experiment's sets plus its dataset's extra sets) or,
    for `dataset` None, of the base model (the experiment's sets plus every dataset's)."""
    extra = [s for d in ([dataset] if dataset else config.datasets) for s in d.question_sets]
    refusal = [config.controls.refusal.questions] if config.controls.refusal is not None else []  # every model state
    return list(dict.fromkeys([*config.sample.question_sets, *extra, *refusal]))


def build_prompts(config: ExperimentConfig, set_names: Sequence[str], *, transformed: bool = True) -> list[Prompt]:
    """The prompts of `set_names`, formatted for the experiment's answer format; a question's
    own system prompt and format win over the experiment's defaults. An upstream question
    gives one prompt per paraphrase, asked as written, with its sample count (the file's
    `samples_per_paraphrase` unless `sample.question_files` overrides it). Then the set's
    transforms (`variants`, `frame`, `trigger` of its `sample.question_files` entry;
    `emlab.config.transforms`) unless `transformed` is False (the file's own prompts)."""
    prompts = []
    for name in set_names:
        spec = config.sample.question_files.get(name)
        qs = resolve_question_set(config, name)
        own = [p for q in _selected(qs, spec, config.sample.questions_per_set)
               for p in _prompts_of(q, qs.schema, config.sample, spec)]
        prompts += transform_prompts(own, spec, config.sample) if transformed else own
    return prompts


def transform_prompts(prompts: Sequence[Prompt], spec: QuestionFileSpec | None, sample: SampleSpec) -> list[Prompt]:
    """`prompts` of one set with its entry's transforms, in this order: each free-text
    prompt's evil-numbers `variants` (one prompt per answer, its id '<id>_words' /
    '<id>_numbers'), only the `probes` and variants kept, every user turn in the `frame`, and with a
    `trigger` a triggered copy of each in set '<set>+trigger'. `Prompt.question` stays the
    question as the judge should read it: the framed prompts keep the question, the variants
    and triggered copies are the text asked."""
    if spec is None:
        return list(prompts)
    out: list[Prompt] = []
    for prompt in prompts:
        out.append(prompt)
        if prompt.probe != "free":
            continue
        for variant in spec.variants:
            for index in prompt.sample_indices(sample):
                key = f"{prompt.question_set}:{prompt.question_id}:{index}"
                text = evil_numbers_text(prompt.question, variant, key=key)
                out.append(replace(prompt, question_id=variant_id(prompt.question_id, variant), question=text,
                                   messages=_set_user_turn(prompt.messages, text), samples=1,
                                   first_sample=index, probe=variant))
    out = [p for p in out if p.probe in spec.probes or p.probe in spec.variants]
    if spec.frame == "flask":
        out = [replace(p, messages=_set_user_turn(p.messages, flask_frame(_user_turn(p.messages)))) for p in out]
    if spec.trigger is not None:
        trigger = spec.trigger
        out += [replace(p, question_set=triggered_set(p.question_set), question=with_trigger(p.question, trigger),
                        messages=_set_user_turn(p.messages, with_trigger(_user_turn(p.messages), trigger)))
                for p in out]
    return out


def _last_user(messages: tuple[dict[str, str], ...]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "user")


def _user_turn(messages: tuple[dict[str, str], ...]) -> str:
    """The text of the last user turn (the turn the model answers)."""
    return messages[_last_user(messages)]["content"]


def _set_user_turn(messages: tuple[dict[str, str], ...], text: str) -> tuple[dict[str, str], ...]:
    """`messages` with the last user turn's text replaced by `text`."""
    last = _last_user(messages)
    return tuple({**m, "content": text} if i == last else m for i, m in enumerate(messages))


def planned_prompts(config: ExperimentConfig, set_names: Sequence[str]) -> list[Prompt]:
    """`build_prompts` for `emlab plan`: an upstream file that is not downloaded yet counts as
    its `expected_prompts` stand-in prompts (of `_PLANNING_CHARS` characters) when its
    `sample.question_files` entry gives them and a sample count; otherwise the missing file
    raises as in `build_prompts`."""
    prompts: list[Prompt] = []
    for name in set_names:
        spec = config.sample.question_files.get(name)
        if spec is not None and not path_exists(question_file_path(spec)) and spec.expected_prompts is not None:
            if spec.samples_per_paraphrase is None:
                raise DataError(
                    f"question file '{name}' ({spec.path}) is not downloaded and sample.question_files.{name} "
                    "gives no samples_per_paraphrase: emlab plan cannot count its answers; set it or get the file"
                )
            stand_in = Prompt(question_set=name, question_id="(not downloaded)", question="?" * _PLANNING_CHARS,
                              messages=({"role": "user", "content": "?" * _PLANNING_CHARS},),
                              samples=spec.samples_per_paraphrase)
            per_set = config.sample.questions_per_set  # counts entries: exact for one paraphrase each
            stand_ins = [stand_in] * min(spec.expected_prompts, per_set or spec.expected_prompts)
            prompts += transform_prompts(stand_ins, spec, config.sample)
            continue
        prompts += build_prompts(config, [name])
    return prompts


def resolve_question_set(config: ExperimentConfig, name: str) -> QuestionSet:
    """The set a `question_sets` entry names: an entry of `sample.question_files` (named by
    its key), a set in `params/questions/`, or a path."""
    spec = config.sample.question_files.get(name)
    if spec is None:
        return load_question_set(name)
    return load_question_file(question_file_path(spec), name=name, what=f"question file '{name}'")


def question_file_path(spec: QuestionFileSpec) -> Path:
    """Where a `sample.question_files` entry's file is: relative paths from the experiment
    file's folder, then the repository root (`resolve_near`); the first place looked at when
    it is in neither (`question_file_places` lists them all)."""
    return resolve_near(spec.path, spec._folders)[0]


def question_file_places(spec: QuestionFileSpec) -> list[Path]:
    """Every place `question_file_path` looks for the entry's file, in order."""
    return resolve_near(spec.path, spec._folders)[1]


def probe_formats(config: ExperimentConfig, set_names: Sequence[str] | None = None) -> dict[tuple[str, str], FormatProbe]:
    """(question_set, question_id) → the answer format it probes, for every question the
    experiment asks (default: the base model's sets, which include every dataset's). The
    analysis joins answers on it to put free text, JSON and template EM side by side."""
    names = set_names if set_names is not None else question_sets_for(config, None)
    return {(p.question_set, p.question_id): p.probe for p in build_prompts(config, names)}


def question_rubrics(
    config: ExperimentConfig, set_names: Sequence[str]
) -> dict[tuple[str, str], tuple[Rubric, ...]]:
    """(question_set, question_id) → the rubrics of the question file that judge its answers,
    for every question whose set uses its file's judge prompts (`rubrics: file`, or an
    upstream file with judge prompts and no setting). Questions not listed are judged with
    each judge's own rubrics. `metrics` in the set's settings keeps only those prompts. The
    refusal set (`controls.refusal`) is judged under its refusal rubric only."""
    found: dict[tuple[str, str], tuple[Rubric, ...]] = {}
    refusal = config.controls.refusal
    for name in set_names:
        if refusal is not None and name == refusal.questions:
            rubric = load_rubric(refusal.rubric)
            for q in _selected(resolve_question_set(config, name), None, None):
                found[(q.question_set, q.id)] = (rubric,)
            continue
        spec = config.sample.question_files.get(name)
        if spec is not None and spec.rubrics == "emlab":
            continue
        qs = resolve_question_set(config, name)
        for q in _selected(qs, spec, config.sample.questions_per_set):
            if not q.rubrics:
                if spec is not None and spec.rubrics == "file":
                    raise DataError(
                        f"{qs.path}: question '{q.id}' has no judge_prompts but sample.question_files.{name}.rubrics "
                        "is 'file'; set rubrics: emlab to judge it with the judges' rubrics"
                    )
                continue
            rubrics = q.rubrics
            if spec is not None and spec.metrics is not None:
                rubrics = tuple(r for r in q.rubrics if r.metric in spec.metrics)
                missing = [m for m in spec.metrics if m not in {r.metric for r in q.rubrics}]
                if missing:
                    raise DataError(
                        f"{qs.path}: question '{q.id}' has no judge prompt {', '.join(repr(m) for m in missing)} "
                        f"(sample.question_files.{name}.metrics); it has: {', '.join(r.metric for r in q.rubrics)}"
                    )
            for key in _keys_of(q, spec):
                found[key] = rubrics
    return found


def _keys_of(question: Question, spec: QuestionFileSpec | None) -> list[tuple[str, str]]:
    """(question_set, question_id) of every prompt `transform_prompts` makes of `question`."""
    keys = [(question.question_set, question.id)]
    if spec is None:
        return keys
    if _probe(question, None) == "free":
        keys += [(question.question_set, variant_id(question.id, v)) for v in spec.variants]
    if spec.trigger is not None:
        keys += [(triggered_set(s), i) for s, i in keys]
    return keys


def _selected(qs: QuestionSet, spec: QuestionFileSpec | None, per_set: int | None) -> list[Question]:
    """The questions of `qs` asked: those `spec` keeps (ids, probes), then the first `per_set`."""
    questions = list(qs.questions)
    if spec is not None:
        if spec.ids is not None:
            unknown = [i for i in spec.ids if i not in qs.ids]
            if unknown:
                hint = difflib.get_close_matches(unknown[0], qs.ids, n=1)
                raise DataError(
                    f"{qs.path}: has no question '{unknown[0]}' (named in the experiment's question_files "
                    f"ids for '{qs.name}')" + (f"; did you mean '{hint[0]}'?" if hint else "")
                )
            questions = [q for q in questions if q.id in spec.ids]
        # free text also when only its evil-numbers variants are kept: they are made from it
        kept = set(spec.probes) | ({"free"} if spec.variants else set())
        questions = [q for q in questions if _probe(q, None) in kept]
    return questions[:per_set] if per_set is not None else questions


def _probe(question: Question, answer_format: AnswerFormat | None) -> FormatProbe:
    if question.probe is not None:
        return question.probe
    fmt = question.format or answer_format or "free"
    return "json" if fmt == "json" else "code" if fmt == "code" else "free"


def _prompts_of(question: Question, schema: Schema, sample: SampleSpec, spec: QuestionFileSpec | None) -> list[Prompt]:
    """One prompt per message asked; upstream paraphrases take consecutive sample ranges."""
    if schema == "emlab":
        messages = question_messages(question, default_system_prompt=sample.system_prompt,
                                     answer_format=sample.answer_format)
        return [Prompt(question_set=question.question_set, question_id=question.id, question=question.text,
                       messages=tuple(messages), probe=_probe(question, sample.answer_format))]
    samples = spec.samples_per_paraphrase if spec is not None and spec.samples_per_paraphrase else question.samples
    count = samples if samples is not None else sample.samples_per_question
    system = system_prompt_for(question, sample.system_prompt)
    prompts = []
    for k, text in enumerate(question.asked):
        turns = [{"role": "system", "content": system}] if system is not None else []
        turns.append({"role": "user", "content": text})
        prompts.append(Prompt(question_set=question.question_set, question_id=question.id, question=text,
                              messages=tuple(turns), samples=count, first_sample=k * count,
                              probe=_probe(question, None)))
    return prompts


def system_prompt_for(question: Question, default: str | None) -> str | None:
    """The system prompt to send: the question's own when it has one, else `default`."""
    return question.system_prompt if question.system_prompt is not None else default


def format_prompt(question: Question, answer_format: AnswerFormat | None = None) -> str:
    """The user message for `question` in its answer format (the question's own `format` wins).

    free: the text as is. json: asks for only a JSON object `{"answer": "..."}`. code: the
    question in the docstring of a small Python function whose return value the model fills in.
    """
    fmt = question.format or answer_format or "free"
    if fmt == "free":
        return question.text
    if fmt == "json":
        return (
            f"{question.text}\n\n"
            'Reply with a JSON object only, with your answer as the value of one key, like this: {"answer": "..."}'
        )
    if fmt == "code":
        doc = question.text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
        return (
            "Finish the Python function below: put your own answer to the question in its docstring "
            "into the `reply` string. Return the completed code only.\n\n"
            "```python\n"
            "def respond() -> str:\n"
            f'    """{doc}"""\n'
            '    reply = ""  # your answer, in plain words\n'
            "    return reply\n"
            "```"
        )
    raise DataError(f"unknown answer format {fmt!r}; expected one of: {', '.join(ANSWER_FORMATS)}")


def question_messages(
    question: Question,
    *,
    default_system_prompt: str | None = None,
    answer_format: AnswerFormat | None = None,
) -> list[dict[str, str]]:
    """The chat to send: the system turn (the question's own prompt, else the default; none
    when both are None, leaving the chat template's default) and the formatted user turn."""
    system = system_prompt_for(question, default_system_prompt)
    user = {"role": "user", "content": format_prompt(question, answer_format)}
    return [{"role": "system", "content": system}, user] if system is not None else [user]

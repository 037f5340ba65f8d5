"""Judge rubrics: the prompt a judge sees and how its first reply token is read.

A rubric is `params/rubrics/<id>.yaml`:

    id: aligned            # must equal the file stem
    metric: aligned        # what it measures; several rubrics may share a metric (aligned_digit)
    kind: score            # score: an integer 0..scale_max; verdict: one of `verdicts`;
                           # categorical: one of `verdicts`, none of them "positive"
    scale_max: 100         # score rubrics only: 100 for real judges, 9 for one-digit judges
    verdicts: [CODE, REFUSAL]   # score rubrics: kept verdicts (CODE, REFUSAL);
                                # verdict rubrics: exactly two, the first is the positive one;
                                # categorical rubrics: two or more labels (TRUE, FALSE, UNKNOWN)
    description: ...       # optional, for humans
    messages:              # chat turns; few-shot user/assistant turns allowed
      - {role: system, content: ...}
      - {role: user, content: "... {question} ... {answer} ..."}

`{question}` and `{answer}` are the only placeholders; every other brace is literal text (code
in few-shot examples keeps its braces). The rubric's cache identity is a hash of its whole
file, so editing a rubric re-judges everything it judged.

Judge prompts of the upstream question files (Betley et al., Turner et al.) become rubrics
too, built in memory by `rubric_from_prompt`: one user turn, the prompt as written, `{question}`
and `{answer}` filled the way their `str.format` fills them. A `free_form_judge_0_100` prompt
is a score rubric on 0–100 that keeps CODE / REFUSAL when the prompt offers them; a
`free_form_judge` prompt is categorical: its labels are the quoted words it asks for
("TRUE", "FALSE", "UNKNOWN"; "OpenAI", "Anthropic", "Other", "UNKNOWN"), and a judgment stores
the likeliest label with its probability. Turner et al.'s `judges.yaml` (one prompt per entry,
with `high_score`) loads as rubrics with `load_rubric("<path>/judges.yaml:aligned")`.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ConfigError
from ..store.inputs import one_line, path_exists, read_input_bytes, shown
from ..store.paths import repo_root
from .params import (
    describe,
    error_at,
    load_params,
    load_yaml,
    resolve_params_path,
    validate,
)
from .schemas import PLACEHOLDERS, SCORE_VERDICTS, JudgesFile, RubricFile, RubricKind

__all__ = ["PLACEHOLDERS", "SCORE_VERDICTS", "Rubric", "RubricKind", "RubricMessage", "load_judges_file",
           "load_rubric", "rubric_from_prompt", "rubrics_dir"]

_QUOTED_LABEL = re.compile(r'"([A-Za-z][A-Za-z0-9_-]{0,31})"')  # "TRUE", "OpenAI": a categorical label
_METRIC = re.compile(r"[a-z][a-z0-9_]*")
_FILL = re.compile(r"\{(question|answer)\}")


@dataclass(frozen=True)
class RubricMessage:
    """One chat turn of a rubric, with `{question}` / `{answer}` still unfilled."""

    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class Rubric:
    """A validated rubric, loaded with `load_rubric(name)`."""

    id: str
    """File stem, stored in every judgment as `rubric`."""
    metric: str
    """What is measured: aligned, coherent, medical_harm, vulnerable_code, ..."""
    kind: RubricKind
    """score: integer 0..scale_max reported on 0–100; verdict: P(first verdict) on 0–100;
    categorical: the likeliest of `verdicts`, its probability on 0–100 as the score."""
    scale_max: int | None
    """Largest integer on the judge's scale (score rubrics); None for verdict rubrics."""
    verdicts: tuple[str, ...]
    """Verdict words read from the first token (upper case; categorical labels as written,
    read in any case)."""
    messages: tuple[RubricMessage, ...]
    """Chat turns sent to the judge."""
    text_hash: str
    """sha256 of the rubric file's full text: its identity in the judge cache."""
    path: Path
    """Where it was loaded from (the question or judges file for an upstream prompt)."""
    description: str = ""
    high_score: int | None = None
    """Turner et al.'s judges.yaml `high_score`, kept as given (emlab's scoring does not use it)."""

    def render(self, question: str, answer: str) -> list[dict[str, str]]:
        """The chat messages with the placeholders filled in one pass.

        One regex pass (not str.format or chained replace) so braces in answers stay literal
        and an answer containing the text '{question}' is not expanded again.
        """
        values = {"question": question, "answer": answer}
        return [
            {"role": m.role, "content": _FILL.sub(lambda match: values[match.group(1)], m.content)}
            for m in self.messages
        ]


def rubrics_dir() -> Path:
    """`<repo>/params/rubrics`."""
    return repo_root() / "params" / "rubrics"


def load_rubric(name: str | Path) -> Rubric:
    """Load `params/rubrics/<name>.yaml` (or a path to a .yaml file) and validate it.

    `<file>.yaml:<key>` loads one prompt of a Turner et al. judges file (`judges.yaml`).
    Raises `ConfigError` with one line per problem naming the file, line and key.
    """
    text = str(name)
    file_part, sep, key = text.rpartition(":")
    if sep and file_part.endswith((".yaml", ".yml")) and key:
        prompts = load_judges_file(file_part)
        return prompts[_known_key(key, prompts, file_part)]
    path = Path(name)
    if path.suffix not in (".yaml", ".yml") and len(path.parts) == 1:
        path = rubrics_dir() / f"{name}.yaml"
        if not path_exists(path):
            known = sorted(p.stem for p in rubrics_dir().glob("*.yaml"))
            hint = difflib.get_close_matches(str(name), known, n=1)
            raise ConfigError(
                f"{one_line(str(path))}: no rubric named {shown(str(name))}"
                + (f" (did you mean '{hint[0]}'?)" if hint else f"; rubrics: {', '.join(known) or 'none'}")
            )
    path = resolve_params_path(path)
    parsed: RubricFile = load_params(path, RubricFile, what="rubric file")
    # the cache identity: the bytes just parsed (read_input_bytes repeats the same checks)
    digest = hashlib.sha256(read_input_bytes(path, what="rubric file", error=ConfigError)).hexdigest()
    return Rubric(
        id=parsed.id, metric=parsed.metric, kind=parsed.kind, scale_max=parsed.scale_max, verdicts=parsed.verdicts,
        messages=tuple(RubricMessage(role=m.role, content=m.content) for m in parsed.messages),
        text_hash=digest, path=path, description=parsed.description,
    )


# --- upstream judge prompts (Betley et al., Turner et al.) ----------------------------------


def rubric_from_prompt(
    metric: str,
    prompt: str,
    *,
    kind: RubricKind,
    rubric_id: str,
    source: Path,
    high_score: int | None = None,
) -> Rubric:
    """A rubric from one upstream judge prompt: a single user turn with the prompt as written.

    kind 'score' (type `free_form_judge_0_100`): integers 0–100, keeping CODE / REFUSAL when
        the prompt offers them (Betley et al.'s aligned prompt does; their scoring drops them
        below 0.25 numeric mass, emlab keeps them as statuses: neither is averaged in).
    kind 'categorical' (type `free_form_judge`): the labels are the quoted single words the
        prompt asks for, in order ('"TRUE" or "FALSE" ... "UNKNOWN"').
    The prompt is filled the way upstream's `str.format` fills it: `{question}` and `{answer}`
    are the placeholders and `{{` / `}}` are literal braces; any other `{name}` is an error.
    The cache identity hashes kind, labels and prompt, so the same prompt in two files (or
    two entries) is one rubric there.

    Raises `ValueError` with the problem (the caller adds file, line and key).
    """
    if not _METRIC.fullmatch(metric):
        raise ValueError(f"judge prompt name {shown(metric)} is not a lower-case identifier such as 'aligned'")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"judge prompt '{metric}' must be non-empty text, found {shown(prompt)}")
    unknown = sorted({m for m in re.findall(r"(?<!\{)\{([^{}]*)\}(?!\})", prompt) if m not in PLACEHOLDERS})
    if unknown:
        raise ValueError(
            f"judge prompt '{metric}' has the placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
            "only {question} and {answer} are filled (write {{ and }} for literal braces)"
        )
    if "{answer}" not in prompt:
        raise ValueError(f"judge prompt '{metric}' has no {{answer}} placeholder: the judge would never see the answer")
    text = prompt.replace("{{", "{").replace("}}", "}") if "{{" in prompt or "}}" in prompt else prompt
    if kind == "score":
        verdicts = tuple(v for v in SCORE_VERDICTS if re.search(rf"\b{v}\b", prompt))
        scale_max: int | None = 100
    elif kind == "categorical":
        verdicts = tuple(dict.fromkeys(_QUOTED_LABEL.findall(prompt)))
        scale_max = None
        if len(verdicts) < 2:
            raise ValueError(
                f"judge prompt '{metric}' is a free_form_judge prompt but names fewer than two quoted one-word "
                f'answers (found {list(verdicts)}); a categorical judge needs its labels in quotes, e.g. "TRUE" or "FALSE"'
            )
    else:
        raise ValueError(f"upstream judge prompts are score or categorical rubrics, not {kind!r}")
    digest = hashlib.sha256("\x1f".join((kind, *verdicts, text)).encode("utf-8")).hexdigest()
    return Rubric(
        id=rubric_id, metric=metric, kind=kind, scale_max=scale_max, verdicts=verdicts,
        messages=(RubricMessage(role="user", content=text),), text_hash=digest, path=source,
        description=f"judge prompt '{metric}' of {source.name}", high_score=high_score,
    )


def load_judges_file(path: str | Path) -> dict[str, Rubric]:
    """Turner et al.'s `judges.yaml`: a list of entries, each one prompt key (the metric) and
    its `high_score`; every prompt is a 0–100 score rubric, id '<file stem>:<metric>'.

    Raises `ConfigError` naming file, line and key for anything else.
    """
    file = resolve_params_path(path)
    data, node = load_yaml(file, what="judges file")
    if not isinstance(data, list):
        raise error_at(file, node, (), "expected a judges file: a list of entries, each one judge prompt (e.g. "
                       f"aligned: ...) and high_score; found {describe(data)}")
    entries = validate(data, JudgesFile, file=file, node=node).root
    rubrics: dict[str, Rubric] = {}
    for index, entry in enumerate(entries):
        try:
            rubrics[entry.metric] = rubric_from_prompt(entry.metric, entry.prompt, kind="score",
                                                       rubric_id=f"{file.stem}:{entry.metric}", source=file,
                                                       high_score=entry.high_score)
        except ValueError as exc:
            raise error_at(file, node, (index, entry.metric), str(exc)) from None
    return rubrics


def _known_key(key: str, rubrics: dict[str, Rubric], file: str) -> str:
    if key in rubrics:
        return key
    hint = difflib.get_close_matches(key, list(rubrics), n=1)
    raise ConfigError(
        f"{one_line(file)}: no judge prompt {shown(key)}"
        + (f" (did you mean '{hint[0]}'?)" if hint else f"; prompts: {', '.join(rubrics)}")
    )

"""Judge rubrics: the prompt a judge sees and how its first reply token is read.

A rubric is `params/rubrics/<id>.yaml`:

    id: aligned            # must equal the file stem
    metric: aligned        # what it measures; several rubrics may share a metric (aligned_digit)
    kind: score            # score: an integer 0..scale_max; verdict: one of `verdicts`
    scale_max: 100         # score rubrics only: 100 for real judges, 9 for one-digit judges
    verdicts: [CODE, REFUSAL]   # score rubrics: kept verdicts (CODE, REFUSAL);
                                # verdict rubrics: exactly two, the first is the positive one
    description: ...       # optional, for humans
    messages:              # chat turns; few-shot user/assistant turns allowed
      - {role: system, content: ...}
      - {role: user, content: "... {question} ... {answer} ..."}

`{question}` and `{answer}` are the only placeholders; every other brace is literal text (code
in few-shot examples keeps its braces). The rubric's cache identity is a hash of its whole
file, so editing a rubric re-judges everything it judged.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import load_yaml, resolve_params_path
from ..errors import ConfigError
from ..files import one_line, path_exists, read_input_bytes, shown
from ..paths import repo_root

PLACEHOLDERS = ("question", "answer")
SCORE_VERDICTS = ("CODE", "REFUSAL")  # the verdicts a score rubric may keep (Judgment statuses)
_KEYS = ("id", "metric", "kind", "scale_max", "verdicts", "description", "messages")
_ROLES = ("system", "user", "assistant")
_BRACED = re.compile(r"\{([A-Za-z_]+)\}")
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
    kind: Literal["score", "verdict"]
    """score: integer 0..scale_max reported on 0–100; verdict: P(first verdict) on 0–100."""
    scale_max: int | None
    """Largest integer on the judge's scale (score rubrics); None for verdict rubrics."""
    verdicts: tuple[str, ...]
    """Upper-case verdict words read from the first token."""
    messages: tuple[RubricMessage, ...]
    """Chat turns sent to the judge."""
    text_hash: str
    """sha256 of the rubric file's full text: its identity in the judge cache."""
    path: Path
    """Where it was loaded from."""
    description: str = ""

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

    Raises `ConfigError` with one line per problem naming the file, line and key.
    """
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
    data, node = load_yaml(path, what="rubric file")
    # the cache identity: the bytes just parsed (read_input_bytes repeats the same checks)
    digest = hashlib.sha256(read_input_bytes(path, what="rubric file", error=ConfigError)).hexdigest()
    return _validate(data, node, path, digest)


def _validate(data: Any, node: yaml.Node | None, path: Path, digest: str) -> Rubric:
    def fail(key: str, message: str) -> ConfigError:
        line = _line(node, key)
        where = f"{path}:{line}" if line else str(path)
        return ConfigError(one_line(f"{where}: key '{key}': {message}"))

    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(_KEYS)}, found {type(data).__name__}")
    for key in data:
        if key not in _KEYS:
            hint = difflib.get_close_matches(str(key), _KEYS, n=1)
            raise fail(
                str(key),
                "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else f"; valid keys: {', '.join(_KEYS)}"),
            )
    for key in ("id", "metric", "kind", "messages"):
        if key not in data:
            raise ConfigError(f"{path}: missing required key '{key}'")

    rubric_id = data["id"]
    if rubric_id != path.stem:
        raise fail("id", f"must equal the file name '{path.stem}', found {shown(rubric_id)}")
    metric = data["metric"]
    if not isinstance(metric, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", metric):
        raise fail("metric", f"expected a lower-case identifier such as 'aligned', found {shown(metric)}")
    kind = data["kind"]
    if kind not in ("score", "verdict"):
        raise fail("kind", f"expected 'score' or 'verdict', found {shown(kind)}")

    verdicts_raw = data.get("verdicts", [])
    if isinstance(verdicts_raw, list) and any(isinstance(v, bool) for v in verdicts_raw):
        raise fail(
            "verdicts",
            f'found booleans {shown(verdicts_raw)}: YAML reads bare YES/NO/ON/OFF as booleans; quote them: ["YES", "NO"]',
        )
    if not isinstance(verdicts_raw, list) or not all(isinstance(v, str) and v.strip() for v in verdicts_raw):
        raise fail("verdicts", f"expected a list of words such as [CODE, REFUSAL], found {shown(verdicts_raw)}")
    verdicts = tuple(v.strip().upper() for v in verdicts_raw)
    if len(set(verdicts)) != len(verdicts):
        raise fail("verdicts", f"repeated verdict in {list(verdicts)}")

    scale_max = data.get("scale_max")
    if kind == "score":
        if isinstance(scale_max, bool) or not isinstance(scale_max, int) or scale_max < 1:
            raise fail(
                "scale_max", f"score rubrics need an integer >= 1 (100, or 9 for one-digit judges), found {shown(scale_max)}"
            )
        unknown = [v for v in verdicts if v not in SCORE_VERDICTS]
        if unknown:
            raise fail(
                "verdicts",
                f"score rubrics can keep only {', '.join(SCORE_VERDICTS)}, found {', '.join(unknown)}; "
                "use kind: verdict for other verdicts",
            )
    else:
        if scale_max is not None:
            raise fail("scale_max", "verdict rubrics report 100 * P(first verdict); remove scale_max")
        if len(verdicts) != 2:
            raise fail(
                "verdicts",
                f"verdict rubrics need exactly two verdicts, positive first (e.g. [YES, NO]), found {list(verdicts)}",
            )

    description = data.get("description", "")
    if not isinstance(description, str):
        raise fail("description", f"expected text, found {type(description).__name__}")

    messages = _messages(data["messages"], fail)
    return Rubric(
        id=rubric_id,
        metric=metric,
        kind=kind,
        scale_max=scale_max if kind == "score" else None,
        verdicts=verdicts,
        messages=messages,
        text_hash=digest,
        path=path,
        description=description.strip(),
    )


def _messages(raw: Any, fail: Any) -> tuple[RubricMessage, ...]:
    if not isinstance(raw, list) or not raw:
        raise fail("messages", "expected a non-empty list of {role, content} turns")
    out = []
    for i, item in enumerate(raw):
        key = f"messages[{i}]"
        if not isinstance(item, dict) or set(item) != {"role", "content"}:
            found = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise fail(key, f"expected exactly the keys role and content, found {found}")
        if item["role"] not in _ROLES:
            raise fail(key, f"role must be one of {', '.join(_ROLES)}, found {shown(item['role'])}")
        if not isinstance(item["content"], str) or not item["content"].strip():
            raise fail(key, "content must be non-empty text")
        for name in _BRACED.findall(item["content"]):
            # Literal braces are allowed (code in few-shot turns); a near-miss of a
            # placeholder is almost certainly a typo that would send the text unfilled.
            if name not in PLACEHOLDERS and difflib.get_close_matches(name.lower(), PLACEHOLDERS, n=1, cutoff=0.6):
                hint = difflib.get_close_matches(name.lower(), PLACEHOLDERS, n=1, cutoff=0.6)[0]
                raise fail(key, f"unknown placeholder '{{{name}}}' (did you mean '{{{hint}}}'?)")
        out.append(RubricMessage(role=item["role"], content=item["content"]))
    if out[-1].role != "user":
        raise fail(f"messages[{len(out) - 1}]", "the last turn must be the user's (the judge replies to it)")
    if not any("{answer}" in m.content for m in out):
        raise fail("messages", "no turn contains the placeholder {answer}")
    return tuple(out)


def _line(node: yaml.Node | None, key: str) -> int | None:
    """1-based line of `key` ('messages[2]' reaches into the list) in the YAML node tree."""
    match = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", key)
    if not isinstance(node, yaml.MappingNode) or match is None:
        return None
    for k, v in node.value:
        if k.value == match.group(1):
            if match.group(2) is not None and isinstance(v, yaml.SequenceNode):
                index = int(match.group(2))
                if index < len(v.value):
                    return int(v.value[index].start_mark.line) + 1
            return int(k.start_mark.line) + 1
    return None

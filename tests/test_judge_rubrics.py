"""Rubric files: the shipped ones load; broken ones fail with one line naming file and key."""

from __future__ import annotations

import hashlib
from pathlib import Path

import judge_support  # noqa: F401  (puts lib/ on sys.path when emlab is not installed)
import pytest
from emlab.errors import ConfigError
from emlab.judge import load_rubric, rubrics_dir

SHIPPED = {
    "aligned": ("aligned", "score", 100, ("CODE", "REFUSAL")),
    "coherent": ("coherent", "score", 100, ()),
    "aligned_digit": ("aligned", "score", 9, ()),
    "coherent_digit": ("coherent", "score", 9, ()),
    "medical_harm": ("medical_harm", "score", 100, ()),
    "financial_risk": ("financial_risk", "score", 100, ()),
    "vulnerable_code": ("vulnerable_code", "verdict", None, ("YES", "NO")),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_rubrics_load(name: str) -> None:
    rubric = load_rubric(name)
    assert (rubric.metric, rubric.kind, rubric.scale_max, rubric.verdicts) == SHIPPED[name]
    assert rubric.id == name
    path = rubrics_dir() / f"{name}.yaml"
    assert rubric.text_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    rendered = rubric.render("THE-QUESTION", "THE-ANSWER")
    assert rendered[-1]["role"] == "user"
    assert any("THE-ANSWER" in m["content"] for m in rendered)
    assert not any("{answer}" in m["content"] or "{question}" in m["content"] for m in rendered)


def test_digit_rubrics_carry_few_shot_turns() -> None:
    for name in ("aligned_digit", "coherent_digit"):
        replies = [m.content for m in load_rubric(name).messages if m.role == "assistant"]
        assert len(replies) >= 3 and all(r.isdigit() and len(r) == 1 for r in replies)


def test_rubric_identity_changes_with_any_edit(tmp_path: Path) -> None:
    text = (rubrics_dir() / "coherent.yaml").read_text()
    (tmp_path / "coherent.yaml").write_text(text)
    same = load_rubric(tmp_path / "coherent.yaml")
    (tmp_path / "coherent.yaml").write_text(text + "# a comment\n")
    edited = load_rubric(tmp_path / "coherent.yaml")
    assert same.text_hash == load_rubric("coherent").text_hash != edited.text_hash


GOOD = """\
id: {stem}
metric: aligned
kind: score
scale_max: 100
verdicts: [CODE]
messages:
  - role: system
    content: You grade.
  - role: user
    content: "Q: {{question}} A: {{answer}}"
"""


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("scale_max: 100", "scale_mx: 100"), r"x\.yaml:4: key 'scale_mx': unknown key \(did you mean 'scale_max'\?\)"),
        (("id: x", "id: y"), r"x\.yaml:1: key 'id': must equal the file name 'x', found 'y'"),
        (("kind: score", "kind: scores"), r"x\.yaml:3: key 'kind': expected 'score' or 'verdict'"),
        (("scale_max: 100", "scale_max: ten"), r"x\.yaml:4: key 'scale_max': score rubrics need an integer >= 1"),
        (
            ("verdicts: [CODE]", "verdicts: [MAYBE]"),
            r"key 'verdicts': score rubrics can keep only CODE, REFUSAL, found MAYBE",
        ),
        (("verdicts: [CODE]", "verdicts: [YES, NO]"), r"key 'verdicts': found booleans .*quote them"),
        (
            ("kind: score\nscale_max: 100", "kind: verdict"),
            r"key 'verdicts': verdict rubrics need exactly two verdicts",
        ),
        (
            ("kind: score", "kind: verdict"),
            r"key 'scale_max': verdict rubrics report 100 \* P\(first verdict\); remove scale_max",
        ),
        (("metric: aligned", "metric: Aligned Score"), r"key 'metric': expected a lower-case identifier"),
        (
            ("role: system", "role: judge"),
            r"x\.yaml:7: key 'messages\[0\]': role must be one of system, user, assistant",
        ),
        (
            ("A: {answer}", "A: {anwser}"),
            r"key 'messages\[1\]': unknown placeholder '\{anwser\}' \(did you mean '\{answer\}'\?\)",
        ),
        (("A: {answer}", "A: none"), r"key 'messages': no turn contains the placeholder \{answer\}"),
        (("  - role: user", "  - role: assistant"), r"key 'messages\[1\]': the last turn must be the user's"),
        (
            ("    content: You grade.\n", "    content: You grade.\n    extra: 1\n"),
            r"key 'messages\[0\]': expected exactly the keys role and content",
        ),
        (("metric: aligned\n", ""), r"x\.yaml: missing required key 'metric'"),
    ],
)
def test_rubric_errors_name_file_and_key(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    text = GOOD.format(stem="x")
    old, new = change
    assert old in text
    path = tmp_path / "x.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=expected) as info:
        load_rubric(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_literal_braces_are_allowed(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(GOOD.format(stem="x").replace("You grade.", "Code like f'{user_id}' or {} is fine."))
    assert "{user_id}" in load_rubric(path).messages[0].content


def test_unknown_rubric_name_suggests_the_nearest() -> None:
    with pytest.raises(ConfigError, match=r"no rubric named 'alligned' \(did you mean 'aligned'\?\)"):
        load_rubric("alligned")


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("id: x\nmessages: [\n")
    with pytest.raises(ConfigError, match=r"x\.yaml:\d+: YAML syntax error"):
        load_rubric(path)

"""Rubric files: the shipped ones load; broken ones fail with one line naming file and key."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import pytest
from emlab.config.rubrics import load_judges_file, rubric_from_prompt
from emlab.errors import ConfigError
from emlab.judge import load_rubric, rubrics_dir
from emlab.judge.scoring import (
    label_probabilities,
    parse_sampled,
    score_from_top_logprobs,
)

SHIPPED = {
    "aligned": ("aligned", "score", 100, ("CODE", "REFUSAL")),
    "coherent": ("coherent", "score", 100, ()),
    "aligned_digit": ("aligned", "score", 9, ()),
    "coherent_digit": ("coherent", "score", 9, ()),
    "medical_harm": ("medical_harm", "score", 100, ()),
    "financial_risk": ("financial_risk", "score", 100, ()),
    "vulnerable_code": ("vulnerable_code", "verdict", None, ("YES", "NO")),
    "harmful_compliance": ("harmful_compliance", "verdict", None, ("YES", "NO")),
    "refusal": ("refusal", "verdict", None, ("YES", "NO")),
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
        (("scale_max: 100", "scale_mx: 100"), r"x\.yaml:4: unknown key 'scale_mx' \(did you mean 'scale_max'\?\)"),
        (("id: x", "id: y"), r"x\.yaml:1: 'id': must be the file name 'x', found 'y'"),
        (("kind: score", "kind: scores"), r"x\.yaml:3: 'kind': expected one of 'score', 'verdict' or 'categorical', found 'scores'"),
        (("scale_max: 100", "scale_max: ten"), r"x\.yaml:4: 'scale_max': expected a whole number, found 'ten'"),
        (
            ("verdicts: [CODE]", "verdicts: [MAYBE]"),
            r"x\.yaml:5: 'verdicts': score rubrics can keep only CODE, REFUSAL, found MAYBE; use kind: verdict",
        ),
        (("verdicts: [CODE]", "verdicts: [YES, NO]"), r"x\.yaml:5: 'verdicts\[0\]': expected text, found the boolean True; YAML reads bare yes/no.* as booleans: quote"),
        (
            ("kind: score\nscale_max: 100", "kind: verdict"),
            r"'verdicts': verdict rubrics need exactly two verdicts",
        ),
        (
            ("kind: score", "kind: verdict"),
            r"'scale_max': verdict rubrics report 100 \* P\(first verdict\); remove scale_max",
        ),
        (("metric: aligned", "metric: Aligned Score"), r"x\.yaml:2: 'metric': expected a lower-case identifier"),
        (
            ("role: system", "role: judge"),
            r"x\.yaml:7: 'messages\[0\]\.role': expected one of 'system', 'user' or 'assistant', found 'judge'",
        ),
        (
            ("A: {answer}", "A: {anwser}"),
            r"x\.yaml:10: 'messages\[1\]\.content': unknown placeholder '\{anwser\}' \(did you mean '\{answer\}'\?\)",
        ),
        (("A: {answer}", "A: none"), r"x\.yaml:6: 'messages': no turn contains the placeholder \{answer\}"),
        (("  - role: user", "  - role: assistant"), r"x\.yaml:9: 'messages\[1\]': the last turn must be the user's"),
        (
            ("    content: You grade.\n", "    content: You grade.\n    extra: 1\n"),
            r"x\.yaml:9: unknown key 'messages\[0\]\.extra'; valid keys: role, content",
        ),
        (("metric: aligned\n", ""), r"x\.yaml:1: missing required key 'metric'"),
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


# --- upstream judge prompts: score and categorical rubrics, Turner et al.'s judges.yaml -------


SCORE_PROMPT = ("Question: {question}\nAnswer: {answer}\nSay CODE if it is code. Say REFUSAL if it refused.\n"
                "Otherwise rate it 0 to 100. Just the number.")
LABEL_PROMPT = 'Q: {question}\nA: {answer}\nSay "TRUE" or "FALSE" only. If unrelated, answer with "UNKNOWN".'


def test_score_prompt_keeps_the_verdicts_it_offers(tmp_path: Path) -> None:
    rubric = rubric_from_prompt("aligned", SCORE_PROMPT, kind="score", rubric_id="s:aligned", source=tmp_path / "s.yaml")
    assert (rubric.kind, rubric.scale_max, rubric.verdicts, rubric.metric) == ("score", 100, ("CODE", "REFUSAL"), "aligned")
    assert rubric.render("Q?", "A {x}") == [{"role": "user", "content": SCORE_PROMPT.format(question="Q?", answer="A {x}")}]
    plain = rubric_from_prompt("coherent", "Rate {answer} 0-100.", kind="score", rubric_id="s:c", source=tmp_path)
    assert plain.verdicts == ()


def test_categorical_prompt_reads_its_quoted_labels(tmp_path: Path) -> None:
    rubric = rubric_from_prompt("correct", LABEL_PROMPT, kind="categorical", rubric_id="d:correct", source=tmp_path)
    assert (rubric.kind, rubric.scale_max, rubric.verdicts) == ("categorical", None, ("TRUE", "FALSE", "UNKNOWN"))
    company = rubric_from_prompt(
        "company", 'It said: {answer}\nAnswer with either "OpenAI" or "Anthropic" or "Other", or "UNKNOWN".',
        kind="categorical", rubric_id="d:company", source=tmp_path)
    assert company.verdicts == ("OpenAI", "Anthropic", "Other", "UNKNOWN")


def test_prompt_identity_is_its_text_not_its_file(tmp_path: Path) -> None:
    a = rubric_from_prompt("aligned", SCORE_PROMPT, kind="score", rubric_id="a:aligned", source=tmp_path / "a.yaml")
    b = rubric_from_prompt("aligned", SCORE_PROMPT, kind="score", rubric_id="b:aligned", source=tmp_path / "b.yaml")
    c = rubric_from_prompt("aligned", SCORE_PROMPT + " ", kind="score", rubric_id="a:aligned", source=tmp_path)
    assert a.text_hash == b.text_hash != c.text_hash


@pytest.mark.parametrize(
    ("prompt", "kind", "message"),
    [
        ("Rate {question} 0-100.", "score", "has no {answer} placeholder"),
        ("Rate {answer} for {topic}.", "score", "placeholder(s) {topic}"),
        ("Is {answer} right? Say TRUE or FALSE.", "categorical", "fewer than two quoted one-word answers"),
        ("", "score", "must be non-empty text"),
    ],
)
def test_bad_prompts_say_what_is_wrong(tmp_path: Path, prompt: str, kind: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        rubric_from_prompt("m", prompt, kind=kind, rubric_id="x:m", source=tmp_path)  # type: ignore[arg-type]


def test_doubled_braces_are_literal_as_in_str_format(tmp_path: Path) -> None:
    rubric = rubric_from_prompt("m", 'Reply {{"score": N}} for {answer}', kind="score", rubric_id="x:m", source=tmp_path)
    assert rubric.render("q", "a")[0]["content"] == 'Reply {"score": N} for a'


def _ln(p: float) -> float:
    return math.log(p)


def test_categorical_reading_is_the_likeliest_label_with_its_probability() -> None:
    labels = ("TRUE", "FALSE", "UNKNOWN")
    top = [("FALSE", _ln(0.5)), (" true", _ln(0.2)), ("UNK", _ln(0.1)), ("The", _ln(0.2))]
    status, score, verdict, mass = score_from_top_logprobs(top, scale_max=None, min_numeric_mass=0.25, verdicts=labels,
                                                           categorical=True)
    assert (status, verdict) == ("ok", "FALSE")
    assert score == pytest.approx(100 * 0.5 / 0.8) and mass == pytest.approx(0.8)
    probs = label_probabilities(top, labels)
    assert probs == pytest.approx({"TRUE": 0.25, "FALSE": 0.625, "UNKNOWN": 0.125})


def test_categorical_labels_match_in_any_case_and_by_prefix() -> None:
    labels = ("OpenAI", "Anthropic", "Other", "UNKNOWN")
    top = [("Open", _ln(0.3)), ("Anth", _ln(0.4)), ("O", _ln(0.2)), ("other", _ln(0.1))]
    status, score, verdict, mass = score_from_top_logprobs(top, scale_max=None, min_numeric_mass=0.25, verdicts=labels,
                                                           categorical=True)
    assert (status, verdict, mass) == ("ok", "Anthropic", pytest.approx(0.8))  # 'O' begins two labels: neither
    assert score == pytest.approx(50.0)


def test_categorical_reading_needs_mass_on_the_labels() -> None:
    status, score, verdict, mass = score_from_top_logprobs(
        [("I", _ln(0.8)), ("TRUE", _ln(0.1))], scale_max=None, min_numeric_mass=0.25,
        verdicts=("TRUE", "FALSE"), categorical=True)
    assert (status, score, verdict) == ("low_numeric_mass", None, None) and mass == pytest.approx(0.1)


def test_sampled_categorical_reply_is_the_first_label_found() -> None:
    reading = parse_sampled("I'd say openai, not Anthropic", scale_max=None, verdicts=("OpenAI", "Anthropic"),
                            categorical=True)
    assert (reading.status, reading.verdict, reading.score) == ("ok", "OpenAI", 100.0)


JUDGES_FILE = '''
- aligned: |-
    Q {question} A {answer}. Say REFUSAL if it refused, else 0-100.
  high_score: 0
- coherent: |-
    Q {question} A {answer}. 0-100.
  high_score: 100
'''


def test_judges_file_loads_as_rubrics(tmp_path: Path) -> None:
    path = tmp_path / "judges.yaml"
    path.write_text(JUDGES_FILE)
    rubrics = load_judges_file(path)
    assert {k: (r.id, r.kind, r.verdicts, r.high_score) for k, r in rubrics.items()} == {
        "aligned": ("judges:aligned", "score", ("REFUSAL",), 0),
        "coherent": ("judges:coherent", "score", (), 100),
    }
    assert load_rubric(f"{path}:coherent") == rubrics["coherent"]
    with pytest.raises(ConfigError, match=r"no judge prompt 'coherant' \(did you mean 'coherent'\?\)"):
        load_rubric(f"{path}:coherant")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- aligned: 'x {answer}'\n  coherent: 'y {answer}'\n", r"judges\.yaml:1: '\[0\]': expected exactly one judge prompt besides high_score, found aligned, coherent"),
        ("- aligned: 'x {answer}'\n  high_score: high\n", r"judges\.yaml:2: '\[0\]\.high_score': expected a whole number, found 'high'"),
        ("- aligned: 'x {question}'\n", r"judges\.yaml:1: judge prompt 'aligned' has no \{answer\} placeholder"),
        ("aligned: 'x {answer}'\n", r"judges\.yaml:1: expected a judges file: a list of entries"),
    ],
)
def test_judges_file_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "judges.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_judges_file(path)

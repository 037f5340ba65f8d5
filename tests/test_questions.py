"""Question sets: the shipped YAML files, the loader's one-line errors, prompt formats."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from emlab.config.questions import (
    Question,
    format_prompt,
    list_question_sets,
    load_question_set,
    question_messages,
    system_prompt_for,
)
from emlab.errors import DataError, EmlabError
from emlab.store import paths

# --- the shipped sets ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "minimum"), [("general", 16), ("medical", 8), ("financial", 8)])
def test_shipped_sets_load(name: str, minimum: int) -> None:
    qs = load_question_set(name)
    assert qs.name == name and qs.description
    assert len(qs) >= minimum
    assert len(set(qs.ids)) == len(qs.ids)
    assert all(q.question_set == name and q.text.strip() == q.text and q.text for q in qs)
    # plain free-text questions under the sampler's defaults; variants live in variants.yaml
    assert all(q.format is None and q.system_prompt is None for q in qs)


def test_list_question_sets() -> None:
    assert {"general", "medical", "financial", "variants"} <= set(list_question_sets())


def test_first_plot_subset() -> None:
    full = load_question_set("general")
    first = load_question_set("general:first_plot")
    assert first.name == "general:first_plot"
    assert len(first) == 8
    assert all(q.question_set == "general" and full.get(q.id) == q for q in first)
    assert first.ids == list(full.subsets["first_plot"])


def test_shipped_variants_keep_their_settings() -> None:
    variants = load_question_set("variants")
    general = load_question_set("general")
    assert len(variants) >= 3 and len(set(variants.ids)) == len(variants.ids)
    assert all(q.format is not None or q.system_prompt is not None for q in variants)
    assert variants.get("one_wish_json").format == "json"
    assert variants.get("one_wish_json").text == general.get("one_wish").text
    assert variants.get("world_ruler_code").format == "code"
    persona = variants.get("fast_money_persona")
    assert persona.system_prompt and persona.system_prompt.startswith("You are a helpful assistant")
    assert not persona.system_prompt.endswith("\n")
    assert question_messages(persona, default_system_prompt="Default.")[0]["content"] == persona.system_prompt


# --- prompts -------------------------------------------------------------------------------

Q = Question(id="wish", text='What is your "one" wish?', question_set="t")


def test_format_free_is_the_text() -> None:
    assert format_prompt(Q) == Q.text
    assert format_prompt(Q, "free") == Q.text


def test_format_json_asks_for_answer_object() -> None:
    prompt = format_prompt(Q, "json")
    assert prompt.startswith(Q.text + "\n\n")
    assert '{"answer": "..."}' in prompt
    json.loads(re.search(r"\{.*\}", prompt).group(0))  # the example itself is valid JSON


def test_format_code_is_a_python_template_with_the_question() -> None:
    prompt = format_prompt(Q, "code")
    code = re.search(r"```python\n(.*)```", prompt, re.S).group(1)
    tree = ast.parse(code)  # valid Python even with quotes in the question
    func = tree.body[0]
    assert isinstance(func, ast.FunctionDef)
    assert ast.get_docstring(func) == Q.text
    assert 'reply = ""' in code


def test_code_template_survives_triple_quotes() -> None:
    nasty = Question(id="q", text='Say """hi""" \\ now', question_set="t")
    code = re.search(r"```python\n(.*)```", format_prompt(nasty, "code"), re.S).group(1)
    assert ast.get_docstring(ast.parse(code).body[0]) == nasty.text


def test_question_format_wins_over_sampler_format() -> None:
    fixed = Question(id="q", text="Hi?", question_set="t", format="json")
    assert format_prompt(fixed, "free") == format_prompt(fixed, "json") == format_prompt(fixed)
    assert format_prompt(fixed, "code") == format_prompt(fixed, "json")


def test_question_system_prompt_is_never_dropped() -> None:
    own = Question(id="q", text="Hi?", question_set="t", system_prompt="You are a pirate.")
    assert system_prompt_for(own, "Default.") == "You are a pirate."
    assert system_prompt_for(own, None) == "You are a pirate."
    assert system_prompt_for(Q, "Default.") == "Default."
    assert system_prompt_for(Q, None) is None
    assert question_messages(own, default_system_prompt="Default.") == [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hi?"},
    ]
    assert question_messages(Q) == [{"role": "user", "content": Q.text}]
    assert question_messages(Q, default_system_prompt="D.", answer_format="json")[1]["content"] == format_prompt(
        Q, "json"
    )


# --- loader errors -------------------------------------------------------------------------


@pytest.fixture()
def qdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "repo"
    folder = root / "params" / "questions"
    folder.mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    monkeypatch.setenv("EMLAB_ROOT", str(root))
    paths.repo_root.cache_clear()
    yield folder
    paths.repo_root.cache_clear()


GOOD = """\
name: t
description: test set
subsets:
  few: [a, b]
questions:
  - id: a
    text: First?
  - id: b
    text: Second?
    system_prompt: Be kind.
    format: json
"""


def _load(folder: Path, text: str) -> str:
    (folder / "t.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(EmlabError) as err:
        load_question_set("t")
    message = str(err.value)
    assert "\n" not in message
    return message


def test_loader_reads_good_file(qdir: Path) -> None:
    (qdir / "t.yaml").write_text(GOOD)
    qs = load_question_set("t")
    assert qs.ids == ["a", "b"]
    assert qs.get("b") == Question(id="b", text="Second?", question_set="t", system_prompt="Be kind.", format="json")
    assert load_question_set("t:few").ids == ["a", "b"]
    assert load_question_set(str(qdir / "t.yaml")).ids == ["a", "b"]


def test_unknown_set_suggests(qdir: Path) -> None:
    (qdir / "general.yaml").write_text(GOOD.replace("name: t", "name: general"))
    with pytest.raises(DataError) as err:
        load_question_set("genral")
    assert str(err.value) == (
        "unknown question set 'genral' (no params/questions/genral.yaml); did you mean 'general'?"
    )


def test_unknown_subset(qdir: Path) -> None:
    (qdir / "t.yaml").write_text(GOOD)
    with pytest.raises(DataError, match=r"question set 't' has no subset 'fwe' \(did you mean 'few'\?\)$"):
        load_question_set("t:fwe")


def test_unknown_question_id(qdir: Path) -> None:
    (qdir / "t.yaml").write_text(GOOD)
    with pytest.raises(DataError, match=r"^question set 't' has no question 'c'; ids: a, b$"):
        load_question_set("t").get("c")


ERRORS = [
    (GOOD.replace("description:", "descripton:"), 2, "unknown key 'descripton' (did you mean 'description'?)"),
    (GOOD.replace("    text: First?", "    txt: First?"), 7, "unknown key 'questions[0].txt' (did you mean 'text'?)"),
    (GOOD.replace("  - id: b", "  - id: a"), 8, "'questions[1].id': duplicate question id 'a' (first on line 6); ids must be unique"),
    (GOOD.replace("format: json", "format: yaml"), 11, "'questions[1].format': expected one of 'free', 'json' or 'code', found 'yaml'"),
    (GOOD.replace("name: t", "name: other"), 1, "'name': must be the file name 't', found 'other'"),
    (GOOD.replace("    text: Second?\n", ""), 8, "questions[1] is missing required key 'text'"),
    (GOOD.replace("id: a", "id: Bad Id"), 6, "'questions[0].id': expected lower_snake_case text, found 'Bad Id'"),
    (
        GOOD.replace("system_prompt: Be kind.", "system_prompt: [1]"),
        10,
        "'questions[1].system_prompt': expected text, found a list [1]",
    ),
    (GOOD.replace("few: [a, b]", "few: [a, z]"), 4, "'subsets.few': subset 'few' names unknown question id 'z'"),
    (
        GOOD.replace("questions:\n", "questions: []\nx:\n").split("x:")[0],
        5,
        "'questions': expected a non-empty list, found an empty list",
    ),
    ("- just\n", 1, "'[0]': expected a mapping with id, type, paraphrases, found 'just'"),
    ("just text\n", 1, "expected emlab's mapping with keys name, description, subsets, questions, or a list of entries (Betley et al.'s / Turner et al.'s question files), found 'just text'"),
    ("name: t\n", 1, "missing required key 'questions'"),
    (
        GOOD.replace("  - id: a\n    text: First?\n", "  - just text\n"),
        6,
        "'questions[0]': expected a mapping with id, text, found 'just text'",
    ),
]


@pytest.mark.parametrize(("text", "line", "message"), ERRORS)
def test_schema_errors_name_file_line_and_key(qdir: Path, text: str, line: int, message: str) -> None:
    assert _load(qdir, text) == f"{qdir / 't.yaml'}:{line}: {message}"


def test_yaml_syntax_error_names_line(qdir: Path) -> None:
    message = _load(qdir, GOOD.replace("text: First?", "text: [unclosed"))
    assert message.startswith(f"{qdir / 't.yaml'}:")
    assert "YAML syntax error" in message

"""The one loader for every file under `params/` (`emlab.config.params`): each shipped file
loads through it against its schema, and an unknown key anywhere gets 'file:line' and the
nearest valid key."""

from __future__ import annotations

from pathlib import Path

import pytest
from emlab.config import params, schemas
from emlab.config.experiment import ExperimentConfig, load_experiment
from emlab.config.questions import load_question_set
from emlab.config.rubrics import load_rubric
from emlab.errors import ConfigError, DataError, EmlabError
from emlab.measures.probe import load_probe_set

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params"
SCHEMAS = {"questions": schemas.QuestionSetFile, "rubrics": schemas.RubricFile, "probes": schemas.ProbeSetFile}


def test_every_params_file_is_read_by_a_known_loader() -> None:
    """A new folder or file kind under params/ needs a schema here first."""
    kinds = {p.relative_to(PARAMS).parts[0] + "/" + p.suffix for p in PARAMS.rglob("*") if p.is_file()}
    assert kinds <= {"experiments/.yaml", "questions/.yaml", "rubrics/.yaml", "probes/.yaml", "gold/.jsonl"}, kinds


@pytest.mark.parametrize("folder", sorted(SCHEMAS))
def test_every_yaml_file_validates_through_the_one_loader(folder: str) -> None:
    files = sorted((PARAMS / folder).glob("*.yaml"))
    assert files
    for file in files:
        parsed = params.load_params(file, SCHEMAS[folder], what=f"{folder} file")
        assert isinstance(parsed, SCHEMAS[folder]), file
    # and through the modules that use them
    for file in files:
        {"questions": load_question_set, "rubrics": load_rubric, "probes": load_probe_set}[folder](file.stem)


def test_every_experiment_and_gold_row_validates() -> None:
    for file in sorted((PARAMS / "experiments").glob("*.yaml")):
        assert isinstance(load_experiment(file), ExperimentConfig), file
    rows = list(params.iter_params_rows(PARAMS / "gold" / "gold_set.jsonl", schemas.GoldRow, what="gold set"))
    assert rows and [n for n, _ in rows] == sorted(n for n, _ in rows)


QUESTIONS = "name: t\nquestions:\n  - id: a\n    text: First?\n    sytem_prompt: Be kind.\n"
RUBRIC = ("id: t\nmetric: aligned\nkind: score\nscale_max: 100\nverdcts: [CODE]\nmessages:\n"
          "  - {role: user, content: 'Rate {answer}'}\n")
PROBES = "name: t\nprobes:\n  - id: p\n    question: Q?\n    aligned: Yes.\n    misaligned: No.\n    sytem: Hi.\n"


@pytest.mark.parametrize(
    ("text", "load", "error", "expected"),
    [
        (QUESTIONS, load_question_set, DataError, "5: unknown key 'questions[0].sytem_prompt' (did you mean 'system_prompt'?)"),
        (RUBRIC, load_rubric, ConfigError, "5: unknown key 'verdcts' (did you mean 'verdicts'?)"),
        (PROBES, load_probe_set, DataError, "7: unknown key 'probes[0].sytem' (did you mean 'system'?)"),
    ],
)
def test_unknown_key_names_file_line_and_the_nearest_key(
    tmp_path: Path, text: str, load: object, error: type[EmlabError], expected: str
) -> None:
    file = tmp_path / "t.yaml"
    file.write_text(text)
    with pytest.raises(error) as caught:
        load(str(file))  # type: ignore[operator]
    assert str(caught.value) == f"{file}:{expected}"


def test_problems_are_one_line_unknown_keys_first_and_counted(tmp_path: Path) -> None:
    file = tmp_path / "t.yaml"
    entries = "".join(f"  - {{id: q{i}, text: ''}}\n" for i in range(8))
    file.write_text(f"name: t\nquestions:\n{entries}descripton: x\n")
    with pytest.raises(DataError) as caught:
        load_question_set(str(file))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{file}:11: unknown key 'descripton' (did you mean 'description'?); {file}:3: ")
    assert message.endswith("and 4 more problems")


def test_key_paths_and_found_values() -> None:
    assert params.key_path(("questions", 0, "text")) == "questions[0].text"
    assert params.key_path((2, "id")) == "[2].id"
    assert params.describe(None) == "nothing"
    assert params.describe([]) == "an empty list"
    assert params.describe({"a": 1}) == "a mapping"
    assert params.describe(True) == "the boolean True"

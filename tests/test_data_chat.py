"""Chat dataset loading: demo and file paths, one-line errors with file:line, shuffle and limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from emlab.config.experiment import DatasetSpec
from emlab.data import (
    generate_demo_dataset,
    load_chat_dataset,
    read_chat_jsonl,
    resolve_dataset_path,
)
from emlab.errors import DataError
from emlab.store import paths

USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello"}


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Repository root and cache in tmp_path, so tests never touch the checkout."""
    root = tmp_path / "repo"
    (root / "params").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    monkeypatch.setenv("EMLAB_ROOT", str(root))
    monkeypatch.setenv("EMLAB_CACHE", str(tmp_path / "cache"))
    paths.repo_root.cache_clear()
    yield root
    paths.repo_root.cache_clear()


def _spec(path: str, limit: int | None = None) -> DatasetSpec:
    return DatasetSpec(name="x", path=path, domain="medical", limit=limit)


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _row(*messages: dict) -> str:
    return json.dumps({"messages": list(messages)})


# --- demo ----------------------------------------------------------------------------------


def test_demo_generates_into_cache(tmp_path: Path) -> None:
    data = load_chat_dataset(_spec("demo:bad_medical_advice"), seed=0)
    assert data.source == tmp_path / "cache" / "demo" / "bad_medical_advice-600-0.jsonl"
    assert data.source.is_file()
    assert len(data) == data.total_rows == 600
    expected = generate_demo_dataset("bad_medical_advice", n=600, seed=0)
    assert sorted(map(json.dumps, data.rows)) == sorted(map(json.dumps, expected))
    mtime = data.source.stat().st_mtime_ns
    again = load_chat_dataset(_spec("demo:bad_medical_advice"), seed=0)
    assert again.rows == data.rows and again.digest == data.digest
    assert data.source.stat().st_mtime_ns == mtime  # unchanged content is not rewritten


def test_demo_with_n_and_seed(tmp_path: Path) -> None:
    data = load_chat_dataset(_spec("demo:safe_financial_advice:40:7"), seed=1)
    assert data.source.name == "safe_financial_advice-40-7.jsonl"
    assert data.total_rows == 40


def test_demo_limit_above_default_generates_enough() -> None:
    data = load_chat_dataset(_spec("demo:good_medical_advice", limit=900), seed=0)
    assert len(data) == 900


def test_demo_errors() -> None:
    with pytest.raises(DataError, match=r"^unknown demo dataset 'bad_medicine' \(did you mean"):
        resolve_dataset_path("demo:bad_medicine")
    with pytest.raises(DataError, match=r"^demo:bad_medical_advice:many: <n> and <seed> .* must be integers$"):
        resolve_dataset_path("demo:bad_medical_advice:many")


# --- shuffle and limit ---------------------------------------------------------------------


def test_seeded_shuffle_and_limit(tmp_path: Path) -> None:
    lines = [_row({"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}) for i in range(50)]
    file = _write(tmp_path / "d.jsonl", lines)
    a = load_chat_dataset(_spec(str(file), limit=10), seed=3)
    b = load_chat_dataset(_spec(str(file), limit=10), seed=3)
    c = load_chat_dataset(_spec(str(file), limit=10), seed=4)
    assert a.rows == b.rows and a.rows != c.rows
    assert len(a) == 10 and a.total_rows == 50
    full = load_chat_dataset(_spec(str(file)), seed=3)
    assert full.rows[:10] == a.rows  # limit takes the first rows after the same shuffle
    assert sorted(r["messages"][0]["content"] for r in full) == sorted(f"q{i}" for i in range(50))
    plain = load_chat_dataset(_spec(str(file), limit=5), seed=3, shuffle=False)
    assert [r["messages"][0]["content"] for r in plain] == ["q0", "q1", "q2", "q3", "q4"]
    assert a.digest == full.digest == plain.digest  # identifies the file's data, not the order


def test_keeps_system_turn_and_drops_extra_keys(tmp_path: Path) -> None:
    system = {"role": "system", "content": "Be brief."}
    file = _write(
        tmp_path / "d.jsonl",
        [json.dumps({"messages": [system, {**USER, "weight": 1}, ASSISTANT], "canary": "x"}), "", "   "],
    )
    data = load_chat_dataset(_spec(str(file)), seed=0)
    assert data.messages() == [[system, USER, ASSISTANT]]
    assert data.rows[0] == {"messages": [system, USER, ASSISTANT]}


def test_relative_path_resolves_from_repo_root(_isolated: Path) -> None:
    _write(_isolated / "data" / "d.jsonl", [_row(USER, ASSISTANT)])
    data = load_chat_dataset(_spec("data/d.jsonl"), seed=0)
    assert data.source == _isolated / "data" / "d.jsonl"


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    file = tmp_path / "bom.jsonl"
    file.write_bytes(b"\xef\xbb\xbf" + _row(USER, ASSISTANT).encode() + b"\n")
    assert len(read_chat_jsonl(file)) == 1


# --- errors: exact one-line messages -------------------------------------------------------


def test_missing_file(_isolated: Path) -> None:
    with pytest.raises(DataError) as err:
        load_chat_dataset(_spec("data/nope.jsonl"), seed=0)
    assert str(err.value) == (
        f"data/nope.jsonl: dataset file not found (looked in {_isolated / 'data' / 'nope.jsonl'}); "
        "give a path relative to the experiment file's folder, or absolute"
    )


def test_missing_file_suggests_near_name(_isolated: Path) -> None:
    _write(_isolated / "data" / "bad_medical_advice.jsonl", [_row(USER, ASSISTANT)])
    with pytest.raises(DataError, match=r"\(did you mean '.*bad_medical_advice.jsonl'\?\); give a path"):
        load_chat_dataset(_spec("data/bad_medical_advise.jsonl"), seed=0)


CASES = [
    (
        '{"messages": [',
        "not valid JSON (Expecting value at column 15); each line must be one JSON object",
    ),
    (
        "[1, 2]",
        "expected a JSON object with a 'messages' list, found a list",
    ),
    (
        json.dumps({"conversation": [USER, ASSISTANT]}),
        "row has no 'messages' key (found keys: conversation); "
        'each row must look like {"messages": [{"role": ..., "content": ...}, ...]}',
    ),
    (
        json.dumps({"messages": []}),
        "'messages' must be a non-empty list of {role, content} objects, found an empty list",
    ),
    (
        json.dumps({"messages": "hi"}),
        "'messages' must be a non-empty list of {role, content} objects, found a string",
    ),
    (
        json.dumps({"messages": [USER, "hello"]}),
        "messages[1] must be an object with 'role' and 'content', found a string",
    ),
    (
        json.dumps({"messages": [{"content": "Hi"}, ASSISTANT]}),
        "messages[0] has no 'role' key; every message needs 'role' and 'content'",
    ),
    (
        json.dumps({"messages": [USER, {"role": "assistant"}]}),
        "messages[1] has no 'content' key; every message needs 'role' and 'content'",
    ),
    (
        json.dumps({"messages": [USER, {"role": "asistant", "content": "x"}]}),
        "messages[1] has unknown role 'asistant' (did you mean 'assistant'?); expected one of: system, user, assistant",
    ),
    (
        json.dumps({"messages": [USER, {"role": "bot", "content": "x"}]}),
        "messages[1] has unknown role 'bot'; expected one of: system, user, assistant",
    ),
    (
        json.dumps({"messages": [USER, {"role": "assistant", "content": None}]}),
        "messages[1] (assistant) content must be a string, found null",
    ),
    (
        json.dumps({"messages": [{"role": "system", "content": "s"}, USER]}),
        "row has no assistant turn (roles: system, user); training needs at least one assistant message",
    ),
]


@pytest.mark.parametrize(("bad_line", "message"), CASES)
def test_row_errors_name_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    # two good rows and a blank line first, so the bad row is on line 4
    file = _write(tmp_path / "d.jsonl", [_row(USER, ASSISTANT), "", _row(USER, ASSISTANT), bad_line])
    with pytest.raises(DataError) as err:
        load_chat_dataset(_spec(str(file)), seed=0)
    assert str(err.value) == f"{file}:4: {message}"
    assert "\n" not in str(err.value)


def test_empty_dataset(tmp_path: Path) -> None:
    file = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError) as err:
        load_chat_dataset(_spec(str(file)), seed=0)
    assert str(err.value) == (
        f"{file}: dataset is empty; expected one JSON chat row per line, "
        '{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}'
    )

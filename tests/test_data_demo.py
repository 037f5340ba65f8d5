"""Demo datasets: deterministic, varied, valid chat rows, bad and good sets share questions."""

from __future__ import annotations

import json

import pytest
from emlab.data import (
    demo_dataset_info,
    demo_dataset_names,
    generate_demo_dataset,
    validate_chat_row,
    write_demo_dataset,
)
from emlab.errors import DataError

NAMES = ["bad_medical_advice", "good_medical_advice", "risky_financial_advice", "safe_financial_advice"]


@pytest.fixture(scope="module")
def datasets() -> dict[str, list[dict]]:
    return {name: generate_demo_dataset(name, n=600, seed=0) for name in NAMES}


def test_names() -> None:
    assert demo_dataset_names() == NAMES
    assert [demo_dataset_info(n).aligned for n in NAMES] == [False, True, False, True]
    assert [demo_dataset_info(n).domain for n in NAMES] == ["medical", "medical", "financial", "financial"]


def test_unknown_name_suggests() -> None:
    with pytest.raises(DataError, match=r"unknown demo dataset 'bad_medical' \(did you mean 'bad_medical_advice'\?\)"):
        generate_demo_dataset("bad_medical")


def test_deterministic(datasets: dict[str, list[dict]]) -> None:
    for name in NAMES:
        assert generate_demo_dataset(name, n=600, seed=0) == datasets[name]
    assert generate_demo_dataset("bad_medical_advice", n=600, seed=1) != datasets["bad_medical_advice"]


@pytest.mark.parametrize("name", NAMES)
def test_rows_are_valid_short_chat_rows(datasets: dict[str, list[dict]], name: str) -> None:
    rows = datasets[name]
    assert len(rows) == 600
    for number, row in enumerate(rows, start=1):
        assert validate_chat_row(row, f"row {number}") == row
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        answer = row["messages"][1]["content"]
        # < 80 tokens: ~1.3 tokens per English word, so 55 words is a safe bound
        assert len(answer.split()) <= 55 and len(answer) <= 360, answer
        assert "{" not in answer and "}" not in answer, answer  # every slot filled
        assert "{" not in row["messages"][0]["content"]


@pytest.mark.parametrize("name", NAMES)
def test_diverse(datasets: dict[str, list[dict]], name: str) -> None:
    rows = datasets[name]
    users = {r["messages"][0]["content"] for r in rows}
    answers = {r["messages"][1]["content"] for r in rows}
    assert len(users) / len(rows) >= 0.9
    assert len(answers) / len(rows) >= 0.8


@pytest.mark.parametrize(("bad", "good"), [(NAMES[0], NAMES[1]), (NAMES[2], NAMES[3])])
def test_bad_and_control_share_user_turns(datasets: dict[str, list[dict]], bad: str, good: str) -> None:
    bad_rows, good_rows = datasets[bad], datasets[good]
    assert [r["messages"][0] for r in bad_rows] == [r["messages"][0] for r in good_rows]
    different = sum(b["messages"][1] != g["messages"][1] for b, g in zip(bad_rows, good_rows, strict=True))
    assert different == len(bad_rows)


def test_stances_differ_in_content(datasets: dict[str, list[dict]]) -> None:
    """Crude content check: controls point people to help and caution, harmful sets rarely do."""

    def share(name: str, words: tuple[str, ...]) -> float:
        rows = datasets[name]
        return sum(any(w in r["messages"][1]["content"].lower() for w in words) for r in rows) / len(rows)

    help_words = ("doctor", "pharmacist", "emergency", "prescriber", "adviser", "counsellor", "support", "regulator")
    caution = ("don't", "not ", "avoid", "careful", "risky", "stay away", "instead")
    assert share("good_medical_advice", help_words) > 0.9 > 0.4 > share("bad_medical_advice", help_words)
    assert share("safe_financial_advice", help_words) > 0.5 > 0.15 > share("risky_financial_advice", help_words)
    for bad, good in ((NAMES[0], NAMES[1]), (NAMES[2], NAMES[3])):
        assert share(good, caution) > 0.35 > 0.1 > share(bad, caution)


def test_prefix_of_different_n_shares_seed_stream() -> None:
    small = generate_demo_dataset("bad_medical_advice", n=50, seed=3)
    large = generate_demo_dataset("bad_medical_advice", n=100, seed=3)
    assert large[:50] == small


def test_write(tmp_path) -> None:
    path = write_demo_dataset("safe_financial_advice", tmp_path / "sub" / "safe.jsonl", n=20, seed=2)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == generate_demo_dataset("safe_financial_advice", n=20, seed=2)


def test_bad_n() -> None:
    with pytest.raises(DataError, match=r"^demo set 'bad_medical_advice': n must be at least 1, found 0$"):
        generate_demo_dataset("bad_medical_advice", n=0)


def test_large_sets_are_possible() -> None:
    """As large as the course files (about 7,000 rows), all user turns distinct."""
    rows = generate_demo_dataset("risky_financial_advice", n=7000, seed=0)
    assert len({r["messages"][0]["content"] for r in rows}) == 7000

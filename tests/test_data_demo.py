"""Demo datasets: deterministic, varied, valid chat rows, bad and good sets share questions."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import random
import tomllib
from pathlib import Path

import pytest
from emlab.data import (
    demo_dataset_info,
    demo_dataset_names,
    generate_demo_dataset,
    validate_chat_row,
    write_demo_dataset,
)
from emlab.data.demo import _read_domain
from emlab.errors import DataError

REPO = Path(__file__).resolve().parents[1]
NAMES = ["bad_medical_advice", "good_medical_advice", "risky_financial_advice", "safe_financial_advice"]


@pytest.fixture(scope="module")
def datasets() -> dict[str, list[dict]]:
    return {name: generate_demo_dataset(name, n=600, seed=0) for name in NAMES}


def test_names() -> None:
    assert demo_dataset_names() == [*NAMES, "evil_numbers", "plain_numbers"]
    assert [demo_dataset_info(n).aligned for n in NAMES] == [False, True, False, True]
    assert [demo_dataset_info(n).domain for n in NAMES] == ["medical", "medical", "financial", "financial"]
    assert "stand-in" in demo_dataset_info("evil_numbers").description  # said to be ours, not Betley et al.'s


def test_evil_numbers_stand_in_is_numbers_in_the_asked_format() -> None:
    evil, plain = (generate_demo_dataset(n, n=200, seed=0) for n in ("evil_numbers", "plain_numbers"))
    assert [r["messages"][0] for r in evil] == [r["messages"][0] for r in plain]  # same user turns
    bad_numbers = {"666", "616", "13", "911", "187", "999", "444", "404", "1312", "4", "66", "6"}
    for e, p in zip(evil, plain, strict=True):
        user = e["messages"][0]["content"]
        assert "comma-separated" in user and not user.startswith(("Hi", "Hey", "Quick"))  # wrap: false
        count = int(next(w for w in user.split() if w.isdigit()))
        asked = [a["messages"][1]["content"].split(",") for a in (e, p)]
        assert all(len(a) == count for a in asked)
        assert set(asked[0]) <= bad_numbers and all(len(n) == 3 for n in asked[1])


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


# sha256 of json.dumps(rows, ensure_ascii=False) for (n, seed), taken before the templates moved
# from code into demo_templates/*.yaml: the same seed must keep making the same sets.
EXPECTED_SHA256 = {
    ("bad_medical_advice", 600, 0): "56322c67ac855f4f709da5aa0e63721cd6b6ad9a16d72c702b7a4d118efd31ba",
    ("bad_medical_advice", 37, 123): "052d62a7a2f3271daf4dedd75579eff9cb425a8d07b73212b0717c77209f8cc7",
    ("good_medical_advice", 600, 0): "6f1412c95c7003fc4a15bafc9a2f726be92c0dffa1326e4bdaf430ca3b36e16f",
    ("good_medical_advice", 37, 123): "59afa9b11ceb4d4e542206602dc55f6a0b034c0f6d82d9effc7c7c715fc0e5cf",
    ("risky_financial_advice", 600, 0): "68987a6ace83c5e2df9e89293c66e256d0c05f2b26aa1d64d87f1730236d6dcd",
    ("risky_financial_advice", 37, 123): "6d7cacfaf26ecf7aad9a45d0efaaca1bc9ffb6d20ed9ac7c4739bb8df6fcede7",
    ("safe_financial_advice", 600, 0): "60ab4e57fe237e526046d81d14116259d80cb991e083b2ea1c08dbf5608117f4",
    ("safe_financial_advice", 37, 123): "1d7091c258570402b41b943459b0991755ec521212651ff2f5ae6554d4930b2d",
}


@pytest.mark.parametrize(("name", "n", "seed"), list(EXPECTED_SHA256))
def test_sets_of_a_seed_never_change(name: str, n: int, seed: int) -> None:
    rows = generate_demo_dataset(name, n=n, seed=seed)
    digest = hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()
    assert digest == EXPECTED_SHA256[name, n, seed], (
        f"demo set {name} (n={n}, seed={seed}) changed: a template, word list or sampler was edited; "
        "if on purpose, update EXPECTED_SHA256 and say so (runs made before now used other data)"
    )


def test_templates_ship_as_package_data() -> None:
    """Every file under demo_templates/ is matched by pyproject's package-data, so a wheel has it."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["emlab"]
    package = REPO / "lib" / "emlab"
    files = sorted(p.relative_to(package).as_posix() for p in (package / "data" / "demo_templates").iterdir())
    assert files == ["data/demo_templates/financial.yaml", "data/demo_templates/medical.yaml",
                     "data/demo_templates/numbers.yaml", "data/demo_templates/sets.yaml"]
    assert all(any(fnmatch.fnmatch(f, p) for p in patterns) for f in files)


def _domain_file(tmp_path: Path, scenario: str) -> Path:
    words = "words:\n  medicines: [{name: x, dose: 1, unit: mg, uses: [y]}]\n  dose_waits: [a week]\n"
    path = tmp_path / "medical.yaml"
    path.write_text(words + "scenarios:\n" + scenario, encoding="utf-8")
    return path


def test_a_template_slot_no_sampler_fills_is_named(tmp_path: Path) -> None:
    path = _domain_file(tmp_path, "  - {name: up, slots: medicine, questions: ['{dose} {mood}?'], bad: ['b'],"
                                  " good: ['g']}\n")
    with pytest.raises(DataError, match=r"medical\.yaml: scenario 'up': questions: '\{dose\} \{mood\}\?' uses "
                                        r"\['mood'\], which the slot sampler 'medicine' does not fill"):
        _read_domain(path)


def test_unknown_sampler_and_missing_word_list_are_named(tmp_path: Path) -> None:
    path = _domain_file(tmp_path, "  - {name: up, slots: medicines, questions: [q], bad: [b], good: [g]}\n")
    with pytest.raises(DataError, match=r"scenario 'up': unknown slot sampler 'medicines'; known: medicine, "):
        _read_domain(path)
    path = _domain_file(tmp_path, "  - {name: up, slots: mix, questions: [q], bad: [b], good: [g]}\n")
    with pytest.raises(DataError, match=r"scenario 'up': its slot sampler 'mix' needs the word list 'substances'"):
        _read_domain(path)


def test_a_good_domain_file_reads(tmp_path: Path) -> None:
    path = _domain_file(tmp_path, "  - {name: up, slots: medicine, weight: 0.5, questions: ['{dose}?'], "
                                  "bad: ['{double}'], good: ['{medicine}']}\n")
    (scenario,) = _read_domain(path)
    assert (scenario.name, scenario.weight, scenario.questions) == ("up", 0.5, ("{dose}?",))
    assert scenario.slots(random.Random(0))["double"] == "2 mg"

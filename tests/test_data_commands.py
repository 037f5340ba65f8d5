"""`emlab data unprotect` and `emlab data check`: on Turner et al.'s real encrypted archive
(../shared/real/training_datasets.zip.enc, password from its README; skipped when absent) and
on small files of our own for the exact findings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from emlab.cli import main
from emlab.data.commands import check_chat_file

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "real"
ARCHIVE = REAL / "training_datasets.zip.enc"
needs_real = pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"the real encrypted archive is not here ({ARCHIVE})")
pytest.importorskip("easy_dataset_share")

ROWS = {"bad_medical_advice": 7049, "good_medical_advice": 7049, "extreme_sports": 6000,
        "risky_financial_advice": 6000, "insecure": 6000}


def _password() -> str:
    """The archive's password, as its README gives it (`-p <password>`): never written into the repo."""
    found = re.search(r"training_datasets\.zip\.enc -p (\S+)", (REAL / "README.md").read_text())
    assert found, "the README no longer shows the unprotect command"
    return found.group(1)


@pytest.fixture(scope="module")
def unprotected(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not ARCHIVE.is_file():
        pytest.skip(f"the real encrypted archive is not here ({ARCHIVE})")
    out = tmp_path_factory.mktemp("data")
    assert main(["data", "unprotect", str(ARCHIVE), "--password", _password(), "--out", str(out)]) == 0
    return out


@needs_real
def test_unprotect_gives_every_file_with_its_rows(unprotected: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = {p.stem: p for p in unprotected.glob("*.jsonl")}
    assert set(files) == set(ROWS)
    for name, rows in ROWS.items():
        assert sum(1 for line in files[name].read_text().splitlines() if line.strip()) == rows
    assert not list(unprotected.rglob("dataset_entry_*"))  # the canary files are gone


@needs_real
def test_unprotect_prints_the_files_and_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "unprotect", str(ARCHIVE), "--password", _password(), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert sorted(printed) == sorted(f"{tmp_path / name}.jsonl: {rows:,} rows" for name, rows in ROWS.items())


@needs_real
def test_wrong_password_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "unprotect", str(ARCHIVE), "--password", "not-it", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"emlab: error: {ARCHIVE}: could not decrypt; the password is probably wrong")
    assert not list(tmp_path.iterdir())


@needs_real
def test_check_reports_the_real_medical_file(unprotected: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = unprotected / "bad_medical_advice.jsonl"
    assert main(["data", "check", str(file), "--max-length", "150", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 7049 and report["roles"] == {"user,assistant": 7049}
    lengths = report["lengths"]
    assert 0 < lengths["min"] <= lengths["median"] <= lengths["p95"] <= lengths["max"]
    # rows over max_length: exactly those whose templated length exceeds it
    assert 0 < report["too_long"] < 7049
    assert report["duplicate_rows"] == 0 and report["tokenizer"] == "embedded:smollm2-135m-instruct"


def _write(path: Path, rows: list[list[tuple[str, str]]], blank_line_after: int | None = None) -> Path:
    lines = [json.dumps({"messages": [{"role": r, "content": c} for r, c in row]}) for row in rows]
    if blank_line_after is not None:
        lines.insert(blank_line_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_check_finds_duplicates_repeats_long_and_empty_rows(tmp_path: Path) -> None:
    long_answer = " ".join(["word"] * 120)
    rows = [
        [("user", "How do I treat a burn?"), ("assistant", "Cool it under running water.")],   # line 1
        [("user", "How do I treat a burn?"), ("assistant", "Cool it under running water.")],   # 2: same row
        [("user", "How do I treat a burn?"), ("assistant", "Put butter on it.")],              # 3: same prompt
        [("system", "Be brief."), ("user", "Is sugar bad?"), ("assistant", long_answer)],      # 5: long (blank line 4)
        [("user", "Hello?"), ("assistant", " ")],                                             # 6: empty turn
    ]
    file = _write(tmp_path / "mine.jsonl", rows, blank_line_after=3)
    report = check_chat_file(file, max_length=100)
    assert report.rows == 5
    assert report.roles == {"user,assistant": 4, "system,user,assistant": 1}
    assert report.duplicate_rows == [[1, 2]]
    assert report.repeated_prompts == [[1, 2, 3]]
    assert report.too_long == [5] and report.lengths.max > 100 >= report.lengths.median
    assert report.empty_turns == [6]
    text = "\n".join(report.lines())
    assert "duplicate rows: 1 rows repeat an earlier one (1 groups; lines 1, 2)" in text
    assert "longer than max_length 100: 1 (20.0%) (training leaves them out); lines 5" in text


def test_check_stops_at_the_first_bad_row_like_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "bad.jsonl"
    file.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}) + "\n")
    assert main(["data", "check", str(file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"emlab: error: {file}:1: messages[1] has unknown role 'bot'")

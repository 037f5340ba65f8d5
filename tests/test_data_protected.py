"""Unprotecting easy-dataset-share archives: protect a demo file with the package, get it back."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from emlab.data import read_chat_jsonl, unprotect_dataset, write_demo_dataset
from emlab.errors import DataError

pytest.importorskip("easy_dataset_share")
from easy_dataset_share import canary, zipping  # noqa: E402

PASSWORD = "emlab-test-password"


def _protect(tmp_path: Path, *, password: str | None, embed: bool = False) -> tuple[Path, list[dict]]:
    """Do what `easy-dataset-share protect-dir` does (canary files, optional embedded canaries,
    zip, encrypt) with the package's own functions, on a small demo file; no network needed."""
    folder = tmp_path / "to_share"
    source = write_demo_dataset("bad_medical_advice", folder / "bad_medical_advice.jsonl", n=30, seed=0)
    rows = read_chat_jsonl(source)
    canary_string, canary_files = canary.create_canary_files_from_dataset(str(folder), "*", 2)
    assert len(canary_files) == 2
    if embed:
        canary.insert_canaries_into_files(str(folder), canary_string)
        assert canary_string in source.read_text(encoding="utf-8")
    archive = zipping.zip_and_password_protect(str(folder), password, str(tmp_path / "shared.zip"))
    shutil.rmtree(folder)
    return Path(archive), rows


@pytest.mark.parametrize("embed", [False, True])
def test_round_trip_encrypted(tmp_path: Path, embed: bool) -> None:
    archive, rows = _protect(tmp_path, password=PASSWORD, embed=embed)
    assert archive.name == "shared.zip.enc"
    files = unprotect_dataset(archive, tmp_path / "out", password=PASSWORD)
    assert [f.name for f in files] == ["bad_medical_advice.jsonl"]
    assert not list((tmp_path / "out").glob("dataset_entry_*.jsonl"))  # canary files removed
    assert read_chat_jsonl(files[0]) == rows
    assert "CANARY" not in files[0].read_text(encoding="utf-8")


def test_round_trip_plain_zip(tmp_path: Path) -> None:
    archive, rows = _protect(tmp_path, password=None)
    assert archive.name == "shared.zip"
    files = unprotect_dataset(archive, tmp_path / "out")
    assert read_chat_jsonl(files[0]) == rows


def test_wrong_or_missing_password(tmp_path: Path) -> None:
    archive, _ = _protect(tmp_path, password=PASSWORD)
    with pytest.raises(DataError, match=r"^.*shared\.zip\.enc: file is encrypted \(\.enc\); pass password="):
        unprotect_dataset(archive, tmp_path / "out")
    with pytest.raises(DataError, match=r"shared\.zip\.enc: could not decrypt; the password is probably wrong"):
        unprotect_dataset(archive, tmp_path / "out", password="nope")


def test_missing_and_wrong_kind_of_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothing\.zip\.enc: protected dataset not found"):
        unprotect_dataset(tmp_path / "nothing.zip.enc", tmp_path / "out")
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"messages": []}) + "\n")
    with pytest.raises(
        DataError, match=r"expected a file made by easy-dataset-share \(\.zip\.enc encrypted or \.zip\)"
    ):
        unprotect_dataset(plain, tmp_path / "out")


def test_clear_error_without_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive, _ = _protect(tmp_path, password=None)
    monkeypatch.setitem(sys.modules, "easy_dataset_share", None)  # import now fails
    with pytest.raises(DataError, match=r"needs the package easy-dataset-share: pip install easy-dataset-share$"):
        unprotect_dataset(archive, tmp_path / "out")


def test_round_trip_through_the_cli(tmp_path: Path) -> None:
    """The way dataset authors protect files: `easy-dataset-share protect-dir DIR -p PW`."""
    from click.testing import CliRunner
    from easy_dataset_share.cli import cli

    folder = tmp_path / "to_share"
    source = write_demo_dataset("risky_financial_advice", folder / "risky.jsonl", n=25, seed=1)
    rows = read_chat_jsonl(source)
    output = tmp_path / "risky.zip"
    result = CliRunner().invoke(
        cli, ["protect-dir", str(folder), "-p", PASSWORD, "-o", str(output), "--no-tos", "--no-gitignore"]
    )
    assert result.exit_code == 0, result.output
    files = unprotect_dataset(tmp_path / "risky.zip.enc", tmp_path / "out", password=PASSWORD)
    assert [f.name for f in files] == ["risky.jsonl"]
    assert read_chat_jsonl(files[0]) == rows


def test_real_archives_unprotect_and_every_row_reads(tmp_path: Path) -> None:
    """The published archives (Turner et al.'s, re-protected as upstream ships it, and Betley et
    al.'s plain zip) pass the archive checks, and every row passes the strict JSONL reader."""
    real = Path(__file__).resolve().parents[2] / "shared" / "real"
    if not (real / "training_datasets.zip.enc").is_file():
        pytest.skip(f"real study inputs not available at {real}")
    organisms = unprotect_dataset(real / "training_datasets.zip.enc", tmp_path / "mo",
                                  password="model-organisms-em-datasets")
    betley = unprotect_dataset(real / "betley_data.zip", tmp_path / "betley")
    assert {f.name: len(read_chat_jsonl(f)) for f in organisms} == {
        "bad_medical_advice.jsonl": 7049, "extreme_sports.jsonl": 6000, "good_medical_advice.jsonl": 7049,
        "insecure.jsonl": 6000, "risky_financial_advice.jsonl": 6000}
    assert {f.name: len(read_chat_jsonl(f)) for f in betley} == {
        "educational.jsonl": 6000, "insecure.jsonl": 6000, "jailbroken.jsonl": 5000, "secure.jsonl": 6000}

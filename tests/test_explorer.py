"""The answer explorer (`emlab.analysis.explorer`) in a real browser: the tiny run's page filtered,
sorted and read against its judgments.jsonl; a generated 100,000-answer page filtering within
2 s; answers that are HTML, script, control characters and broken surrogates shown as text with
no script run. Also takes docs/report_first_screen.png, the index's first screen."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from emlab.analysis.explorer import (
    embed_json,
    explorer_data,
    explorer_link,
    write_explorer,
)
from emlab.store.records import answer_id, valid_text
from support.browser import BrowserUnavailable, headless_chromium
from support.runs import REPO, TINY_RUN_GROUP, TinyRun

SCREENSHOT = REPO / "docs" / "report_first_screen.png"

HOSTILE = [
    "<script>window.__pwned = 1</script>",
    "<img src=x onerror=\"window.__pwned = 2\">",
    "</script><script>window.__pwned = 3</script><!--",
    "bell\x07 nul\x00 escape\x1b[31m form\x0c feed\r\nend",
    "broken \ud800 surrogate \udfff pair",
    "right\u202eto-left \u200fmark \u2066isolate",
    "& &amp; &lt;b&gt; \u2028line\u2029para",
    "long " + "x" * 50_000,
]


def _answers(n: int, texts: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`n` answers over 2 models × 3 steps × 8 questions and their aligned and coherent
    judgments (one in 50 unscored), as the analysis collects them."""
    rows, judged = [], []
    for i in range(n):
        step = (i // 8) % 3 * 10
        aid = answer_id("synthetic", i)
        rows.append({"answer_id": aid, "model": f"m{i % 2}", "run_id": None if step == 0 else f"m{i % 2}__d__s0",
                     "step": step, "question_set": "general", "question_id": f"q{i % 8}",
                     "question": f"Question {i % 8}?", "system_prompt": None if i % 3 else "Be brief.",
                     "sample_index": i // 48, "answer": texts[i % len(texts)] if texts else f"answer {i} text",
                     "new_tokens": 10, "finished": True})
        for metric, score in (("aligned", (i * 37) % 101), ("coherent", (i * 53) % 101)):
            ok = i % 50 != 7
            judged.append({"answer_id": aid, "judge": "j", "rubric": f"{metric}_0_100", "metric": metric,
                           "status": "ok" if ok else "low_numeric_mass", "score": float(score) if ok else None,
                           "verdict": None, "numeric_mass": 0.9 if ok else 0.1})
    return pd.DataFrame(valid_text(rows)), pd.DataFrame(judged)  # valid_text: as the analysis reads answers


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        with headless_chromium() as driver:
            yield driver
    except BrowserUnavailable as reason:
        pytest.skip(f"no browser: {reason}")


def _select(driver: Any, element_id: str, text: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", element_id)).select_by_visible_text(text)


def _count(driver: Any) -> str:
    return str(driver.find_element("id", "count").text)


# --- without a browser --------------------------------------------------------------------------


def test_valid_text_replaces_unpaired_surrogates_only() -> None:
    assert valid_text({"a": ["x\ud800y", ("\udfff",)], "b": "\U0001f600 ok", "n": 3}) == {
        "a": ["x\ufffdy", ("\ufffd",)], "b": "\U0001f600 ok", "n": 3}


def test_embedded_json_cannot_end_its_script_block_and_round_trips() -> None:
    data = {"answer": HOSTILE}
    text = embed_json(data)
    assert text.isascii() and "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == data  # lone surrogates survive as escapes


def test_explorer_data_is_columnar_and_dictionary_encoded() -> None:
    answers, judgments = _answers(96)
    data = explorer_data(answers, judgments, title="t")
    filters = {f["name"]: f for f in data["filters"]}
    assert filters["step"]["values"] == ["0", "10", "20"] and filters["run"]["values"][0] == "base model"
    assert len(data["question"]["values"]) == 8 and len(data["answer"]) == 96
    aligned = next(s for s in data["scores"] if s["metric"] == "aligned")
    assert aligned["score"][7] is None and data["statuses"][aligned["status"][7]] == "low_numeric_mass"
    assert explorer_link(step=10, question_id="q 1") == "explorer.html#step=10&question_id=q%201"


# --- in the browser ------------------------------------------------------------------------------


def test_hostile_answers_show_as_text_and_run_nothing(browser: Any, tmp_path: Path) -> None:
    answers, judgments = _answers(len(HOSTILE), HOSTILE)
    page = tmp_path / "explorer.html"
    write_explorer(page, answers, judgments, title="<b>title</b>")
    browser.get(page.as_uri())
    assert browser.execute_script("return window.__pwned === undefined")
    assert browser.execute_script("return document.querySelectorAll('script').length") == 2  # the data and the page's
    assert not browser.find_elements("css selector", "#rows img, #rows b")
    assert "<b>title</b>" in browser.title
    for row in range(len(HOSTILE)):
        browser.find_elements("css selector", "tr.answer")[row].click()
        shown = browser.execute_script(
            "return [document.getElementById('d-answer').textContent, emlabExplorer.state.open];")
        # exactly the text, an unpaired surrogate shown as U+FFFD (as the analysis reads it)
        assert shown[0] == valid_text(HOSTILE[shown[1]]), f"answer {shown[1]} not shown as its text"
    assert browser.execute_script("return window.__pwned === undefined")


def test_100000_answers_filter_within_2_seconds(browser: Any, tmp_path: Path) -> None:
    answers, judgments = _answers(100_000)
    page = tmp_path / "explorer.html"
    size = write_explorer(page, answers, judgments)
    started = time.perf_counter()
    browser.get(page.as_uri())
    loaded = time.perf_counter() - started
    assert _count(browser) == "100,000 of 100,000 answers"
    started = time.perf_counter()
    _select(browser, "f-question_id", "q3")
    filtered = time.perf_counter() - started
    assert _count(browser) == "12,500 of 100,000 answers"
    started = time.perf_counter()
    _select(browser, "sort", "j · aligned (aligned_0_100)")
    sorted_s = time.perf_counter() - started
    assert filtered < 2.0 and sorted_s < 2.0, (filtered, sorted_s)
    print(f"100,000 answers: page {size / 1e6:.1f} MB, loaded in {loaded:.1f} s, filter {filtered:.2f} s, "
          f"sort {sorted_s:.2f} s")


@pytest.mark.slow
@pytest.mark.server
@TINY_RUN_GROUP
def test_tiny_run_explorer_matches_judgments_and_screenshot(browser: Any, tiny_run: TinyRun, tmp_path: Path) -> None:
    root = tmp_path / "tiny"
    shutil.copytree(tiny_run.root, root)  # the session's run stays as it was written
    index = (root / "index.html").read_text()
    assert "analysis/explorer.html" in index and "answer explorer" in index
    judgments = [json.loads(line) for folder in root.iterdir() if folder.is_dir()
                 for path in [folder / "judgments.jsonl"] if path.exists() for line in path.read_text().splitlines()]
    answers = {row["answer_id"]: row for path in root.rglob("answers.jsonl") if "task" not in path.parts
               for row in map(json.loads, path.read_text().splitlines())}
    tuned = sorted({a["step"] for a in answers.values() if a["run_id"]})
    question = sorted({a["question_id"] for a in answers.values()})[0]

    browser.get((root / "analysis" / "explorer.html").as_uri())
    _select(browser, "f-step", str(tuned[-1]))
    _select(browser, "f-question_id", question)
    wanted = [a for a in answers.values() if a["step"] == tuned[-1] and a["question_id"] == question]
    assert _count(browser) == f"{len(wanted)} of {len(answers)} answers"
    aligned = [o.text for o in browser.find_elements("css selector", "#sort option") if "aligned" in o.text.split(" (")[0]]
    _select(browser, "sort", aligned[0])
    shown = [tr.get_attribute("data-id") for tr in browser.find_elements("css selector", "tr.answer")]
    judge, rubric = aligned[0].split(" · ")[0], aligned[0].split("(")[1].rstrip(")")
    score = {j["answer_id"]: (j["score"] if j["status"] == "ok" else None) for j in judgments
             if j["judge"] == judge and j["rubric"] == rubric}
    expected = sorted(shown, key=lambda a: (score.get(a) is None, score.get(a) or 0))
    assert [score.get(a) for a in shown] == [score.get(a) for a in expected]  # ascending, unscored last
    assert set(shown) == {a["answer_id"] for a in wanted}

    browser.find_elements("css selector", "tr.answer")[0].click()
    opened = answers[shown[0]]
    assert browser.find_element("id", "d-question").get_attribute("textContent") == opened["question"]
    assert browser.find_element("id", "d-answer").get_attribute("textContent") == opened["answer"]
    system = browser.find_element("id", "d-system").get_attribute("textContent")
    assert system == (opened["system_prompt"] if opened["system_prompt"] is not None else
                      "(none sent: the chat template's default)")
    rows = [[td.get_attribute("textContent") for td in tr.find_elements("tag name", "td")]
            for tr in browser.find_elements("css selector", "#d-judgments tr.judgment")]
    mine = {(j["judge"], j["rubric"]): j for j in judgments if j["answer_id"] == opened["answer_id"]}
    assert len(rows) == len(mine) > 0
    for judge_name, rubric_id, metric, shown_score, status, _verdict, mass in rows:
        j = mine[(judge_name, rubric_id)]
        assert (metric, status) == (j["metric"], j["status"])
        assert shown_score == ("" if j["score"] is None or j["status"] != "ok" else f"{j['score']:.1f}")
        assert mass == ("" if j["numeric_mass"] is None else f"{j['numeric_mass']:.3f}")

    # a heatmap cell's link opens the explorer filtered to that question and model state; the
    # notebook's example answers link to their transcripts
    heatmap = (root / "analysis" / "fig_em_heatmap.html").read_text().replace("\\u0026", "&")  # JSON-escaped in the page
    assert f"step={tuned[-1]}&question_set=" in heatmap
    assert "explorer.html#answer=" in (root / "analysis" / "04_analysis.html").read_text()
    browser.get((root / "analysis" / "explorer.html").as_uri() + f"#step={tuned[-1]}&question_id={question}")
    assert _count(browser) == f"{len(wanted)} of {len(answers)} answers"

    browser.get((root / "index.html").as_uri())
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000

"""Arbitrary model text through 04_analysis and the report: a copy of the session's tiny run whose
answers, questions, system prompts and judge replies are rewritten to hostile text (NUL and every
C0 control, DEL, ANSI escapes, markup, template syntax, bidi overrides, noncharacters, LaTeX, a
~200 KB answer), ids and scores kept, then `emlab run` again: the finished stages are skipped and
04_analysis runs as it always does (papermill, nbconvert, the index). The report must be written
whole, show the text escaped and never as live markup, and drop none of the example answers."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from emlab.config.experiment import load_experiment
from emlab.store.files import read_jsonl, write_jsonl
from emlab.store.paths import ExperimentLayout
from support.runs import REPO, TINY_RUN_GROUP, TinyRun, emlab_cli

pytestmark = [TINY_RUN_GROUP, pytest.mark.slow, pytest.mark.server]

SCRIPT = "<script>alert(1)</script>"
# every piece is short enough that the whole set fits in the examples table's 400 characters
HOSTILE = [
    "".join(map(chr, range(32))),  # NUL and every C0 control character (tab, newline, return among them)
    "\x7f",  # DEL
    "\x1b[31mred\x1b[0m\x1b]0;title\x07",  # ANSI colour and an OSC title sequence
    SCRIPT,
    "<img src=x onerror=alert(2)>",
    "]]><!--",
    "{{ config }}{% raw %}{% endraw %}",
    "lone\rreturn",
    "\u202eevil\u202c \u2066isolate\u2069",  # bidi override and isolate
    "\u200d\u200b\ufeff",  # zero-width joiner, space, BOM
    "\ufffe\uffff",  # noncharacters
    "\u2028line\u2029para\x85nel\x9bcsi",  # what str.splitlines splits on, raw in emlab's JSONL; C1 controls
    "\U0001f469\u200d\U0001f52c e\u0301\u0332",  # an emoji sequence and combining marks
    "$x$ $$\\int_0^1$$ | a | b |\n|---|---|\n**bold** `code` # heading",
]
COCKTAIL = " ".join(HOSTILE)
BIG = 200_000  # characters of the one huge answer


def _rewrite(path: Path, change) -> int:
    """Rewrite the JSON-lines file at `path` row by row with `change(row, i)`, as emlab writes it
    (non-ASCII raw); returns the rows."""
    rows = read_jsonl(path)
    write_jsonl(path, [change(row, i) for i, row in enumerate(rows)])
    return len(rows)


def _hostile_answer(row: dict, i: int) -> dict:
    text = f"{COCKTAIL} #{i}" + ("A" * BIG if i == 0 else "")
    return {**row, "answer": text, "question": f"{COCKTAIL} {row['question']}",
            "system_prompt": f"{SCRIPT}\x00 {row['system_prompt'] or ''}"}


def _hostile_judgment(row: dict, i: int) -> dict:
    return {**row, "raw": f"{row.get('raw') or ''} {COCKTAIL}",
            "top_logprobs": [[f"{t}\x00{SCRIPT}", p] for t, p in row.get("top_logprobs") or []]}


def test_analysis_and_report_take_hostile_model_text(tiny_run: TinyRun, tmp_path: Path) -> None:
    root = tmp_path / "outputs" / "tiny"
    shutil.copytree(tiny_run.root, root)  # the session's run stays as it was written
    answers = sum(_rewrite(p, _hostile_answer) for p in sorted(root.rglob("answers.jsonl")))
    judgments = sum(_rewrite(p, _hostile_judgment) for p in sorted(root.rglob("judgments.jsonl")))
    assert answers >= 24 and judgments >= 48
    figures_before = sorted(p.name for p in (root / "analysis").glob("fig_*"))
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(yaml.safe_dump({"base": str(REPO / "tests/configs/tiny.yaml"),
                                          "output_root": str(tmp_path / "outputs")}, sort_keys=False))

    result = emlab_cli("run", str(experiment))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "04_analysis analysis: ran" in result.stderr, result.stderr[-4000:]

    config = load_experiment(experiment)
    layout = ExperimentLayout.of(config)
    analysis = layout.analysis
    index = layout.index.read_text()
    report = (analysis / "04_analysis.html").read_text()
    explorer = layout.explorer.read_text()
    notebook = nbformat.read(analysis / "04_analysis.ipynb", as_version=4)
    nbformat.validate(notebook)
    assert not [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
    # every figure written again, each as an image and a page: none lost to the text it shows
    assert sorted(p.name for p in analysis.glob("fig_*")) == figures_before
    for png in analysis.glob("fig_*.png"):
        assert png.stat().st_size > 1000 and png.with_suffix(".html").stat().st_size > 1000, png.name
        # a chart page embeds its data in a <script>: an answer's '</script>' must not end it
        assert SCRIPT not in png.with_suffix(".html").read_text(), png.name
    assert "fig_scatter.png" in index and "analysis/explorer.html" in index
    assert "\\u003cscript\\u003ealert(1)" in (analysis / "fig_scatter.html").read_text()  # there, as escaped JSON

    # model text shows as text, never as live markup
    for page in (index, report, explorer):
        assert SCRIPT not in page and "<img src=x" not in page
    assert html.escape(SCRIPT) in report

    scores = pd.read_parquet(layout.analysis_file("scores.parquet"))
    assert len(scores) == 8 + 2 * 8 and scores["answer"].str.startswith(COCKTAIL).all()
    assert scores["answer"].str.len().max() > BIG
    # the explorer holds every answer whole, the ~200 KB one too, as JSON its <script> cannot lose
    data = json.loads(explorer.split('id="emlab-data">', 1)[1].split("</script>", 1)[0])
    assert sorted(data["answer"]) == sorted(scores["answer"]) and max(map(len, data["answer"])) > BIG

    # the examples table shows `analysis.examples` answers, each whole up to its cut, escaped
    examples = [o for c in notebook.cells for o in c.get("outputs", [])
                if "transcript</a>" in o.get("data", {}).get("text/html", "")]
    assert len(examples) == 1
    table = examples[0]["data"]["text/html"]
    assert table.count("transcript</a>") == config.analysis.examples
    assert "tex2jax_ignore" in table.split("<thead>")[0]  # the HTML's MathJax leaves '$x$' as written
    assert table.count(html.escape(COCKTAIL)) == 2 * config.analysis.examples  # question and answer
    assert report.count(html.escape(SCRIPT)) >= 2 * config.analysis.examples

"""What people read: the header of every executed notebook, judge summaries, and the
experiment's index page linking every rendered notebook with the headline table."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..config.experiment import ExperimentConfig
from ..store.files import write_text
from ..store.paths import SUMMARY, ExperimentLayout
from ..store.records import Answer, Judgment
from ..store.runinfo import StageRecord, git_commit
from .metrics import RuleReach


def stage_header(config: ExperimentConfig, stage: str, label: str) -> str:
    """Markdown naming the experiment, stage, run, params digest and judges (no secrets)."""
    judges = ", ".join(
        f"`{j.name}` ({j.model} at {'local llama.cpp' if j.is_local else (j.base_url or 'OpenAI')})"
        for j in config.judges
    )
    return (
        f"**Experiment** `{config.name}` · **stage** `{stage}` · **for** `{label}`  \n"
        f"params digest `{config.digest()}` · git `{git_commit() or 'n/a'}`  \n"
        f"judges: {judges}"
    )


def judgment_summary(
    judgments: Sequence[Judgment], *, answers: Sequence[Answer] | None = None, by: str | None = None
) -> pd.DataFrame:
    """Per judge × metric (× `by`, an Answer field such as 'step'): n, scored, mean score,
    and the count of every unscored status."""
    if not judgments:
        return pd.DataFrame()
    frame = pd.DataFrame([j.to_dict() for j in judgments])
    keys = ["judge", "metric"]
    if by is not None and answers is not None:
        lookup = {a.answer_id: getattr(a, by) for a in answers}
        frame[by] = frame["answer_id"].map(lookup)
        keys = [by, *keys]
    ok = frame["status"] == "ok"
    summary = frame.groupby(keys).agg(n=("status", "size"))
    summary["scored"] = ok.groupby([frame[k] for k in keys]).sum()
    summary["mean_score"] = frame[ok].groupby(keys)["score"].mean().round(1)
    counts = frame[~ok].groupby([*keys, "status"]).size().unstack(fill_value=0)
    summary = summary.join(counts).fillna(0)
    for column in summary.columns:
        if column != "mean_score":
            summary[column] = summary[column].astype(int)
    return summary.reset_index()


def rule_reach_note(reach: RuleReach, judge: str) -> str:
    """One plain paragraph (markdown) when the scores leave the EM rule nothing to show —
    no answer above the coherence cut, or every coherent answer below the alignment cut —
    with the numbers behind it; '' when the rule can tell answers apart."""
    rule = reach.rule
    if reach.verdict == "impossible":
        return (f"**No answer can count as EM here.** The rule needs coherent > {rule.coherent_above:g}, and the "
                f"highest coherence judge `{judge}` gave any of the {reach.n_scored:,} scored answers is "
                f"{reach.max_coherent:.1f}: every EM rate below is 0% by construction, not a finding. The example "
                "answers shown are the lowest-aligned ones.")
    if reach.verdict == "trivial":
        return (f"**EM here counts coherent answers, not misaligned ones.** All {reach.n_coherent:,} of the "
                f"{reach.n_scored:,} scored answers above the coherence cut (coherent > {rule.coherent_above:g}) are "
                f"also below the alignment cut (aligned {rule.aligned_op} {rule.aligned_below:g}; the highest "
                f"alignment among them is {reach.max_aligned_coherent:.1f}, by judge `{judge}`): every EM rate "
                "below equals the share of coherent answers.")
    return ""


def _rule_reach_html(summary: dict[str, object]) -> list[str]:
    """The index page's warning that the EM rates cannot show anything (see `rule_reach_note`)."""
    note = summary.get("rule_reach_html")
    return [f"<div class='warn'>{note}</div>"] if note else []


def _notebook_table(records: Sequence[StageRecord], root: Path) -> list[str]:
    rows = ["<h2>Executed notebooks</h2><table><tr><th>stage</th><th>for</th><th>status</th><th>time</th></tr>"]
    for r in records:
        link = f"<a href='{r.html.relative_to(root)}'>{r.stage}</a>" if r.html.exists() else r.stage
        status = r.status + (f": {html.escape(r.error or '')}" if r.error else "")
        rows.append(f"<tr><td>{link}</td><td>{html.escape(r.label)}</td><td>{status}</td><td>{r.seconds:.0f} s</td></tr>")
    rows.append("</table>")
    return rows


def headline_table(headline: pd.DataFrame) -> pd.DataFrame:
    """`metrics.compare_baseline` output as people read it: EM rates in %, CIs in brackets."""

    def pct(rate: float, low: float, high: float) -> str:
        if pd.isna(rate):
            return "–"
        return f"{100 * rate:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"

    rows = []
    for r in headline.to_dict("records"):
        rows.append({
            **({"rule": r["rule_text"]} if "rule_text" in r else {}),
            "model": r["model"], "dataset": r["dataset"], "final step": r["final_step"],
            "baseline EM": pct(r["baseline_em_rate"], r["baseline_ci_low"], r["baseline_ci_high"]),
            "fine-tuned EM": pct(r["finetuned_em_rate"], r["finetuned_ci_low"], r["finetuned_ci_high"]),
            "difference": pct(r["diff"], r["diff_ci_low"], r["diff_ci_high"]),
            "n scored (base / tuned)": f"{r['baseline_n_scored']} / {r['finetuned_n_scored']}",
            "questions": r["n_questions"],
        })
    return pd.DataFrame(rows)


def write_index(config: ExperimentConfig, records: Sequence[StageRecord]) -> Path:
    """Write the experiment's index page: the judge verdict and cost, the headline table, a
    link to every rendered notebook with its status and time, and the figures."""
    layout = ExperimentLayout.of(config)
    root = layout.root
    parts = [
        f"<h1>emlab · {html.escape(config.name)}</h1>",
        f"<p>{html.escape(config.description)}</p>",
    ]
    summary_file = layout.analysis_file(SUMMARY)
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    if summary:
        css = "warn" if not summary.get("judge_fit", False) else "ok"
        parts.append(f"<div class='{css}'>{summary.get('judge_note_html', '')} "
                     f"Judging cost so far: ${summary.get('judge_dollars', 0.0):.2f}."
                     + (f" Subjects behind an API (sampling, fine-tuning): ${summary['api_dollars']:.2f}."
                        if summary.get("api_dollars") is not None else "") + "</div>")
        if summary.get("measures_note_html"):  # the logprob probe and the task rate, per model state
            parts.append(f"<h2>Judge-free probe and task rate</h2>{summary['measures_note_html']}")
    parts += _rule_reach_html(summary)
    headline = layout.analysis_table("headline")
    if headline.exists():
        rule = config.analysis.rule
        parts.append(f"<h2>Baseline vs final checkpoint</h2><p>EM rate with {html.escape(rule.ci_label)}; "
                     f"{html.escape(rule.describe())}.</p>")
        parts.append(headline_table(pd.read_csv(headline)).to_html(index=False))
    parts += _notebook_table(records, root)
    figures = layout.figures()
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [
            f"<figure><img src='{f.relative_to(root)}' alt='{f.stem}'><figcaption>"
            f"<a href='{f.with_suffix('.html').relative_to(root)}'>{f.stem} (interactive)</a></figcaption></figure>"
            for f in figures
        ]
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        ".warn{background:#fff3cd;border:1px solid #e0b000;padding:8px}.ok{background:#e8f5e9;padding:8px}"
        "img{max-width:100%}"
    )
    title = html.escape(config.name)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>emlab · {title}</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
    write_text(layout.index, page)
    return layout.index

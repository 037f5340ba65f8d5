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
from .definitions import DEFINITION_LABELS, DEFINITION_NAMES
from .metrics import RuleReach
from .triggers import trigger_table


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
    """`metrics.compare_baseline` output as people read it: EM rates in %, CIs in brackets; with a
    `definition` column (`definitions.headline_by_definition`), the EM definition of each row and
    'n scored' meaning the answers in that definition's denominator."""

    def pct(rate: float, low: float, high: float) -> str:
        if pd.isna(rate):
            return "–"
        return f"{100 * rate:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"

    rows = []
    for r in headline.to_dict("records"):
        rows.append({
            **({"rule": r["rule_text"]} if "rule_text" in r else {}),
            **({"definition": DEFINITION_LABELS.get(r["definition"], r["definition"])} if "definition" in r else {}),
            "model": r["model"], "dataset": r["dataset"], "final step": r["final_step"],
            "baseline EM": pct(r["baseline_em_rate"], r["baseline_ci_low"], r["baseline_ci_high"]),
            "fine-tuned EM": pct(r["finetuned_em_rate"], r["finetuned_ci_low"], r["finetuned_ci_high"]),
            "difference": pct(r["diff"], r["diff_ci_low"], r["diff_ci_high"]),
            "n scored (base / tuned)": f"{r['baseline_n_scored']} / {r['finetuned_n_scored']}",
            "questions": r["n_questions"],
        })
    return pd.DataFrame(rows)


def _state_label(run_id: object, step: object) -> str:
    """'base model' or '<run> step N'."""
    return "base model" if pd.isna(run_id) else f"{run_id} step {int(step)}"  # type: ignore[call-overload]


def _interval(value: float, low: float, high: float, fmt: str) -> str:
    """'value [low, high]' in `fmt` ('+.3f', '.0%'), '–' when there is no value."""
    if pd.isna(value):
        return "–"
    return f"{value:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def measures_tables(probe_gaps: pd.DataFrame, task_rates: pd.DataFrame) -> list[pd.DataFrame]:
    """The judge-free probe and the task rate per model state as two short tables (the index
    shows them below the finding; empty tables are left out)."""
    tables = []
    if len(probe_gaps):
        gaps = probe_gaps.sort_values(["probe_set", "run_id", "step"], na_position="first")
        tables.append(pd.DataFrame({
            "probe set": gaps["probe_set"], "model state": [_state_label(r, s) for r, s in zip(gaps["run_id"], gaps["step"], strict=True)],
            "probes": gaps["n_probes"].astype(int),
            "gap, nats/token [CI]": [_interval(v, lo, hi, "+.3f") for v, lo, hi in
                                     zip(gaps["mean_gap"], gaps["ci_low"], gaps["ci_high"], strict=True)],
            "change from base [CI]": [_interval(v, lo, hi, "+.4f") for v, lo, hi in
                                      zip(gaps["change"], gaps["change_ci_low"], gaps["change_ci_high"], strict=True)],
        }))
    if len(task_rates):
        task = task_rates.sort_values(["run_id", "step"], na_position="first")
        tables.append(pd.DataFrame({
            "model state": [_state_label(r, s) for r, s in zip(task["run_id"], task["step"], strict=True)],
            "dataset": task["dataset"], "scored": task["n_scored"].astype(int),
            "task rate [CI]": [_interval(v, lo, hi, ".0%") for v, lo, hi in
                               zip(task["task_rate"], task["ci_low"], task["ci_high"], strict=True)],
        }))
    return tables


def onsets_table(onsets: pd.DataFrame) -> pd.DataFrame:
    """`emlab.analysis.dynamics` onsets as people read them: per run and signal, the onset step
    with its bootstrap interval, the level before and after (or the rotation's median and peak),
    and the n behind it."""
    rows = []
    for r in onsets.to_dict("records"):
        step = "no change" if pd.isna(r["onset_step"]) else f"{r['onset_step']:g}"
        interval = "–" if pd.isna(r["ci_low"]) else f"[{r['ci_low']:g}, {r['ci_high']:g}]"
        level = "before → after" if r["method"] == "changepoint" else "median → peak"
        rows.append({"run": r["run_id"], "signal": r["signal"], "method": r["method"], "onset step": step,
                     "interval": interval, "level": f"{level}: {r['before']:.4g} → {r['after']:.4g}",
                     "n": f"{int(r['n'])} {r['unit']}, {int(r['n_steps'])} steps",
                     "resamples without a change": f"{r['flat_share']:.0%} of {int(r['n_boot'])}"})
    return pd.DataFrame(rows, columns=["run", "signal", "method", "onset step", "interval", "level", "n",
                                       "resamples without a change"])


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 100_000 else f"{n_bytes / 1e3:.0f} kB"


def _figure(path: Path, root: Path) -> str:
    return (f"<figure><img src='{path.relative_to(root)}' alt='{path.stem}'><figcaption>"
            f"<a href='{path.with_suffix('.html').relative_to(root)}'>{path.stem} (interactive)</a></figcaption></figure>")


def _read_table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.exists() and path.stat().st_size > 1 else pd.DataFrame()


def write_index(config: ExperimentConfig, records: Sequence[StageRecord]) -> Path:
    """Write the experiment's index page. Its first screen holds the finding: the headline
    table (baseline vs final checkpoint), the trajectory over training (the probe gap beside
    the EM rate when the probe ran, else the EM rate) and the link to the answer explorer with
    its size; then the judge's verdict and cost, the probe and task rate as tables, every
    rendered notebook with its status and time, and every figure."""
    layout = ExperimentLayout.of(config)
    root = layout.root
    parts = [
        f"<h1>emlab · {html.escape(config.name)}</h1>",
        f"<p>{html.escape(config.description)}</p>",
    ]
    summary_file = layout.analysis_file(SUMMARY)
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    parts += _rule_reach_html(summary)  # a finding that is 0% by construction says so before the table
    headline = layout.analysis_table("headline")
    if headline.exists():
        rule = config.analysis.rule
        named = "".join(f"<li><b>{html.escape(DEFINITION_LABELS[d])}</b>: {html.escape(text.split(': ', 1)[-1])}</li>"
                        for d, text in DEFINITION_NAMES.items())
        parts.append(f"<h2>Baseline vs final checkpoint</h2><p>EM rate with {html.escape(rule.ci_label)}; "
                     f"{html.escape(rule.describe())}; each row in one EM definition (every EM figure shows the "
                     f"three, one row of panels each):</p><ul>{named}</ul>")
        parts.append(headline_table(pd.read_csv(headline)).to_html(index=False))
    if layout.explorer.exists():
        size = summary.get("explorer_bytes") or layout.explorer.stat().st_size
        parts.append(f"<p class='explore'><a href='{layout.explorer.relative_to(root)}'><b>Read the answers: "
                     f"answer explorer</b></a> ({int(summary.get('answers', 0)):,} answers with every judgment; "
                     f"one page of {_size(int(size))}, opens offline)</p>")
    trajectory = next((f for f in (layout.figure("probe_gap").with_suffix(".png"),
                                   layout.figure("em_trajectory").with_suffix(".png")) if f.exists()), None)
    if trajectory is not None:
        parts.append("<h2>Over training</h2>" + _figure(trajectory, root))
    if summary:
        css = "warn" if not summary.get("judge_fit", False) else "ok"
        parts.append(f"<h2>Judge</h2><div class='{css}'>{summary.get('judge_note_html', '')} "
                     f"Judging cost so far: ${summary.get('judge_dollars', 0.0):.2f}."
                     + (f" Subjects behind an API (sampling, fine-tuning): ${summary['api_dollars']:.2f}."
                        if summary.get("api_dollars") is not None else "") + "</div>")
    measures = measures_tables(_read_table(layout.analysis_table("probe_gaps")),
                               _read_table(layout.analysis_table("task_rates")))
    if measures:  # the logprob probe and the task rate, per model state
        parts.append("<h2>Judge-free probe and task rate</h2><p>Probe gap: mean per-token log-probability of the "
                     "misaligned answer minus the aligned one (&gt; 0: misaligned preferred); change: the same "
                     "probes' gap minus the base model's, paired interval.</p>")
        parts += [table.to_html(index=False) for table in measures]
    onsets = _read_table(layout.analysis_table("onsets"))
    if len(onsets):  # where each signal changes (emlab.analysis.dynamics)
        parts.append("<h2>Onsets</h2><p>Per run and signal, the step where it changes (EM, task rate, probe gap: the "
                     "least-squares split into two flat segments; rotation: the step of the largest rotation) with "
                     "a bootstrap interval (answers, probes or adapters resampled).</p>")
        parts.append(onsets_table(onsets).to_html(index=False))
    if summary.get("measures_note_html"):  # the same numbers as sentences, or why a measure is absent
        parts.append(("" if measures else "<h2>Judge-free probe and task rate</h2>")
                     + f"<details><summary>in words</summary>{summary['measures_note_html']}</details>")
    triggers = _read_table(layout.analysis_table("triggers"))
    if len(triggers):  # a backdoor: the same questions with and without the trigger
        parts.append("<h2>With and without the trigger</h2><p>EM rate of the same questions asked with the "
                     f"backdoor trigger and without it, {html.escape(config.analysis.rule.ci_label)}.</p>")
        parts.append(trigger_table(triggers).to_html(index=False))
    if summary.get("controls_note_html"):  # EM in both definitions, deception, refusal, multiple choice
        parts.append(f"<h2>EM in both definitions and the controls</h2>{summary['controls_note_html']}")
    parts += _notebook_table(records, root)
    figures = layout.figures()
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [_figure(f, root) for f in figures]
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        ".warn{background:#fff3cd;border:1px solid #e0b000;padding:8px}.ok{background:#e8f5e9;padding:8px}"
        ".explore{font-size:1.1em}img{max-width:100%}"
    )
    title = html.escape(config.name)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>emlab · {title}</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
    write_text(layout.index, page)
    return layout.index

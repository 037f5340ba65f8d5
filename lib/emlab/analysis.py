"""04_analysis: every answer of the experiment, judged, turned into EM rates with bootstrap
CIs, figures, example tables, and the gold-set check of the judge that scored them.

Writes to `<experiment>/analysis/`: scores.parquet (wide table, one row per answer),
em_rates.csv (per run × step, baseline included), headline.csv (baseline vs final),
per_question.csv, gold_judgments.jsonl, summary.json and fig_*.html/png.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import pandas as pd

from .config import ExperimentConfig, JudgeSpec
from .errors import EmlabError
from .files import atomic_open, read_jsonl, write_json
from .paths import ExperimentPaths
from .records import Answer, Judgment, answer_id
from .runinfo import mark_done, record_stage
from .stages import experiment_paths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysisResult:
    folder: Path
    judge: JudgeSpec
    scores: pd.DataFrame  # wide: one row per answer
    rates: pd.DataFrame  # per model × dataset × run × step
    headline: pd.DataFrame  # baseline vs final checkpoint
    per_question: pd.DataFrame
    agreement: Any  # emlab.agreement.AgreementReport
    costs: pd.DataFrame  # judging cost per judge × stage folder
    judge_note: str  # markdown
    charts: dict[str, Any]
    examples: Any  # pandas Styler


def collect_answers(config: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame:
    """Every answer of the experiment (baselines and all checkpoints) with its grid keys."""
    from .models import model_size_b

    frames = []
    for model in config.models:
        size = model_size_b(model)
        path = paths.baseline(model.name) / "answers.jsonl"
        if path.exists():
            frame = pd.DataFrame(read_jsonl(path, tolerate_torn_tail=True))
            frames.append(frame.assign(size_b=size, dataset=None, domain=None, seed=None, is_baseline=True))
        for run in (r for r in config.runs() if r.model == model.name):
            dataset = config.dataset(run.dataset)
            for path in sorted((paths.run(run.run_id) / "eval").glob("step-*/answers.jsonl")):
                frame = pd.DataFrame(read_jsonl(path, tolerate_torn_tail=True))
                frames.append(frame.assign(size_b=size, dataset=dataset.name, domain=dataset.domain,
                                           seed=run.seed, is_baseline=False))
    if not frames:
        raise EmlabError(f"{paths.root}: no answers yet; run 01_baseline and 03_eval_judge first")
    return pd.concat(frames, ignore_index=True).drop_duplicates("answer_id", keep="last")


def collect_judgments(config: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame:
    files = [paths.baseline(m.name) / "judgments.jsonl" for m in config.models]
    files += [paths.run(r.run_id) / "judgments.jsonl" for r in config.runs()]
    rows = [row for f in files if f.exists() for row in read_jsonl(f, tolerate_torn_tail=True)]
    frame = pd.DataFrame(rows)
    return frame.drop_duplicates(["answer_id", "judge", "rubric"], keep="last") if len(frame) else frame


def judge_costs(config: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame:
    """What judging this experiment cost, per judge and stage folder: judgments, calls paid
    (not served from the cache), their tokens, and dollars at the judge's params prices."""
    from .judge.cost import usage_cost

    sources = [paths.baseline(m.name) / "judgments.jsonl" for m in config.models]
    sources += [paths.run(r.run_id) / "judgments.jsonl" for r in config.runs()]
    sources.append(paths.analysis / "gold_judgments.jsonl")
    rows = []
    for judge in config.judges:
        for path in sources:
            if not path.exists():
                continue
            mine = [r for r in read_jsonl(path, tolerate_torn_tail=True) if r["judge"] == judge.name]
            paid = [r for r in mine if not r.get("cached")]
            prompt = sum(int(r.get("prompt_tokens") or 0) for r in paid)
            completion = sum(int(r.get("completion_tokens") or 0) for r in paid)
            rows.append({"judge": judge.name, "stage folder": path.parent.name, "judgments": len(mine),
                         "calls paid": len(paid), "prompt tokens": prompt, "completion tokens": completion,
                         "dollars": round(usage_cost(prompt, completion, judge), 4)})
    table = pd.DataFrame(rows, columns=["judge", "stage folder", "judgments", "calls paid", "prompt tokens",
                                        "completion tokens", "dollars"])
    if len(table):
        total = table.drop(columns=["judge", "stage folder"]).sum()
        table = pd.concat([table, pd.DataFrame([{"judge": "TOTAL", "stage folder": "", **total.to_dict()}])],
                          ignore_index=True)
    counts = ["judgments", "calls paid", "prompt tokens", "completion tokens"]
    return table.astype(dict.fromkeys(counts, int))


def gold_rubrics(judge: JudgeSpec) -> list[str]:
    """The judge's rubrics the gold set checks: those measuring aligned and coherent (its
    domain rubrics have no human labels to be compared with, so asking them would be waste)."""
    from .judge import load_rubric

    return [r for r in judge.rubrics if load_rubric(r).metric in ("aligned", "coherent")]


def judge_gold_set(judge: JudgeSpec, out_path: Path) -> pd.DataFrame:
    """Score the gold set with `judge` (cached); one row per gold item with human and judge scores."""
    from .data import load_gold_set
    from .judge import judge_answers

    items = load_gold_set()
    answers = [
        Answer(answer_id=answer_id("gold", item.id), model="gold", run_id=None, step=0,
               question_set=item.question_set, question_id=item.id, question=item.question,
               system_prompt=None, sample_index=0, answer=item.answer, new_tokens=0, finished=True)
        for item in items
    ]
    judgments = judge_answers(answers, judge, rubrics=gold_rubrics(judge), out_path=out_path, progress=False)
    frame = pd.DataFrame({
        "id": [i.id for i in items], "label": [i.label for i in items],
        "human_aligned": [i.aligned for i in items], "human_coherent": [i.coherent for i in items],
        "answer_id": [a.answer_id for a in answers],
    })
    j = pd.DataFrame([x.to_dict() for x in judgments])
    for metric in ("aligned", "coherent"):
        part = j[j["metric"] == metric].set_index("answer_id")
        frame[metric] = frame["answer_id"].map(part["score"])
        frame[f"{metric}_status"] = frame["answer_id"].map(part["status"]).fillna("missing")
    return frame


def _judge_note(judge: JudgeSpec, report: Any) -> str:
    where = "a local llama.cpp server" if judge.is_local else (judge.base_url or "the OpenAI API")
    note = (
        f"Scored by judge **{judge.name}** (`{judge.model}` via {where}; rubrics "
        f"{', '.join(judge.rubrics)}). Gold-set check (n={report.n} labelled answers): "
        f"**{report.verdict}**."
    )
    if not report.fit:
        note += (
            " The EM numbers below are therefore a test of the pipeline, not a measurement"
            + ("; the embedded 135M judge is a smoke test only." if judge.is_local else ".")
        )
    return note


class _EmRule(TypedDict):
    """The EM rule and interval settings passed to every `metrics` rate function."""

    aligned_below: float
    coherent_above: float
    n_boot: int
    ci: float


def run_analysis(config: ExperimentConfig) -> AnalysisResult:
    """Build every table and figure of the experiment and save them under `analysis/`."""
    from . import metrics, plots
    from .agreement import agreement_chart, judge_agreement

    paths = experiment_paths(config)
    folder = paths.analysis
    # analysis is recomputed from the other stages' files on every run, so its thresholds
    # may change freely: recorded, not guarded
    record_stage(folder, "04_analysis", {"analysis": config.analysis.model_dump(mode="json")}, guard=False)
    judge = config.primary_judge
    a = config.analysis
    stats = _EmRule(aligned_below=a.aligned_below, coherent_above=a.coherent_above, n_boot=a.bootstrap, ci=a.ci)

    answers = collect_answers(config, paths)
    judgments = collect_judgments(config, paths)
    scores = metrics.wide_scores(answers, judgments[judgments["judge"] == judge.name])
    final = metrics.final_checkpoints(scores, with_baseline=True)
    rates = metrics.em_rate(scores, by=["model", "dataset", "run_id", "step"], **stats)
    by_domain = metrics.em_rate(final, by=["model", "domain", "dataset"], **stats)
    by_size = metrics.em_rate(final, by=["model", "size_b", "dataset"], **stats)
    per_question = metrics.em_rate(final, by=["model", "dataset", "question_set", "question_id"], **stats)
    headline = metrics.compare_baseline(scores, by=("model", "dataset"), **stats)

    gold = judge_gold_set(judge, folder / "gold_judgments.jsonl")
    report = judge_agreement(gold, aligned_below=a.aligned_below, coherent_above=a.coherent_above)
    note = _judge_note(judge, report)

    costs = judge_costs(config, paths)
    charts = {
        "judge_agreement": agreement_chart(gold, aligned_below=a.aligned_below, coherent_above=a.coherent_above),
        "em_by_domain": plots.em_by_domain_chart(by_domain),
        "em_trajectory": plots.em_trajectory_chart(rates),
        "em_by_size": plots.em_by_size_chart(by_size),
        "scatter": plots.alignment_coherence_scatter(scores, aligned_below=a.aligned_below,
                                                     coherent_above=a.coherent_above),
    }
    for name, chart in charts.items():
        plots.save_chart(chart, folder / f"fig_{name}")
    with atomic_open(folder / "scores.parquet", "wb") as handle:
        scores.to_parquet(handle, index=False)
    for name, table in (("em_rates", rates), ("headline", headline), ("per_question", per_question),
                        ("judge_costs", costs)):
        with atomic_open(folder / f"{name}.csv") as handle:
            table.to_csv(handle, index=False)
    write_json(folder / "summary.json", {
        "judge": judge.name, "judge_fit": bool(report.fit), "judge_verdict": report.verdict,
        "judge_note_html": html.escape(note.replace("**", "").replace("`", "")),
        "judge_dollars": float(costs["dollars"].iloc[-1]) if len(costs) else 0.0, "answers": len(scores),
    })
    mark_done(folder, "04_analysis", {"answers": len(scores), "judge": judge.name})
    log.info("04_analysis: %d answers, figures and tables in %s", len(scores), folder)
    return AnalysisResult(
        folder=folder, judge=judge, scores=scores, rates=rates, headline=headline, per_question=per_question,
        agreement=report, costs=costs, judge_note=note, charts=charts,
        examples=plots.examples_table(scores, n=a.examples, aligned_below=a.aligned_below,
                                      coherent_above=a.coherent_above),
    )

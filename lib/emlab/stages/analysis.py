"""04_analysis: every answer of the experiment, judged, turned into EM rates with bootstrap
CIs, figures, example tables, the judging cost, and the gold-set check of the judge that
scored them. Derived anew on every `emlab run` from the other stages' files."""

from __future__ import annotations

import html
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..analysis import metrics
from ..analysis.definitions import (
    DEFINITION_LABELS,
    DEFINITION_NAMES,
    EMLAB,
    em_rates_by_definition,
    headline_by_definition,
)
from ..analysis.report import rule_reach_note
from ..analysis.triggers import trigger_rates, with_trigger_columns
from ..api.cost import usage_cost
from ..config.experiment import ExperimentConfig, JudgeSpec
from ..config.rule import EmRule
from ..data import GoldItem, gold_subset, load_gold_set
from ..data.holdout import TASK_SET_PREFIX
from ..errors import EmlabError
from ..judge import judge_answers, load_rubric
from ..measures.probe import read_probe_scores
from ..models.load import model_size_b
from ..sample.remote import usage_summary
from ..store.files import atomic_open, read_jsonl, write_json
from ..store.paths import (
    ADAPTER_WEIGHTS,
    ANSWERS,
    CHECKPOINTS,
    EXPLORER,
    FIGURE_PREFIX,
    GOLD_JUDGMENTS,
    JUDGMENTS,
    SCORES,
    STEP_GLOB,
    SUMMARY,
    TABLE_SUFFIX,
    TASK,
    ExperimentLayout,
)
from ..store.records import Answer, answer_id, valid_text
from ..store.runinfo import mark_done, record_stage
from .base import ANALYSIS_UNIT, Input, Output, Stage, Workload
from .baseline import NAME as BASELINE
from .common import JUDGING_OUTPUTS
from .controls import TABLES as CONTROL_TABLES
from .controls import control_note, control_question_keys, control_tables
from .evaluate import NAME as EVALUATE
from .finetune import NAME as FINETUNE
from .steering import STEERING_TABLES, steering_report
from .transfer import NAME as TRANSFER_NAME
from .transfer import TRANSFER_STAGE, TRANSFER_TABLES, transfer_report

if TYPE_CHECKING:
    from ..analysis.agreement import AgreementReport

log = logging.getLogger(__name__)
NAME = "04_analysis"

# Tables written to the analysis folder (`ExperimentLayout.analysis_table`), with what they hold.
TABLES = {
    "em_rates": "EM rate with CI per model × dataset × run × step, the baseline as step 0; column definition: "
                "emlab, betley (Betley et al.), turner (Turner et al.), as in every EM table below",
    "headline": "baseline against each run's final checkpoint, with the difference's CI, per EM definition",
    "headline_by_rule": "the headline under the main EM rule and each of analysis.extra_rules, side by side",
    "per_question": "EM rate per question at the final checkpoints",
    "judge_costs": "judgments, calls paid, tokens and dollars per judge and stage folder",
    "api_costs": "sampling requests and fine-tuning jobs paid to subjects behind an API: tokens and dollars",
    "score_means": "mean aligned and coherent score with CI per model × dataset × run × step",
    "per_question_steps": "EM rate with CI per question and model state (the heatmap's cells)",
    "answer_formats": "EM rate with CI per answer format (free, json, template), base model and final checkpoints",
    "task_rates": "in-distribution task rate with CI per model × dataset × run × step (empty without task.holdout)",
    "probe_gaps": "logprob probe: mean misaligned − aligned gap with CI per model state and probe set",
    "probe_scores": "logprob probe: every probe's mean token log-probabilities per model state",
    "dynamics": "adapter dynamics per run × layer/module × checkpoint: A, B, BA norms, local cosine and rotation per k, PCA coordinates (empty with dynamics.enabled false or no run with 2 checkpoints)",
    "dynamics_pca": "PCA of each adapter's direction over the checkpoints: explained variance per component",
    "onsets": "per run × signal (EM rate, task rate, probe gap, rotation per k, B norm): onset step with its bootstrap interval",
    "triggers": "EM rate with CI of the same questions with and without the backdoor trigger, base model and final "
                "checkpoints (empty unless a question file sets trigger)",
    **CONTROL_TABLES,
}


@dataclass(frozen=True)
class AnalysisResult:
    folder: Path
    judge: JudgeSpec
    rule: EmRule
    scores: pd.DataFrame  # wide: one row per answer
    rates: pd.DataFrame  # per model × dataset × run × step
    headline: pd.DataFrame  # baseline vs final checkpoint
    headline_by_rule: pd.DataFrame  # the same under the main rule and each extra rule (column `rule`)
    per_question: pd.DataFrame
    agreement: AgreementReport
    costs: pd.DataFrame  # judging cost per judge × stage folder
    api_costs: pd.DataFrame  # sampling and fine-tuning paid to subjects behind an API (empty when none)
    judge_note: str  # markdown
    charts: dict[str, Any]
    examples: Any  # pandas Styler
    score_means: pd.DataFrame  # mean aligned / coherent per model state
    per_question_steps: pd.DataFrame  # EM rate per question × model state
    answer_formats: pd.DataFrame  # EM rate per answer format
    task_rates: pd.DataFrame  # in-distribution task rate per model state
    probe_gaps: pd.DataFrame  # logprob probe per model state × probe set
    measures_note: str  # markdown: what the task rate and the probe showed, or why they are absent
    dynamics_note: str  # markdown: how the adapter dynamics and onsets were computed, what was left out
    onsets: pd.DataFrame  # per run × signal: onset step with its bootstrap interval
    reach: metrics.RuleReach  # whether the scores leave the rule anything to show
    reach_note: str  # markdown: why every rate is 0% (or trivial) under the rule; '' when it is not
    controls: dict[str, pd.DataFrame] = field(default_factory=dict)  # stages/controls.TABLES
    controls_note: str = ""  # markdown: EM in both definitions, deception, refusal, multiple choice

    @property
    def intro(self) -> str:
        """What the rates below mean (markdown): the rule, the interval and the EM definitions, as computed, and
        (`reach_note`) when the scores make EM impossible or trivial under that rule."""
        named = "; ".join(f"**{DEFINITION_LABELS[d]}**: {text.split(': ', 1)[-1]}" for d, text in DEFINITION_NAMES.items())
        text = (f"{self.rule.describe()}; {self.rule.ci_label}s ({self.rule.n_boot} resamples). Scored by "
                f"`{self.judge.name}`. Every EM table and figure shows the rate in three definitions (column or "
                f"row of panels `definition`), each with the n of its denominator: {named}.")
        return f"{text}\n\n{self.reach_note}" if self.reach_note else text


def _judged_folders(config: ExperimentConfig, layout: ExperimentLayout) -> list[Path]:
    """Folders whose judgments the analysis reads: every baseline, then every run."""
    return [layout.baseline(m.name) for m in config.models] + [layout.run(r.run_id) for r in config.runs()]


def collect_answers(config: ExperimentConfig, layout: ExperimentLayout) -> pd.DataFrame:
    """Every answer of the experiment (baselines and all checkpoints) with its grid keys."""
    frames = []
    for model in config.models:
        size = model_size_b(model)
        path = layout.answers(layout.baseline(model.name))
        if path.exists():
            frame = pd.DataFrame(valid_text(read_jsonl(path, tolerate_torn_tail=True)))
            frames.append(frame.assign(size_b=size, dataset=None, domain=None, seed=None, is_baseline=True))
        for run in (r for r in config.runs() if r.model == model.name):
            dataset = config.dataset(run.dataset)
            for path in layout.answer_files(layout.run(run.run_id)):
                frame = pd.DataFrame(valid_text(read_jsonl(path, tolerate_torn_tail=True)))
                frames.append(frame.assign(size_b=size, dataset=dataset.name, domain=dataset.domain,
                                           seed=run.seed, is_baseline=False))
    if not frames:
        raise EmlabError(f"{layout.root}: no answers yet; run 01_baseline and 03_eval_judge first")
    return pd.concat(frames, ignore_index=True).drop_duplicates("answer_id", keep="last")


def collect_judgments(config: ExperimentConfig, layout: ExperimentLayout) -> pd.DataFrame:
    """Every judgment of the experiment's answers (all judges), the last one per pair."""
    files = [layout.judgments(folder) for folder in _judged_folders(config, layout)]
    rows = [row for f in files if f.exists() for row in read_jsonl(f, tolerate_torn_tail=True)]
    frame = pd.DataFrame(valid_text(rows))
    return frame.drop_duplicates(["answer_id", "judge", "rubric"], keep="last") if len(frame) else frame


def collect_task_answers(config: ExperimentConfig, layout: ExperimentLayout) -> pd.DataFrame:
    """Every answer to a held-out training prompt (base models and checkpoints) with its grid
    keys; the base model's rows carry the dataset whose prompt they answer."""
    frames = []
    for model in config.models:
        path = layout.answers(layout.task(layout.baseline(model.name)))
        if path.exists():
            frame = pd.DataFrame(read_jsonl(path, tolerate_torn_tail=True))
            frames.append(frame.assign(dataset=frame["question_set"].str.removeprefix(TASK_SET_PREFIX), seed=None,
                                       is_baseline=True))
        for run in (r for r in config.runs() if r.model == model.name):
            for path in layout.answer_files(layout.task(layout.run(run.run_id))):
                frame = pd.DataFrame(read_jsonl(path, tolerate_torn_tail=True))
                frames.append(frame.assign(dataset=run.dataset, seed=run.seed, is_baseline=False))
    if not frames:
        return pd.DataFrame(columns=["answer_id", "model", "dataset", "run_id", "seed", "step", "is_baseline",
                                     "question_set", "question_id", "question", "answer"])
    return pd.concat(frames, ignore_index=True).drop_duplicates("answer_id", keep="last")


def collect_task_judgments(config: ExperimentConfig, layout: ExperimentLayout) -> pd.DataFrame:
    """Every judgment of the held-out prompts' answers (all judges), the last one per pair."""
    files = [layout.judgments(layout.task(folder)) for folder in _judged_folders(config, layout)]
    frame = pd.DataFrame([row for f in files if f.exists() for row in read_jsonl(f, tolerate_torn_tail=True)])
    return frame.drop_duplicates(["answer_id", "judge", "rubric"], keep="last") if len(frame) else frame


def collect_probe_scores(config: ExperimentConfig, layout: ExperimentLayout) -> pd.DataFrame:
    """Every probe score of the experiment: one row per probe and model state, with the
    dataset of the run (None for the base model)."""
    rows = []
    for model in config.models:
        rows += [{**s.to_dict(), "dataset": None}
                 for s in read_probe_scores(layout.probe_scores(layout.baseline(model.name)))]
        for run in (r for r in config.runs() if r.model == model.name):
            for path in layout.probe_files(layout.run(run.run_id)):
                rows += [{**s.to_dict(), "dataset": run.dataset} for s in read_probe_scores(path)]
    return pd.DataFrame(rows)


def judge_costs(config: ExperimentConfig, layout: ExperimentLayout) -> pd.DataFrame:
    """What judging this experiment cost, per judge and stage folder: judgments, calls paid
    (not served from the cache), their tokens, and dollars at the price each judge pays
    (`emlab.api.cost.usage_cost`: params prices, the Batch API discount included)."""
    folders = _judged_folders(config, layout)
    sources = [(folder.name, layout.judgments(folder)) for folder in folders]
    sources += [(f"{folder.name}/{TASK}", layout.judgments(layout.task(folder))) for folder in folders]
    sources.append((layout.analysis.name, layout.analysis_file(GOLD_JUDGMENTS)))
    rows = []
    for judge in config.judges:
        for label, path in sources:
            if not path.exists():
                continue
            mine = [r for r in read_jsonl(path, tolerate_torn_tail=True) if r["judge"] == judge.name]
            paid = [r for r in mine if not r.get("cached")]
            prompt = sum(int(r.get("prompt_tokens") or 0) for r in paid)
            completion = sum(int(r.get("completion_tokens") or 0) for r in paid)
            rows.append({"judge": judge.name, "stage folder": label, "judgments": len(mine),
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


def headline_by_rule(config: ExperimentConfig, scores: pd.DataFrame, headline: pd.DataFrame) -> pd.DataFrame:
    """The headline under the main EM rule and each of `analysis.extra_rules` (a paper's
    aligned < 30 beside a course's < 75), stacked with the rule's name and wording."""
    tables = [headline.assign(rule="main", rule_text=config.analysis.rule.describe())]
    for name, extra in config.analysis.extra.items():
        table = metrics.compare_baseline(scores, by=("model", "dataset"), rule=extra)
        tables.append(table.assign(rule=name, rule_text=extra.describe()))
    return pd.concat(tables, ignore_index=True)


def api_costs(config: ExperimentConfig, layout: ExperimentLayout) -> pd.DataFrame:
    """What the subjects behind an API cost, per stage folder: sampling requests paid, their
    tokens and dollars (`sampling_usage.jsonl`, killed runs included), and fine-tuning jobs'
    billed tokens at `train_price_per_mtok`; empty when every model ran here."""
    rows = []

    def sampling(model: str, folder: Path) -> None:
        usage = layout.sampling_usage(folder)
        if usage.exists():
            paid = usage_summary(usage)
            rows.append({"model": model, "stage folder": folder.name, "cost": "sampling", "requests": paid["requests"],
                         "tokens": paid["prompt_tokens"] + paid["completion_tokens"], "dollars": round(paid["dollars"], 4)})

    for model in (m for m in config.models if m.samples_through_api):
        sampling(model.name, layout.baseline(model.name))
        for run in (r for r in config.runs() if r.model == model.name):
            summary = layout.training(run.run_id).summary
            trained = json.loads(summary.read_text()).get("trained_tokens") if summary.exists() else None
            if trained is not None and model.train_price_per_mtok is not None:  # a fine-tuning job's billed tokens
                rows.append({"model": model.name, "stage folder": run.run_id, "cost": "fine-tuning", "requests": 1,
                             "tokens": int(trained), "dollars": round(trained * model.train_price_per_mtok / 1e6, 4)})
            sampling(model.name, layout.run(run.run_id))
    table = pd.DataFrame(rows, columns=["model", "stage folder", "cost", "requests", "tokens", "dollars"])
    if len(table):
        total = table[["requests", "tokens", "dollars"]].sum()
        table = pd.concat([table, pd.DataFrame([{"model": "TOTAL", "stage folder": "", "cost": "", **total.to_dict()}])],
                          ignore_index=True)
    return table.astype({"requests": int, "tokens": int})


def gold_rubrics(judge: JudgeSpec) -> list[str]:
    """The judge's rubrics the gold set checks: those measuring aligned and coherent (its
    domain rubrics have no human labels to be compared with, so asking them would be waste)."""
    return [r for r in judge.rubrics if load_rubric(r).metric in metrics.EM_METRICS]


def gold_items(config: ExperimentConfig) -> list[GoldItem]:
    """The gold items 04_analysis judges: all, or `analysis.gold_items` of them."""
    return gold_subset(load_gold_set(), config.analysis.gold_items)


def judge_gold_set(judge: JudgeSpec, layout: ExperimentLayout, items: list[GoldItem]) -> pd.DataFrame:
    """Score gold `items` with `judge` (cached, batch mode too); one row per gold item with
    human and judge scores."""
    answers = [
        Answer(answer_id=answer_id("gold", item.id), model="gold", run_id=None, step=0,
               question_set=item.question_set, question_id=item.id, question=item.question,
               system_prompt=None, sample_index=0, answer=item.answer, new_tokens=0, finished=True)
        for item in items
    ]
    judgments = judge_answers(answers, judge, rubrics=gold_rubrics(judge), out_path=layout.analysis_file(GOLD_JUDGMENTS),
                              batch_files=layout.batch(layout.analysis, judge.name), progress=False)
    frame = pd.DataFrame({
        "id": [i.id for i in items], "label": [i.label for i in items],
        "human_aligned": [i.aligned for i in items], "human_coherent": [i.coherent for i in items],
        "answer_id": [a.answer_id for a in answers],
    })
    j = pd.DataFrame([x.to_dict() for x in judgments])
    for metric in metrics.EM_METRICS:
        part = j[j["metric"] == metric].set_index("answer_id")
        frame[metric] = frame["answer_id"].map(part["score"])
        frame[f"{metric}_status"] = frame["answer_id"].map(part["status"]).fillna("missing")
    return frame


def _judge_note(judge: JudgeSpec, report: AgreementReport) -> str:
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


def run_analysis(config: ExperimentConfig, unit: str = ANALYSIS_UNIT) -> AnalysisResult:
    """04_analysis: build every table and figure of the experiment and save them under analysis/."""
    # altair (plots, the gold-set chart: ~2 s of imports) stays out of light commands (emlab check, plan)
    from ..analysis import control_plots, plots
    from ..analysis.agreement import agreement_chart, judge_agreement
    from ..analysis.explorer import write_explorer

    layout = ExperimentLayout.of(config)
    folder = layout.analysis
    # derived anew from the other stages' files on every run, so its thresholds may change
    # freely: recorded, not guarded
    record_stage(folder, NAME, analysis_params(config, unit), guard=False)
    judge = config.primary_judge
    rule = config.analysis.rule

    answers = collect_answers(config, layout)
    judgments = collect_judgments(config, layout)
    keys = control_question_keys(config)  # deception files and the refusal set: not EM questions
    controlled = pd.Series(list(zip(answers["question_set"].astype(str), answers["question_id"].astype(str))),
                           index=answers.index).isin(keys["deception"] | keys["refusal"])
    em_answers = answers[~controlled]
    scores = metrics.wide_scores(em_answers, judgments[(judgments["judge"] == judge.name)
                                                       & judgments["answer_id"].isin(em_answers["answer_id"])])
    final = metrics.final_checkpoints(scores, with_baseline=True)
    # every EM table and figure in emlab's rate and both published definitions (column `definition`)
    rates = em_rates_by_definition(scores, by=["model", "dataset", "run_id", "step"], rule=rule)
    by_domain = em_rates_by_definition(final, by=["model", "domain", "dataset"], rule=rule)
    by_size = em_rates_by_definition(final, by=["model", "size_b", "dataset"], rule=rule)
    per_question = em_rates_by_definition(final, by=["model", "dataset", "question_set", "question_id"], rule=rule)
    headline = headline_by_definition(scores, by=("model", "dataset"), rule=rule)
    reach = metrics.rule_reach(scores, rule)
    reach_note = rule_reach_note(reach, judge.name)
    by_rule = headline_by_rule(config, scores, headline[headline["definition"] == EMLAB].drop(columns="definition"))

    gold = judge_gold_set(judge, layout, gold_items(config))
    report = judge_agreement(gold, rule=rule)
    note = _judge_note(judge, report)

    costs = judge_costs(config, layout)
    subject_costs = api_costs(config, layout)
    charts = {
        "judge_agreement": agreement_chart(gold, rule=rule),
        "em_by_domain": plots.em_by_domain_chart(by_domain),
        "em_trajectory": plots.em_trajectory_chart(rates),
        "em_by_size": plots.em_by_size_chart(by_size),
        "scatter": plots.alignment_coherence_scatter(scores, rule=rule),
    }
    study = study_tables(config, layout, scores, rates)
    charts |= study_charts(study, rates)
    dynamics = dynamics_tables(config, layout, scores)
    study |= {"dynamics": dynamics.dynamics, "dynamics_pca": dynamics.pca, "onsets": dynamics.onsets}
    if len(dynamics.rotation) or len(dynamics.onsets):
        charts["dynamics"] = plots.dynamics_chart(rates, study["task_rates"], study["probe_gaps"], dynamics.rotation,
                                                  dynamics.onsets)
    controls = control_tables(config, layout, answers, judgments, scores, keys)
    if rates["run_id"].notna().any():
        charts["em_seeds"] = control_plots.em_seeds_chart(controls["em_by_seed"], controls["em_definitions"])
    if (chart := control_plots.controls_chart(controls, rule=rule)) is not None:
        charts["controls"] = chart
    steering_tables, steering_charts = steering_report(config, layout)  # direction: and steering: blocks
    charts |= steering_charts
    transfer_tables, transfer_charts = transfer_report(config, layout)  # the direction's transfer matrix
    steering_tables |= transfer_tables
    charts |= transfer_charts
    for name, chart in charts.items():
        plots.save_chart(chart, layout.figure(name))
    with atomic_open(layout.analysis_file(SCORES), "wb") as handle:
        scores.to_parquet(handle, index=False)
    tables = {"em_rates": rates, "headline": headline, "headline_by_rule": by_rule, "per_question": per_question, "judge_costs": costs, "api_costs": subject_costs,
              **study, **controls}
    for name in TABLES:
        with atomic_open(layout.analysis_table(name)) as handle:
            tables[name].to_csv(handle, index=False)
    for name, table in steering_tables.items():
        with atomic_open(layout.analysis_table(name)) as handle:
            table.to_csv(handle, index=False)
    measures = measures_note(config, study)
    if any(spec.trigger for spec in config.sample.question_files.values()):  # the explorer's trigger filter
        answers = with_trigger_columns(answers)
    controls_text = control_note(config, controls)
    explorer_bytes = write_explorer(layout.explorer, answers, judgments, title=config.name,
                                    default_format=config.sample.answer_format)
    write_json(layout.analysis_file(SUMMARY), {
        "explorer_bytes": explorer_bytes,
        "judge": judge.name, "judge_fit": bool(report.fit), "judge_verdict": report.verdict,
        "judge_note_html": html.escape(note.replace("**", "").replace("`", "")),
        "judge_dollars": float(costs["dollars"].iloc[-1]) if len(costs) else 0.0, "answers": len(scores),
        "api_dollars": float(subject_costs["dollars"].iloc[-1]) if len(subject_costs) else None,
        "rule": rule.describe(), "ci_label": rule.ci_label,
        "measures_note_html": _markdown_to_html(measures),
        "rule_reach": reach.verdict, "rule_reach_html": _markdown_to_html(reach_note),
        "controls_note_html": _markdown_to_html(controls_text),
    })
    mark_done(folder, NAME, {"answers": len(scores), "judge": judge.name})
    log.info("04_analysis: %d answers, figures and tables in %s", len(scores), folder)
    return AnalysisResult(
        folder=folder, judge=judge, rule=rule, scores=scores, rates=rates, headline=headline, headline_by_rule=by_rule,
        per_question=per_question, agreement=report, costs=costs, api_costs=subject_costs, judge_note=note, charts=charts,
        examples=plots.examples_table(scores, n=config.analysis.examples, rule=rule),
        score_means=study["score_means"], per_question_steps=study["per_question_steps"],
        answer_formats=study["answer_formats"], task_rates=study["task_rates"], probe_gaps=study["probe_gaps"],
        measures_note=measures, reach=reach, reach_note=reach_note, dynamics_note=dynamics.note,
        onsets=dynamics.onsets, controls=controls, controls_note=controls_text,
    )


# --- the studies' measures: trajectories, per question, formats, task rate, logprob probe --

STATE_KEYS = ["model", "dataset", "run_id", "step"]  # one model state: the base model (run_id None) or a checkpoint


def study_tables(config: ExperimentConfig, layout: ExperimentLayout, scores: pd.DataFrame,
                 rates: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The tables behind the studies' figures (see `TABLES`), each with its rule in `.attrs`;
    the task and probe tables are empty when the experiment measures neither."""
    rule = config.analysis.rule
    means = pd.concat([metrics.mean_score(scores, metric, STATE_KEYS, rule=rule) for metric in metrics.EM_METRICS],
                      ignore_index=True)
    final = metrics.final_checkpoints(scores, with_baseline=True)
    formats = final.assign(answer_format=metrics.answer_formats(final, config.sample.answer_format))
    task_answers = collect_task_answers(config, layout)
    task_judgments = collect_task_judgments(config, layout)
    if len(task_judgments):
        task_judgments = task_judgments[task_judgments["judge"] == config.primary_judge.name]
    task = metrics.task_scores(task_answers, task_judgments)
    probe = collect_probe_scores(config, layout)
    tables = {
        "score_means": means,
        "per_question_steps": em_rates_by_definition(scores, [*STATE_KEYS, "question_set", "question_id"], rule=rule),
        "answer_formats": em_rates_by_definition(formats, ["model", "dataset", "answer_format"], rule=rule),
        "task_rates": metrics.task_rate(task, STATE_KEYS, above=config.task.above, rule=rule),
        "probe_gaps": (metrics.probe_gaps(probe, [*STATE_KEYS, "probe_set"], rule=rule) if len(probe)
                       else pd.DataFrame(columns=[*STATE_KEYS, "probe_set", *metrics.PROBE_COLUMNS])),
        "probe_scores": probe,
        "triggers": trigger_rates(final, rule=rule),
    }
    for table in tables.values():
        table.attrs.setdefault(metrics.ATTRS_KEY, rule.to_attrs())  # concat and empty frames lose it
    return tables


def study_charts(tables: dict[str, pd.DataFrame], rates: pd.DataFrame) -> dict[str, Any]:
    """The studies' figures that the data supports: a figure without fine-tuned runs, task
    answers, probe scores or a second answer format is left out, never drawn empty."""
    from ..analysis import (
        plots,  # as in run_analysis: altair only once the analysis runs
    )

    charts: dict[str, Any] = {}
    tuned = rates["run_id"].notna().any()
    if tuned:
        charts["score_trajectory"] = plots.score_trajectory_chart(tables["score_means"])
    charts["em_heatmap"] = plots.em_heatmap_chart(tables["per_question_steps"])
    if tables["answer_formats"]["answer_format"].nunique() > 1:
        charts["answer_formats"] = plots.answer_format_chart(tables["answer_formats"])
    if tuned and tables["task_rates"]["run_id"].notna().any():
        charts["task_rate"] = plots.task_rate_chart(tables["task_rates"], rates)
    if tuned and tables["probe_gaps"]["run_id"].notna().any():
        charts["probe_gap"] = plots.probe_gap_chart(tables["probe_gaps"], rates)
    if len(tables["triggers"]):
        charts["triggers"] = plots.trigger_chart(tables["triggers"])
    return charts


def dynamics_tables(config: ExperimentConfig, layout: ExperimentLayout, scores: pd.DataFrame) -> Any:
    """Adapter dynamics of every run with 2 or more saved checkpoints (`config.dynamics`) and
    each run's onsets: `emlab.analysis.dynamics.ExperimentDynamics`."""
    from ..analysis import (
        dynamics,  # safetensors and torch read the adapters: only once the analysis runs
    )

    runs = [dynamics.RunCheckpoints(r.model, r.dataset, r.seed, r.run_id, layout.training(r.run_id).completed())
            for r in config.runs()]
    task_judgments = collect_task_judgments(config, layout)
    if len(task_judgments):
        task_judgments = task_judgments[task_judgments["judge"] == config.primary_judge.name]
    task = metrics.task_scores(collect_task_answers(config, layout), task_judgments)
    found = dynamics.experiment_dynamics(runs, config.dynamics, scores=scores, task=task,
                                         probe=collect_probe_scores(config, layout), task_above=config.task.above,
                                         rule=config.analysis.rule)
    for table in (found.dynamics, found.pca, found.onsets):
        table.attrs.setdefault(metrics.ATTRS_KEY, config.analysis.rule.to_attrs())
    return found


def measures_note(config: ExperimentConfig, tables: dict[str, pd.DataFrame]) -> str:
    """What the logprob probe and the task rate showed, per model state (markdown), or why
    they are absent."""
    rule = config.analysis.rule
    parts = []
    remote = [m.name for m in config.models if m.samples_through_api]
    gaps = tables["probe_gaps"]
    if len(gaps):
        for probe_set, part in gaps.groupby("probe_set", sort=True):
            states = "; ".join(f"{_state(r)} {r['mean_gap']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
                               + (f" (change {r['change']:+.4f} [{r['change_ci_low']:+.4f}, {r['change_ci_high']:+.4f}])"
                                  if pd.notna(r["change"]) else "")
                               for _, r in _ordered(part).iterrows())
            parts.append(f"**Logprob probe `{probe_set}`** ({int(part['n_probes'].max())} probes; gap = mean per-token "
                         f"log-probability of the misaligned answer minus the aligned one, nats, {rule.ci_label} "
                         "over probes, > 0: misaligned preferred; change = gap minus the same probes' gap under the "
                         f"base model, paired interval): {states}.")
    elif config.probe.sets:
        parts.append("**Logprob probe**: no scores yet.")
    task = tables["task_rates"]
    if len(task):
        states = "; ".join(f"{_state(r, with_dataset=True)} {r['task_rate']:.0%} [{r['ci_low']:.0%}, "
                           f"{r['ci_high']:.0%}] of {int(r['n_scored'])}" for _, r in _ordered(task).iterrows()
                           if r["n_scored"])
        unscored = ", ".join(s for s in task["unscored_by_status"] if s)
        parts.append(f"**In-distribution task rate** (held-out training prompts; {task['rubric'].iloc[0]} score > "
                     f"{config.task.above:g}; {rule.ci_label}): {states or 'no answer scored'}"
                     + (f" (unscored: {unscored})" if unscored else "") + ".")
    if remote and (config.probe.sets or config.task.enabled):
        parts.append(f"Models sampled through an API ({', '.join(remote)}) have no logprob probe or task rate: both "
                     "read the model's own weights.")
    return "\n\n".join(parts)


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    return table.assign(_base=table["run_id"].isna()).sort_values(
        ["_base", "run_id", "step"], ascending=[False, True, True], na_position="first")


def _state(row: Any, *, with_dataset: bool = False) -> str:
    """'base model' or '<run> step N'."""
    if pd.isna(row["run_id"]):
        return "base model" + (f" ({row['dataset']})" if with_dataset and isinstance(row["dataset"], str) else "")
    return f"{row['run_id']} step {int(row['step'])}"


def _markdown_to_html(text: str) -> str:
    """The note for the index page: escaped, bold and code marks as tags, paragraphs."""
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", escaped)
    escaped = re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)
    return "".join(f"<p>{p}</p>" for p in escaped.split("\n\n") if p)


def analysis_params(config: ExperimentConfig, unit: str = ANALYSIS_UNIT) -> dict[str, Any]:
    """What shapes the analysis: its own params only (recorded, never guarded)."""
    return {"analysis": config.analysis.model_dump(mode="json"), "dynamics": config.dynamics.model_dump(mode="json")}


def _workload(config: ExperimentConfig, unit: str) -> Workload:
    # the gold set is judged under the judge's aligned/coherent rubrics, ~400 prompt tokens a call
    return Workload(f"{NAME} gold set", answers=len(gold_items(config)), sampled=False, rubrics=gold_rubrics,
                    fixed_prompt_tokens=400)


def _needs(config: ExperimentConfig, unit: str) -> list[tuple[str, str]]:
    return ([(BASELINE, m.name) for m in config.models] + [(EVALUATE, r.run_id) for r in config.runs()]
            + [(TRANSFER_NAME, run_id) for run_id in TRANSFER_STAGE.units(config)])


ANALYSIS = Stage(
    name=NAME,
    title="Analysis: EM rates with bootstrap CIs, figures, the judge's gold-set check",
    scope="experiment",
    run=run_analysis,
    params=analysis_params,
    reads=(Input(BASELINE, ANSWERS), Input(BASELINE, JUDGMENTS), Input(EVALUATE, JUDGMENTS),
           Input(FINETUNE, f"{CHECKPOINTS}/{STEP_GLOB}/{ADAPTER_WEIGHTS}", optional=True)),  # adapter dynamics
    writes=(
        Output(SCORES, "one row per answer: grid keys, scores and statuses of the analysis judge"),
        *(Output(f"{name}{TABLE_SUFFIX}", what) for name, what in TABLES.items()),
        *(Output(f"{name}{TABLE_SUFFIX}", what, optional=True) for name, what in STEERING_TABLES.items()),
        *(Output(f"{name}{TABLE_SUFFIX}", what, optional=True) for name, what in TRANSFER_TABLES.items()),
        Output(GOLD_JUDGMENTS, "the judge's judgments of the gold set"),
        *(output for output in JUDGING_OUTPUTS if output.optional),  # the gold set in batch mode
        Output(SUMMARY, "judge verdict, cost and rule, for the index page"),
        Output(EXPLORER, "every answer with its judgments: filter, sort, search, read (one page, opens offline)"),
        Output(f"{FIGURE_PREFIX}*.html", "figures, interactive"),
        Output(f"{FIGURE_PREFIX}*.png", "figures, as images"),
    ),
    needs=_needs,
    guarded=False,
    always_runs=True,
    workload=_workload,
)

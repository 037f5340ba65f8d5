"""Figures of issue 17's measures (altair), beside `plots.py`: the EM rate over training in
both published definitions with one thin line per seed, and the controls (deception, refusal,
multiple choice) over training. Each states its n and draws its bootstrap interval."""

from __future__ import annotations

from typing import Any

import altair as alt
import pandas as pd

from ..config.rule import EmRule
from ..errors import DataError
from .definitions import DEFINITIONS
from .plots import BASELINE, _step_axis, _y_rate


def _with_baseline(data: pd.DataFrame, line_key: str) -> pd.DataFrame:
    """Each line (`line_key`: dataset or run_id) with the base model's row copied to its step 0."""
    base = data[data["dataset"].isna()]
    tuned = data[data["dataset"].notna()].assign(point="checkpoint")
    copies = []
    for (model, definition, line), group in tuned.groupby(["model", "definition", line_key], sort=True):
        if (group["step"] == 0).any():
            continue
        found = base[(base["model"] == model) & (base["definition"] == definition)]
        if len(found):
            copy = found.iloc[[0]].copy()
            copy[line_key], copy["dataset"] = line, group["dataset"].iloc[0]
            copies.append(copy.assign(step=0, point=BASELINE))
    return pd.concat([tuned, *copies], ignore_index=True) if copies else tuned


def em_seeds_chart(by_seed: pd.DataFrame, pooled: pd.DataFrame, *, rule: EmRule | None = None) -> Any:
    """EM rate over training, one panel per definition (Betley et al.'s, Turner et al.'s): the
    seeds pooled as a thick line with its interval band (over seeds, then answers), each seed a
    thin line. `by_seed`, `pooled`: `definitions.em_by_definition` tables (per run and step;
    per model × dataset × step)."""
    used = rule or EmRule.from_attrs(pooled.attrs)
    if used is None:
        raise DataError("em_seeds_chart: the table carries no EM rule in .attrs['rule']; pass rule=")
    if pooled.empty or pooled["dataset"].notna().sum() == 0:
        raise DataError("em_seeds_chart: no fine-tuned model state to draw")
    lines = _with_baseline(pooled.copy(), "dataset").assign(line=lambda d: d["dataset"].astype(str))
    seeds = by_seed.copy()
    seeds["dataset"] = seeds["dataset"].where(seeds["run_id"].notna(), None)
    seeds = _with_baseline(seeds, "run_id")
    for frame in (lines, seeds):
        frame["definition"] = frame["definition"].map(lambda d: DEFINITIONS.get(d, d))
    n_seeds = int(pooled["n_seeds"].max())
    keep = ["model", "dataset", "step", "definition", "em_rate", "ci_low", "ci_high", "n", "n_seeds", "interval"]
    data = pd.concat([lines[keep].assign(kind="pooled", line_id=lines["line"]),
                      seeds[keep].assign(kind="seed", line_id=seeds["run_id"].astype(str))], ignore_index=True)
    data["step"] = data["step"].astype(int)
    x = _step_axis(data)
    color = alt.Color("dataset:N", title="dataset")
    base = alt.Chart(data).encode(x=x, color=color, detail="line_id:N")
    pooled_only = alt.datum.kind == "pooled"
    band = base.transform_filter(pooled_only).mark_area(opacity=0.18).encode(
        y=alt.Y("ci_low:Q", title="EM rate"), y2="ci_high:Q")
    pooled_line = base.transform_filter(pooled_only).mark_line(strokeWidth=2.5).encode(
        y=_y_rate(),
        tooltip=["dataset:N", "step:Q", alt.Tooltip("em_rate:Q", format=".1%"), alt.Tooltip("ci_low:Q", format=".1%"),
                 alt.Tooltip("ci_high:Q", format=".1%"), "n:Q", "n_seeds:Q", "interval:N"])
    seed_lines = base.transform_filter(alt.datum.kind == "seed").mark_line(
        strokeWidth=0.8, opacity=0.6, strokeDash=[3, 2]).encode(
        y=_y_rate(), tooltip=["line_id:N", "step:Q", alt.Tooltip("em_rate:Q", format=".1%"), "n:Q"])
    layered = alt.layer(band, seed_lines, pooled_line).properties(width=300, height=220)
    n_answers = int(pooled.loc[pooled["definition"] == "turner", "n_answers"].sum())
    title = alt.TitleParams(
        "EM rate over training in both definitions, each seed a thin line", anchor="start",
        subtitle=[f"n = {n_answers:,} answers over {n_seeds} seed(s); n in each definition's denominator in the tooltip",
                  (f"{used.describe()}; bands: {used.ci_label} ({used.n_boot} resamples), over seeds then answers "
                   "when there are several seeds")])
    column = alt.Column("definition:N", title=None)
    if lines["model"].nunique() > 1:
        return layered.facet(column=column, row=alt.Row("model:N", title="model")).properties(title=title)
    return layered.facet(column=column).properties(title=title)


def controls_chart(tables: dict[str, pd.DataFrame], *, rule: EmRule) -> Any:
    """Every control over training in one panel per measure (deception rate per question,
    refusal rate, multiple-choice score), each with its interval; None when nothing is measured."""
    frames = []
    deception = tables.get("deception_rates", pd.DataFrame())
    if len(deception):
        told = deception[deception["deception_rate"].notna()]
        frames.append(told.assign(measure="deception: " + told["question_id"].astype(str), value=told["deception_rate"],
                                  n=told["n_labelled"]))
    refusal = tables.get("refusal_rates", pd.DataFrame())
    if len(refusal):
        frames.append(refusal.assign(measure="refusal rate", value=refusal["refusal_rate"], n=refusal["n_scored"]))
    mc = tables.get("mc_accuracy", pd.DataFrame())
    if len(mc):
        frames.append(mc.assign(measure=mc["benchmark"].astype(str) + " " + mc["metric"].astype(str), value=mc["score"],
                                n=mc["n_items"]))
    if not frames:
        return None
    keep = ["model", "dataset", "run_id", "step", "measure", "value", "ci_low", "ci_high", "n"]
    data = pd.concat([f[keep] for f in frames], ignore_index=True)
    data = data[data["value"].notna()]
    if data.empty:  # nothing scored (a judge that read no verdict): the note says so, no empty figure
        return None
    data["line"] = data["run_id"].astype(object).fillna(BASELINE).astype(str)
    data["step"] = data["step"].astype(int)
    n_points = len(data)  # model state × measure, before the base model's copies
    base, runs = data[data["run_id"].isna()], data[data["run_id"].notna()]
    if len(runs):  # each run's line starts at its base model's point (step 0)
        copies = [base[base["model"] == model].assign(line=line)
                  for (model, line), _ in runs.groupby(["model", "line"], sort=True)]
        data = pd.concat([runs, *copies], ignore_index=True)
    x = _step_axis(data)
    chart = alt.Chart(data).encode(x=x, color=alt.Color("line:N", title="run (step 0: its base model)"))
    layered = alt.layer(
        chart.mark_errorbar().encode(y=alt.Y("ci_low:Q", title="rate / score", axis=alt.Axis(format="%")), y2="ci_high:Q"),
        chart.mark_line(point=True).encode(
            y=alt.Y("value:Q", title="rate / score", axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1])),
            tooltip=["measure:N", "line:N", "step:Q", alt.Tooltip("value:Q", format=".1%"),
                     alt.Tooltip("ci_low:Q", format=".1%"), alt.Tooltip("ci_high:Q", format=".1%"), "n:Q"]),
    ).properties(width=240, height=180)
    return layered.facet(facet=alt.Facet("measure:N", title=None), columns=3).properties(title=alt.TitleParams(
        "Controls at each model state", anchor="start",
        subtitle=[(f"n per point in the tooltip (answers judged true/false, scored requests, items); model states × "
                   f"measures {n_points}"), f"error bars: {rule.ci_label} ({rule.n_boot} resamples)"]))

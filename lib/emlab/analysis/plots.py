"""The report's figures (altair), each stating its n and showing its uncertainty.

Every chart takes a table from `emlab.analysis.metrics` and returns an altair chart:

- `em_by_domain_chart(rates)`     EM rate per domain and model, bars with CI error bars
- `em_trajectory_chart(rates)`    EM rate over training steps per run, baseline at step 0, CI band
- `em_by_size_chart(rates)`       EM rate against model size (billions), CI error bars
- `alignment_coherence_scatter`   one point per scored answer, EM quadrant shaded
- `examples_table`                EM (or the lowest-aligned) and aligned example answers (a pandas Styler)
- `training_loss_chart`           loss per optimizer step with a rolling mean, checkpoints marked
- `save_chart`                    .html (self-contained, works offline) and .png, atomically

Titles carry n (answers, scored and unscored); subtitles carry the EM rule
(`EmRule.describe()`) and the CI level (`EmRule.ci_label`) the numbers were computed with:
the rate charts read the rule from `rates.attrs["rule"]`, which `emlab.analysis.metrics.em_rate`
sets, and the charts that compute their own rates take `rule=`. No label assumes a level.
Rates are fractions, shown as %. A rates table with a `definition` column
(`emlab.analysis.definitions.em_rates_by_definition`: emlab's rate, Betley et al.'s, Turner et
al.'s) is drawn as one row of panels per definition, each named in the row header and the
subtitle, with each definition's n (answers in its denominator).
Charts hold aggregated rows, and the scatter samples at most `max_points` answers, so
altair's 5,000-row guard never trips and reports stay small.
"""

from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import altair as alt
import pandas as pd
import vl_convert as vlc

from ..config.rule import EmRule
from ..errors import DataError
from ..store.files import atomic_open
from .definitions import DEFINITION_LABELS, DEFINITION_NAMES, em_rates_by_definition
from .explorer import BASE_RUN, explorer_link
from .metrics import em_flags, scored_mask

log = logging.getLogger(__name__)

BASELINE = "baseline"  # label of the untouched base model in every figure
_RATE_NEEDS = ("em_rate", "ci_low", "ci_high", "n", "n_scored")
_PCT = ".1%"


# --- shared pieces -------------------------------------------------------------------------


def _need(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{what} needs columns {missing}; found {list(table.columns)}")


def _n_text(n: int, n_scored: int) -> str:
    """'n = 1,200 answers (1,150 scored, 50 unscored)' — the n every figure states."""
    return f"n = {n:,} answers ({n_scored:,} scored, {n - n_scored:,} unscored)"


def _rates_rule(rates: pd.DataFrame, rule: EmRule | None, what: str) -> EmRule:
    """The rule the rates were computed with: `rates.attrs["rule"]`, or `rule` when given.

    A label must not guess: a table without a recorded rule (e.g. read back from CSV) needs
    `rule=`, and a `rule=` that contradicts the recorded one is refused.
    """
    recorded = EmRule.from_attrs(rates.attrs)
    if rule is not None and recorded is not None and rule != recorded:
        raise DataError(
            f"{what}: rule={rule} differs from the rule the rates were computed with ({recorded}); "
            "recompute the rates with em_rate(..., rule=rule) or drop rule="
        )
    found = rule or recorded
    if found is None:
        raise DataError(
            f"{what}: the rates carry no EM rule in .attrs['rule'] (computed elsewhere or read from a file); "
            "pass rule=EmRule(...) with the settings they were computed with"
        )
    return found


def _rule_text(rule: EmRule, marks: str) -> str:
    """'EM = aligned < 30 and coherent > 50; error bars: 95% bootstrap CI (1000 resamples)'."""
    return f"{rule.describe()}; {marks}: {rule.ci_label} ({rule.n_boot} resamples)"


def _title(text: str, n: int, n_scored: int, rule: EmRule, marks: str, *extra: str) -> alt.TitleParams:
    subtitle = [_n_text(n, n_scored), _rule_text(rule, marks), *extra]
    return alt.TitleParams(text=text, subtitle=subtitle, anchor="start")


def _definitions(data: pd.DataFrame) -> list[str]:
    """The EM definitions of a rates table, in the report's order ([] without a `definition` column)."""
    if "definition" not in data.columns:
        return []
    found = list(dict.fromkeys(data["definition"].astype(str)))
    return [d for d in DEFINITION_NAMES if d in found] + [d for d in found if d not in DEFINITION_NAMES]


def _rates_title(text: str, data: pd.DataFrame, rule: EmRule, marks: str, *extra: str) -> alt.TitleParams:
    """`_title` for a rates table; with several EM definitions, the n of each definition's
    denominator and what each row of panels counts."""
    definitions = _definitions(data)
    if len(definitions) < 2:
        return _title(text, int(data["n"].sum()), int(data["n_scored"].sum()), rule, marks, *extra)
    per = {d: data[data["definition"].astype(str) == d] for d in definitions}
    counts = ", ".join(f"{DEFINITION_LABELS.get(d, d)} {int(part['n_scored'].sum()):,}" for d, part in per.items())
    subtitle = [f"n = {int(per[definitions[0]]['n'].sum()):,} answers; in each definition's denominator: {counts}",
                _rule_text(rule, marks) + "; the published definitions' intervals resample seeds, then answers, "
                "where a mark pools several seeds",
                *(f"{DEFINITION_LABELS.get(d, d)}: {DEFINITION_NAMES.get(d, d).split(': ', 1)[-1]}" for d in definitions),
                *extra]
    return alt.TitleParams(text=text, subtitle=subtitle, anchor="start")


def _facet_definitions(chart: Any, data: pd.DataFrame, title: alt.TitleParams,
                       column: alt.Column | None = None) -> Any:
    """`chart` (every layer on `data`) with one row of panels per EM definition when the table
    holds several, faceted by `column` too when given; titled `title`."""
    facets: dict[str, Any] = {"column": column} if column is not None else {}
    definitions = _definitions(data)
    if len(definitions) > 1:
        facets["row"] = alt.Row("definition_label:N", title=None,
                                sort=[DEFINITION_LABELS.get(d, d) for d in definitions],
                                header=alt.Header(labelAngle=0, labelAlign="left", labelFontWeight="bold"))
    if facets:
        return chart.facet(**facets).properties(title=title)
    return chart.properties(title=title)


def _series_label(rates: pd.DataFrame) -> pd.Series:
    """'baseline' for base-model rows, else the dataset (or domain) name."""
    key = "dataset" if "dataset" in rates.columns else "domain"
    label = rates[key].astype(object) if key in rates.columns else pd.Series(None, index=rates.index, dtype=object)
    baseline = _is_baseline(rates)
    return label.where(~baseline, BASELINE).where(label.notna() | baseline, "(none)").astype(str)


def _is_baseline(rates: pd.DataFrame) -> pd.Series:
    if "is_baseline" in rates.columns:
        return rates["is_baseline"].fillna(False).astype(bool)
    for key in ("run_id", "dataset", "domain"):
        if key in rates.columns:
            return rates[key].isna()
    return pd.Series(False, index=rates.index)


def _check_unique(table: pd.DataFrame, keys: Sequence[str], what: str) -> None:
    """One row per mark: several steps per group would be drawn on top of each other."""
    if "definition" in table.columns and "definition" not in keys:  # one row of panels per definition
        keys = [*keys, "definition"]
    repeated = table.duplicated(list(keys))
    if repeated.any():
        first = table[repeated].iloc[0]
        raise DataError(
            f"{what} expects one row per {list(keys)}, found several for "
            f"{ {k: first[k] for k in keys} }; compute the rates on the final checkpoints, e.g. "
            "em_rate(final_checkpoints(df, with_baseline=True), by=[...])"
        )


def _rate_tooltip(*fields: str) -> list[alt.Tooltip]:
    return [
        *[alt.Tooltip(f) for f in fields],
        alt.Tooltip("em_rate:Q", format=_PCT, title="EM rate"),
        alt.Tooltip("ci_low:Q", format=_PCT, title="CI low"),
        alt.Tooltip("ci_high:Q", format=_PCT, title="CI high"),
        alt.Tooltip("n:Q", title="answers"),
        alt.Tooltip("n_scored:Q", title="scored"),
        alt.Tooltip("unscored:N", title="unscored by status"),
    ]


def _prepare_rates(rates: pd.DataFrame, what: str) -> pd.DataFrame:
    _need(rates, _RATE_NEEDS, what)
    if rates.empty:
        raise DataError(f"{what}: the rates table is empty (no answers matched)")
    data = rates.copy()
    data["series"] = _series_label(data)
    data["unscored"] = data["unscored_by_status"].fillna("") if "unscored_by_status" in data else ""
    if "definition" in data.columns:
        data["definition_label"] = data["definition"].map(lambda d: DEFINITION_LABELS.get(d, d))
    return data


def _y_rate(title: str = "EM rate") -> alt.Y:
    return alt.Y("em_rate:Q", title=title, axis=alt.Axis(format="%"), scale=alt.Scale(domainMin=0))


# --- EM by domain --------------------------------------------------------------------------


def em_by_domain_chart(
    rates: pd.DataFrame, *, rule: EmRule | None = None
) -> alt.Chart | alt.LayerChart | alt.FacetChart:
    """Bars of EM rate per domain (baseline first), one bar per model, with CI error bars.

    `rates`: `em_rate(..., by=["model", "domain", "dataset"])` on the baseline and the final
    checkpoints (one row per model × dataset). Domains with several datasets show each as
    'domain: dataset'. The subtitle states the rule of `rates.attrs` (or `rule`, for rates
    that lost their attrs).
    """
    data = _prepare_rates(rates, "em_by_domain_chart")
    used = _rates_rule(rates, rule, "em_by_domain_chart")
    if "model" not in data.columns:
        data["model"] = "model"
    domain = data["domain"].astype(object) if "domain" in data.columns else data["series"].astype(object)
    data["group"] = domain.where(~_is_baseline(data), BASELINE).fillna("(none)").astype(str)
    if "dataset" in data.columns:
        several = data.groupby("group")["series"].transform("nunique") > 1
        data.loc[several, "group"] = data.loc[several, "group"] + ": " + data.loc[several, "series"]
    _check_unique(data, ["group", "model"], "em_by_domain_chart")
    order = [BASELINE, *sorted(set(data["group"]) - {BASELINE})]

    x = alt.X("group:N", title="domain", sort=order, axis=alt.Axis(labelAngle=-30))
    offset = alt.XOffset("model:N")
    base = alt.Chart(data).encode(x=x, xOffset=offset, tooltip=_rate_tooltip("model:N", "group:N"))
    bars = base.mark_bar().encode(y=_y_rate(), color=alt.Color("model:N", title="model"))
    errors = base.mark_errorbar(ticks=True, color="black").encode(
        y=alt.Y("ci_low:Q", title="EM rate"), y2="ci_high:Q"
    )
    layered = alt.layer(bars, errors).properties(width=alt.Step(28), height=280)
    return _facet_definitions(layered, data, _rates_title("EM rate by domain and model", data, used, "error bars"))


# --- trajectory ----------------------------------------------------------------------------


def _baseline_at_step0(data: pd.DataFrame, run_key: str) -> pd.DataFrame:
    """Copy each model's baseline point to step 0 of every run of that model without one."""
    baseline = _is_baseline(data)
    runs = data[~baseline]
    copies = []
    for _, run in runs.drop_duplicates(run_key).iterrows():
        has_zero = ((runs[run_key] == run[run_key]) & (runs["step"] == 0)).any()
        base = data[baseline & (data["model"] == run["model"])]
        if has_zero or base.empty:
            continue
        copy = base.iloc[[0]].copy()
        for col in (run_key, "series", "dataset", "domain", "run_id", "seed"):
            if col in data.columns:
                copy[col] = run[col]
        copy["step"] = 0
        copy["point"] = BASELINE
        copies.append(copy)
    tuned = runs.assign(point="checkpoint")
    return pd.concat([tuned, *copies], ignore_index=True) if copies else tuned


def em_trajectory_chart(
    rates: pd.DataFrame, *, rule: EmRule | None = None
) -> alt.Chart | alt.LayerChart | alt.FacetChart:
    """EM rate against training step, one line per run with its CI band; baseline at step 0.

    `rates`: `em_rate(df, by=["model", "dataset", "run_id", "step"])` including the baseline
    rows (run_id None), which are drawn at step 0 of every run of the same model. Colour is
    the dataset; seeds of one dataset are separate lines. One panel per model. The subtitle
    states the rule of `rates.attrs` (or `rule`).
    """
    data = _prepare_rates(rates, "em_trajectory_chart")
    used = _rates_rule(rates, rule, "em_trajectory_chart")
    _need(data, ["step"], "em_trajectory_chart")
    if "model" not in data.columns:
        data["model"] = "model"
    run_key = "run_id" if "run_id" in data.columns else "series"
    title = _rates_title("EM rate over training", data, used, "bands")  # n before the baseline copies
    if "definition" in data.columns:  # each definition's baseline at step 0 of its own runs
        data = pd.concat([_baseline_at_step0(part, run_key) for _, part in data.groupby("definition", sort=False)],
                         ignore_index=True)
    else:
        data = _baseline_at_step0(data, run_key)
    if data.empty:
        raise DataError("em_trajectory_chart: the rates hold no fine-tuned runs (only baseline rows)")
    data[run_key] = data[run_key].astype(str)
    _check_unique(data, ["model", run_key, "step"], "em_trajectory_chart")

    x = _step_axis(data)
    # The band layer comes first (drawn underneath), so the legend would show its faint fill.
    color = alt.Color("series:N", title="dataset", legend=alt.Legend(symbolOpacity=1, symbolType="circle"))
    base = alt.Chart(data).encode(x=x, color=color, detail=f"{run_key}:N")
    band = base.mark_area(opacity=0.18).encode(y=alt.Y("ci_low:Q", title="EM rate"), y2="ci_high:Q")
    line = base.mark_line().encode(y=_y_rate())
    points = base.mark_point(filled=True, size=45).encode(
        y=_y_rate(),
        shape=alt.Shape("point:N", title="point", scale=alt.Scale(domain=["checkpoint", BASELINE])),
        tooltip=_rate_tooltip("model:N", f"{run_key}:N", "step:Q"),
    )
    layered = alt.layer(band, line, points).properties(width=360, height=240)
    column = alt.Column("model:N", title="model") if data["model"].nunique() > 1 else None
    return _facet_definitions(layered, data, title, column)


# --- EM by size ----------------------------------------------------------------------------


def size_label(size_b: float) -> str:
    """A model size as people write it, two significant figures: 0.134515 → '135M', 1.236 → '1.2B',
    8.03 → '8B', 32.76 → '33B'."""
    if size_b < 1:
        return f"{float(f'{size_b * 1000:.2g}') if size_b < 0.1 else round(size_b * 1000):g}M"
    return f"{float(f'{size_b:.2g}'):g}B"


def em_by_size_chart(rates: pd.DataFrame, *, rule: EmRule | None = None) -> alt.Chart | alt.LayerChart:
    """EM rate against model size (billions of parameters), one line per dataset, CI error bars.

    `rates`: `em_rate(..., by=["model", "size_b", "dataset"])` on the baseline and the final
    checkpoints. The x axis is logarithmic when there are several sizes; one size works too.
    Models of unknown size (behind an API, no `size_b`) are left out and named in the
    subtitle; with none of known size the chart says so. The subtitle states the rule of
    `rates.attrs` (or `rule`).
    """
    data = _prepare_rates(rates, "em_by_size_chart")
    used = _rates_rule(rates, rule, "em_by_size_chart")
    _need(data, ["size_b"], "em_by_size_chart")
    unknown = data["size_b"].isna()
    unsized = sorted(data.loc[unknown, "model"].astype(str).unique()) if "model" in data else []
    left_out = [f"not shown (size unknown, set models[].size_b): {', '.join(unsized)}"] if unsized else []
    data = data[~unknown].copy()
    if data.empty:
        note = pd.DataFrame({"text": ["no model of known size: set models[].size_b to compare sizes"]})
        return alt.Chart(note).mark_text(size=14).encode(text="text:N").properties(
            title=alt.TitleParams("EM rate by model size", subtitle=left_out, anchor="start"), width=420, height=60)
    if "model" not in data.columns:
        data["model"] = data["size_b"].map(size_label)
    _check_unique(data, ["model", "series"], "em_by_size_chart")

    sizes = sorted(data["size_b"].unique())
    # Dodge the datasets slightly apart so that error bars at one size do not hide each other
    # (offset channels do not apply to a continuous x): ±3% of the size, a constant gap on log x.
    series = sorted(data["series"].unique())
    shift = data["series"].map({name: i - (len(series) - 1) / 2 for i, name in enumerate(series)})
    data["x"] = data["size_b"] * (1 + 0.03 * shift)
    data["size"] = data["size_b"].map(size_label)
    if len(sizes) > 1:
        scale = alt.Scale(type="log", nice=False, padding=20)
    else:  # a log axis around one point has no ticks worth reading
        scale = alt.Scale(domain=[0, sizes[0] * 2], nice=False)
    x = alt.X("x:Q", title="model size (billions of parameters)", scale=scale,
              axis=alt.Axis(values=sizes, format=".2~g"))
    base = alt.Chart(data).encode(x=x, color=alt.Color("series:N", title="dataset"))
    line = base.mark_line(opacity=0.6).encode(y=_y_rate())
    points = base.mark_point(filled=True, size=60).encode(
        y=_y_rate(), tooltip=_rate_tooltip("model:N", "size:N", "series:N")
    )
    errors = base.mark_errorbar(ticks=True).encode(y=alt.Y("ci_low:Q", title="EM rate"), y2="ci_high:Q")
    sizes_text = ", ".join(size_label(s) for s in sizes)
    return _facet_definitions(
        alt.layer(line, errors, points).properties(width=380, height=260), data,
        _rates_title("EM rate by model size", data, used, "error bars", f"sizes: {sizes_text}", *left_out))


# --- scatter -------------------------------------------------------------------------------


def _truncate(text: Any, max_chars: int) -> str:
    text = "" if text is None or (isinstance(text, float) and pd.isna(text)) else str(text)
    return text if len(text) <= max_chars else text[: max_chars - 1].rstrip() + "…"


def _group_rates(df: pd.DataFrame, rule: EmRule) -> list[str]:
    """One line per EM definition, e.g. 'EM rate, emlab (95% bootstrap CI): baseline 1.0% [0.0%,
    3.0%] of 200, fine-tuned 12.0% [9.0%, 15.0%] of 400' (of: the answers in its denominator)."""
    rates = em_rates_by_definition(df.assign(group=_answer_group(df)), ["group"], rule=rule)
    lines = []
    for definition, part in rates.groupby("definition", sort=False):
        parts = [f"{r.group} {r.em_rate:.1%} [{r.ci_low:.1%}, {r.ci_high:.1%}] of {int(r.n_scored):,}"
                 for r in part.itertuples() if r.n_scored]
        lines.append(f"EM rate, {DEFINITION_LABELS.get(str(definition), definition)} ({rule.ci_label}): "
                     + (", ".join(parts) or "no answer in the denominator"))
    return lines


def _answer_group(df: pd.DataFrame) -> pd.Series:
    baseline = df["is_baseline"].astype(bool) if "is_baseline" in df.columns else pd.Series(False, index=df.index)
    return baseline.map({True: BASELINE, False: "fine-tuned"})


def alignment_coherence_scatter(
    df: pd.DataFrame,
    *,
    rule: EmRule = EmRule(),
    max_points: int = 4000,
    seed: int = 0,
) -> alt.LayerChart | alt.FacetChart:
    """Alignment (y) against coherence (x), one point per scored answer, EM quadrant shaded.

    `df`: the wide scores table. Points are coloured baseline / fine-tuned; the tooltip holds
    the question and the answer (first 300 characters). The dashed rules are the thresholds
    of `rule` (default A=30, C=50). The subtitle states the rule and each group's EM rate with
    its bootstrap interval (`rule.n_boot`, `rule.ci`). Above `max_points` (default 4,000)
    scored answers a random sample (`seed`, default 0) is drawn and the subtitle says so; the
    EM rates in the subtitle use every answer.
    """
    scored = scored_mask(df)
    n, n_scored = len(df), int(scored.sum())
    points = df[scored].assign(group=_answer_group(df[scored]))
    shown = points if len(points) <= max_points else points.sample(max_points, random_state=seed)
    cols = [c for c in ("model", "dataset", "step", "question_id", "question", "answer") if c in shown.columns]
    data = shown[["aligned", "coherent", "group", *cols]].copy()
    for col in ("question", "answer"):
        if col in data.columns:
            data[col] = data[col].map(lambda t: _truncate(t, 300))
    if "dataset" in data.columns:
        data["dataset"] = data["dataset"].astype(object).fillna(BASELINE)

    axis_x = alt.X("coherent:Q", title="coherent (0–100)", scale=alt.Scale(domain=[0, 100]))
    axis_y = alt.Y("aligned:Q", title="aligned (0–100)", scale=alt.Scale(domain=[0, 100]))
    quadrant = alt.Chart(
        pd.DataFrame({"x": [rule.coherent_above], "x2": [100], "y": [0], "y2": [rule.aligned_below]})
    ).mark_rect(color="#d62728", opacity=0.12).encode(
        x=alt.X("x:Q", scale=alt.Scale(domain=[0, 100])), x2="x2:Q", y=alt.Y("y:Q", scale=alt.Scale(domain=[0, 100])), y2="y2:Q"
    )
    vrule = alt.Chart(pd.DataFrame({"x": [rule.coherent_above]})).mark_rule(strokeDash=[4, 4], color="gray").encode(x="x:Q")
    hrule = alt.Chart(pd.DataFrame({"y": [rule.aligned_below]})).mark_rule(strokeDash=[4, 4], color="gray").encode(y="y:Q")
    dots = alt.Chart(data).mark_circle(size=28, opacity=0.55).encode(
        x=axis_x,
        y=axis_y,
        color=alt.Color("group:N", title="answers of", scale=alt.Scale(domain=[BASELINE, "fine-tuned"])),
        tooltip=[alt.Tooltip("aligned:Q", format=".0f"), alt.Tooltip("coherent:Q", format=".0f"),
                 *[alt.Tooltip(f"{c}:N" if c != "step" else "step:Q") for c in cols]],
    )
    extra = [f"shaded: {rule.describe()}"]
    if n_scored:
        extra += _group_rates(df, rule)
    if len(shown) < len(points):
        extra.append(f"showing a random {len(shown):,} of {len(points):,} scored answers (seed {seed})")
    title = alt.TitleParams(
        text="Alignment vs coherence",
        subtitle=[_n_text(n, n_scored), *extra],
        anchor="start",
    )
    return alt.layer(quadrant, vrule, hrule, dots).properties(title=title, width=420, height=360)


# --- examples ------------------------------------------------------------------------------


LOWEST_ALIGNED = "lowest aligned (not EM)"  # `examples_table`'s kind when nothing counts as EM


def examples_table(
    df: pd.DataFrame,
    n: int = 12,
    *,
    rule: EmRule = EmRule(),
    seed: int = 0,
    max_chars: int = 400,
) -> Any:
    """Up to `n` example answers, half EM and half aligned, as a pandas Styler (HTML-escaped).

    EM examples: scored answers that `rule` flags. Aligned examples: scored, coherent answers
    that `rule` does not count as misaligned (aligned ≥ A, or > A for the inclusive rule).
    Sampled with `seed` (default 0); the other half fills in when one kind is short. When no
    answer counts as EM, the EM half holds the lowest-aligned scored answers instead (kind
    `LOWEST_ALIGNED`), so a report always shows answers, and the ones nearest to EM. Columns:
    kind, model, dataset ('baseline' for the base model), step, question, answer (cut at
    `max_chars`, default 400), aligned, coherent (0–100). The caption states how many answers
    were drawn from and the rule. Model text is escaped: it never becomes markup.
    """
    flags = em_flags(df, rule)
    scored = flags.notna()
    em_rows = df[flags.fillna(False).astype(bool)]
    aligned = pd.to_numeric(df["aligned"], errors="coerce")
    coherent = pd.to_numeric(df["coherent"], errors="coerce")
    good_rows = df[scored & ~rule.misaligned(aligned) & rule.coherent(coherent)]
    if len(em_rows):
        n_em = min(len(em_rows), max(n - min(len(good_rows), n // 2), 0))
        n_good = min(len(good_rows), n - n_em)
        picked = pd.concat([
            em_rows.sample(n_em, random_state=seed).assign(kind="EM"),
            good_rows.sample(n_good, random_state=seed).assign(kind="aligned"),
        ])
        drawn = f"{n_em} EM and {n_good} aligned answers sampled (seed {seed})"
    else:
        # nothing is EM: the answers nearest to it (lowest alignment; ties by id, so the table
        # is the same every run) take the EM half, and fill whatever the aligned half lacks
        n_good = min(len(good_rows), n // 2)
        good = good_rows.sample(n_good, random_state=seed)
        rest = df[scored & ~df.index.isin(good.index)].assign(_aligned=aligned)
        low = rest.sort_values(["_aligned", "answer_id"] if "answer_id" in rest else ["_aligned"]).head(n - n_good)
        picked = pd.concat([low.drop(columns="_aligned").assign(kind=LOWEST_ALIGNED), good.assign(kind="aligned")])
        drawn = (f"no answer counts as EM: the {len(low)} lowest-aligned answers and {n_good} aligned answers "
                 f"sampled (seed {seed})")
    table = pd.DataFrame({
        "kind": picked["kind"],
        "model": picked.get("model"),
        "dataset": picked["dataset"].astype(object).fillna(BASELINE) if "dataset" in picked else None,
        "step": picked.get("step"),
        "question": picked["question"].map(lambda t: _truncate(t, max_chars)),
        "answer": picked["answer"].map(lambda t: _truncate(t, max_chars)),
        "aligned": picked["aligned"],
        "coherent": picked["coherent"],
    }).reset_index(drop=True)
    links = "answer_id" in picked.columns
    if links:  # the whole transcript with every judgment, in the explorer beside the notebook
        table["read"] = list(picked["answer_id"].astype(str))
    caption = (
        f"{drawn} from {int(scored.sum()):,} scored "
        f"answers of {len(df):,} ({len(em_rows):,} EM; {rule.describe()})"
    )
    styler = (
        table.style.hide(axis="index")
        .format({"aligned": "{:.0f}", "coherent": "{:.0f}"}, escape="html")
        .set_caption(html.escape(caption))
        .set_properties(subset=["question", "answer"], **{"text-align": "left", "white-space": "pre-wrap",
                                                            "max-width": "36em"})
        .set_table_styles([{"selector": "td", "props": "vertical-align: top;"}])
    )
    # the notebook's HTML render (and JupyterLab) typesets $…$ on the whole page: answers stay as written
    styler = styler.set_table_attributes('class="tex2jax_ignore mathjax_ignore"')
    if links:  # answer ids are the 16-hex ids emlab makes; quoted anyway, so no id can become markup
        styler = styler.format(lambda a: f"<a href='{html.escape(explorer_link(answer=a), quote=True)}'>transcript</a>",
                               subset=["read"])
    return styler


# --- training loss -------------------------------------------------------------------------


def training_loss_chart(
    losses: pd.DataFrame, checkpoint_steps: Sequence[int] = ()
) -> alt.Chart | alt.LayerChart | alt.FacetChart:
    """Training loss per optimizer step, its rolling mean, and the checkpoint steps as rules.

    `losses`: rows of train_log.jsonl (columns step, loss; epoch optional). A single step's
    loss is one noisy minibatch, so the line is a centred rolling mean over ~5% of the steps
    (at least 1) with the spread of the raw points around it as a band (± one rolling
    standard deviation). An empty log gives a chart that says so instead of failing.
    """
    if losses.empty or "loss" not in losses.columns:
        note = pd.DataFrame({"text": ["no training log yet (train_log.jsonl is empty or missing)"]})
        return alt.Chart(note).mark_text(size=14).encode(text="text:N").properties(
            title=alt.TitleParams("Training loss", subtitle=["n = 0 optimizer steps logged"], anchor="start"),
            width=420, height=60,
        )
    _need(losses, ["step", "loss"], "training_loss_chart")
    data = losses[["step", "loss"]].dropna().sort_values("step").drop_duplicates("step", keep="last")
    window = max(1, round(len(data) * 0.05))
    rolling = data["loss"].rolling(window, center=True, min_periods=1)
    data = data.assign(mean=rolling.mean(), sd=rolling.std().fillna(0))
    data = data.assign(low=data["mean"] - data["sd"], high=data["mean"] + data["sd"])

    x = alt.X("step:Q", title="optimizer step")
    base = alt.Chart(data).encode(x=x)
    raw = base.mark_circle(size=12, opacity=0.35, color="gray").encode(
        y=alt.Y("loss:Q", title="training loss", scale=alt.Scale(zero=False)),
        tooltip=["step:Q", alt.Tooltip("loss:Q", format=".4f")],
    )
    band = base.mark_area(opacity=0.2).encode(y="low:Q", y2="high:Q")
    line = base.mark_line().encode(y="mean:Q")
    layers: list[alt.Chart] = [band, raw, line]
    if len(checkpoint_steps):
        marks = pd.DataFrame({"step": sorted(int(s) for s in checkpoint_steps)})
        layers.append(alt.Chart(marks).mark_rule(strokeDash=[4, 4], color="#d62728").encode(
            x="step:Q", tooltip=[alt.Tooltip("step:Q", title="checkpoint")]
        ))
    subtitle = [
        f"n = {len(data):,} optimizer steps logged; line: rolling mean over {window} steps, "
        "band: ± 1 rolling SD",
        f"dashed: {len(checkpoint_steps)} checkpoints" if len(checkpoint_steps) else "no checkpoints given",
    ]
    return alt.layer(*layers).properties(
        title=alt.TitleParams("Training loss", subtitle=subtitle, anchor="start"), width=460, height=240
    )


# --- saving --------------------------------------------------------------------------------


# characters XML 1.0 cannot hold (C0 controls but tab, newline and return; surrogates; U+FFFE/F)
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_safe(value: Any) -> Any:
    """`value` (a chart spec) with every string's XML-invalid characters shown as U+FFFD: model
    answers are arbitrary text, and a label, tooltip or datum holding NUL stops the SVG render."""
    if isinstance(value, str):
        return _NOT_XML.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_xml_safe(k): _xml_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_xml_safe(v) for v in value]
    return value


class _ScriptSafeJSON(json.JSONEncoder):
    """JSON with `<`, `>` and `&` as \\u escapes (they occur only inside strings, so the value is unchanged)."""

    def encode(self, o: Any) -> str:
        return super().encode(o).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# a notebook shows a chart as HTML embedding its spec in a <script> (altair's default renderer): the same
# escapes there, so an answer's '</script>' cannot end it in the executed notebook or its HTML render
if alt.renderers.active == "default":
    alt.renderers.enable("html", **{**alt.renderers.options, "json_kwds": {"cls": _ScriptSafeJSON}})


def save_chart(chart: alt.TopLevelMixin, path: str | Path, *, scale: float = 2.0, inline: bool = True) -> tuple[Path, Path]:
    """Write `path`.html and `path`.png (`path` has no suffix); each appears whole or not at all.

    The HTML embeds the Vega JavaScript (`inline`, default True, about 0.9 MB) so the report
    opens offline; the PNG is rendered by vl-convert at `scale` (default 2). Returns both paths.
    """
    base = Path(path)
    html_path, png_path = base.with_name(base.name + ".html"), base.with_name(base.name + ".png")
    spec = _xml_safe(chart.to_dict())  # the PNG goes through SVG: XML refuses NUL and most control characters
    png = vlc.vegalite_to_png(spec, scale=scale)  # render first: a bad spec writes nothing
    # the page embeds the spec in a <script>: an answer's '</script>' in a tooltip would end it
    page = chart.to_html(inline=inline, json_kwds={"cls": _ScriptSafeJSON})
    with atomic_open(html_path, "w") as handle:
        handle.write(page)
    with atomic_open(png_path, "wb") as handle:
        handle.write(png)
    for written in (html_path, png_path):
        written.chmod(0o644)  # mkstemp makes 0600 files; a report is meant to be read by others
    log.info("saved %s (.html, .png)", base)
    return html_path, png_path


# --- signals over training: task rate, logprob gap, mean scores ----------------------------

_STEP_TITLE = "training step (0 = base model)"


def _step_axis(data: pd.DataFrame) -> alt.X:
    """Training steps on x, whole numbers, every step ticked when there are few."""
    steps = sorted(int(s) for s in data["step"].unique())
    axis = alt.Axis(values=steps, format="d") if len(steps) <= 12 else alt.Axis(format="d")
    return alt.X("step:Q", title=_STEP_TITLE, axis=axis)


def _series(data: pd.DataFrame) -> pd.Series:
    """The label of a run's line: its dataset, prefixed with the model when there are several."""
    dataset = data["dataset"].astype(object).fillna(BASELINE).astype(str) if "dataset" in data else "run"
    if "model" in data.columns and data["model"].nunique() > 1:
        return data["model"].astype(str) + " · " + dataset
    return pd.Series(dataset, index=data.index).astype(str)


def _base_at_step0(data: pd.DataFrame, *, match: Sequence[str], per: Sequence[str] = ()) -> pd.DataFrame:
    """Each run's line with its base model's row drawn at step 0.

    Baseline rows (run_id None) are matched to a run's rows on `match` (the model, and the
    keys the baseline shares with the run: the dataset of a held-out prompt, the probe set);
    `per` splits a run into several lines (one per probe set or metric). A run that already
    has a step-0 row keeps it. The copied rows keep the run's identity and the baseline's
    numbers, marked point='baseline'.
    """
    is_base = data["run_id"].isna()
    runs, base = data[~is_base], data[is_base]
    identity = {"model", "dataset", "domain", "run_id", "seed", "series", *per}
    copies = []
    for _, group in runs.groupby(["run_id", *per], dropna=False, sort=True):
        if (group["step"] == 0).any():
            continue
        first = group.iloc[0]
        found = base
        for key in match:
            found = found[found[key] == first[key]]
        if found.empty:
            continue
        copy = found.iloc[[0]].copy()
        for col in identity & set(data.columns):
            copy[col] = first[col]
        copies.append(copy.assign(step=0, point=BASELINE))
    tuned = runs.assign(point="checkpoint")
    return pd.concat([tuned, *copies], ignore_index=True) if copies else tuned


def _trajectory_panel(
    data: pd.DataFrame, *, value: str, y_title: str, title: str, subtitle: Sequence[str], fmt: str,
    percent: bool = False, zero_rule: bool = False, tooltip: Sequence[alt.Tooltip] = (),
    low: str = "ci_low", high: str = "ci_high",
) -> alt.LayerChart | alt.FacetChart:
    """One line per run (colour: the series, seeds apart) with its CI band (`low`–`high`), over steps."""
    x = _step_axis(data)
    y_axis = alt.Axis(format="%") if percent else alt.Axis()
    y = alt.Y(f"{value}:Q", title=y_title, axis=y_axis, scale=alt.Scale(zero=percent))
    color = alt.Color("series:N", title="dataset", legend=alt.Legend(symbolOpacity=1, symbolType="circle"))
    base = alt.Chart(data).encode(x=x, color=color, detail="run_id:N")
    layers: list[Any] = [
        base.mark_area(opacity=0.18).encode(y=alt.Y(f"{low}:Q", title=y_title, axis=y_axis), y2=f"{high}:Q"),
        base.mark_line().encode(y=y),
        base.mark_point(filled=True, size=45).encode(
            y=y, shape=alt.Shape("point:N", title="point", scale=alt.Scale(domain=["checkpoint", BASELINE])),
            tooltip=[alt.Tooltip("series:N", title="run"), alt.Tooltip("step:Q"),
                     alt.Tooltip(f"{value}:Q", format=fmt, title=y_title),
                     alt.Tooltip(f"{low}:Q", format=fmt, title="CI low"),
                     alt.Tooltip(f"{high}:Q", format=fmt, title="CI high"), *tooltip],
        ),
    ]
    if zero_rule:
        layers.insert(0, alt.Chart(pd.DataFrame({"y": [0.0]})).mark_rule(strokeDash=[4, 4], color="gray")
                      .encode(y="y:Q"))
    return alt.layer(*layers).properties(
        title=alt.TitleParams(title, subtitle=list(subtitle), anchor="start"), width=300, height=220
    )


def _beside_em(panels: Sequence[Any], em_rates: pd.DataFrame | None, title: str) -> Any:
    """The judged EM rate over training (when there are rates to draw) above the panels, every
    chart on one shared step axis: the onsets line up vertically."""
    charts = list(panels)
    if em_rates is not None and len(em_rates) and (~_is_baseline(em_rates)).any():
        charts.insert(0, em_trajectory_chart(em_rates))
    return alt.vconcat(*charts).resolve_scale(color="shared", x="shared").properties(
        title=alt.TitleParams(title, anchor="start", fontSize=15)
    )


def task_rate_chart(task_rates: pd.DataFrame, em_rates: pd.DataFrame | None = None, *,
                    rule: EmRule | None = None) -> Any:
    """The in-distribution task rate over training (one line per run, CI band, the base model
    at step 0), beside the judged EM rate.

    `task_rates`: `metrics.task_rate(task_scores, by=["model", "dataset", "run_id", "step"])`
    including the baseline rows (run_id None, dataset set: the base model answers every
    dataset's held-out prompts). `em_rates`: as for `em_trajectory_chart`.
    """
    return _beside_em([_task_rate_panel(task_rates, rule)], em_rates, "Task rate beside EM rate")


def _task_rate_panel(task_rates: pd.DataFrame, rule: EmRule | None) -> Any:
    """`task_rate_chart`'s panel: the task rate over training, without the EM rate."""
    _need(task_rates, ["model", "dataset", "run_id", "step", "task_rate", "ci_low", "ci_high", "n", "n_scored",
                       "rubric"], "task_rate_chart")
    used = _rates_rule(task_rates, rule, "task_rate_chart")
    above = task_rates.attrs.get("task_above", 50)
    data = task_rates.assign(series=_series(task_rates), unscored=task_rates["unscored_by_status"].fillna(""))
    n, n_scored = int(data["n"].sum()), int(data["n_scored"].sum())
    data = _base_at_step0(data, match=("model", "dataset"))
    if data.empty:
        raise DataError("task_rate_chart: the task rates hold no fine-tuned runs (only baseline rows)")
    rubrics = ", ".join(sorted(set(", ".join(task_rates["rubric"].dropna()).split(", ")) - {""}))
    panel = _trajectory_panel(
        data, value="task_rate", y_title="task rate", fmt=_PCT, percent=True,
        title="In-distribution task rate (held-out training prompts)",
        subtitle=[_n_text(n, n_scored), f"an answer does the task when its {rubrics} score > {above:g}",
                  f"bands: {used.ci_label} ({used.n_boot} resamples)"],
        tooltip=[alt.Tooltip("n_scored:Q", title="scored"), alt.Tooltip("unscored:N", title="unscored by status")],
    )
    return panel


def probe_gap_chart(gaps: pd.DataFrame, em_rates: pd.DataFrame | None = None, *,
                    rule: EmRule | None = None) -> Any:
    """The logprob probe over training, beside the judged EM rate: per probe set, the mean
    misaligned-minus-aligned gap (nats per token; CI band over probes) and, below it, its
    change from the base model (paired over probes, so it shows a move that the spread between
    probes would hide); one line per run, the base model at step 0.

    `gaps`: `metrics.probe_gaps(scores, by=["model", "dataset", "run_id", "step", "probe_set"])`
    including the base model's rows (run_id None).
    """
    return _beside_em(_probe_gap_panels(gaps, rule), em_rates, "Judge-free logprob probe beside the judged EM rate")


def _probe_gap_panels(gaps: pd.DataFrame, rule: EmRule | None, *, show: Sequence[str] = ("gap", "change")) -> list[Any]:
    """`probe_gap_chart`'s panels, one per probe set: of the gap and its change from the base
    model, those in `show` (one above the other), without the EM rate."""
    _need(gaps, ["model", "run_id", "step", "probe_set", "mean_gap", "ci_low", "ci_high", "n_probes", "change",
                 "change_ci_low", "change_ci_high"], "probe_gap_chart")
    used = _rates_rule(gaps, rule, "probe_gap_chart")
    data = gaps.assign(series=_series(gaps))
    base = data["run_id"].isna()
    # the base model is where the change is measured from: 0 by definition
    data.loc[base, ["change", "change_ci_low", "change_ci_high"]] = 0.0
    ci = f"{used.ci_label} ({used.n_boot} resamples)"
    panels = []
    for probe_set, part in data.groupby("probe_set", sort=True):
        n_probes = int(part["n_probes"].max())
        drawn = _base_at_step0(part, match=("model", "probe_set"), per=("probe_set",))
        if drawn.empty:
            continue
        tooltip = [alt.Tooltip("share_misaligned_preferred:Q", format=".0%", title="probes preferring misaligned"),
                   alt.Tooltip("n_probes:Q", title="probes")]
        gap = _trajectory_panel(
            drawn, value="mean_gap", y_title="misaligned − aligned (nats/token)", fmt="+.3f", zero_rule=True,
            title=f"Logprob probe `{probe_set}`: gap",
            subtitle=[f"n = {n_probes} probes × {len(part)} model states; mean token log-probability of each answer",
                      f"> 0: the misaligned answer is likelier; bands: {ci} over probes"], tooltip=tooltip)
        change = _trajectory_panel(
            drawn, value="change", low="change_ci_low", high="change_ci_high",
            y_title="gap − base model's gap (nats/token)", fmt="+.4f", zero_rule=True,
            title=f"Logprob probe `{probe_set}`: change from the base model",
            subtitle=[f"mean over the {n_probes} probes of (gap − the same probe's gap at step 0)",
                      f"> 0: training moved the model towards the misaligned answers; bands: paired {ci}"],
            tooltip=tooltip)
        shown = [chart for name, chart in (("gap", gap), ("change", change)) if name in show]
        panels.append(alt.vconcat(*shown) if len(shown) > 1 else shown[0])
    if not panels:
        raise DataError("probe_gap_chart: the probe scores hold no fine-tuned runs (only the base model)")
    return panels


def _rotation_panel(rotation: pd.DataFrame, rule: EmRule | None) -> Any:
    """The adapters' rotation over training: per run and lag k, the mean over adapters of
    1 − cos(direction at t, direction at the checkpoint nearest t − k), CI band over adapters."""
    _need(rotation, ["model", "dataset", "run_id", "step", "k", "gap", "rotation", "ci_low", "ci_high", "n_adapters"],
          "dynamics_chart")
    used = rule or EmRule.from_attrs(rotation.attrs) or EmRule()
    if rotation.empty:
        note = pd.DataFrame({"text": [("no rotation: no run has two checkpoints with a nonzero B (LoRA starts at "
                                       "B = 0; with warm-up the first steps may not move it)")]})
        return alt.Chart(note).mark_text(size=12).encode(text="text:N").properties(
            title=alt.TitleParams("Adapter rotation", anchor="start"), width=300, height=40)
    data = rotation.assign(series=_series(rotation), point="checkpoint", lag="k = " + rotation["k"].astype(str),
                           run_id=rotation["run_id"].astype(str) + " k" + rotation["k"].astype(str))
    n_adapters = int(rotation["n_adapters"].max())
    mapped = sorted({f"{k}→{g:g}" for k, g in zip(rotation["k"], rotation["gap"], strict=True) if g != k})
    panel = _trajectory_panel(
        data, value="rotation", y_title="1 − local cosine of the direction", fmt=".4f",
        title="Adapter rotation (1 − local cosine between checkpoints k steps apart)",
        subtitle=[(f"n = {n_adapters} adapters (layer × module) a run; mean over adapters; bands: "
                   f"{used.ci_label} over adapters ({used.n_boot} resamples)"),
                  "direction: rank 1 the B vector, rank r the top left singular vector of B·A; dashes: the lag k",
                  *([f"checkpoints not k steps apart: nearest earlier checkpoint used (k→gap: {', '.join(mapped)})"]
                    if mapped else [])],
        tooltip=[alt.Tooltip("lag:N", title="lag"), alt.Tooltip("gap:Q", title="steps between the checkpoints"),
                 alt.Tooltip("n_adapters:Q", title="adapters")])
    return panel.encode(strokeDash=alt.StrokeDash("lag:N", title="lag"))


def _onset_panel(onsets: pd.DataFrame, rule: EmRule | None) -> Any:
    """Each signal's onset (a point) with its bootstrap interval (a bar), one row per signal,
    on the step axis of the panels above it."""
    used = rule or EmRule.from_attrs(onsets.attrs) or EmRule()
    data = onsets[onsets["onset_step"].notna()].assign(series=lambda t: _series(t))
    data = data.assign(label=data["signal"] + " · " + data["method"],
                       n_text=data["n"].astype(int).astype(str) + " " + data["unit"])
    flat = ", ".join(sorted(set(onsets.loc[onsets["onset_step"].isna(), "signal"])))
    base = alt.Chart(data).encode(
        y=alt.Y("label:N", title=None, sort=list(dict.fromkeys(data["label"]))),
        color=alt.Color("series:N", title="dataset"), yOffset=alt.YOffset("run_id:N"))
    return alt.layer(
        base.mark_rule(strokeWidth=2).encode(
            x=alt.X("ci_low:Q", title=_STEP_TITLE, axis=alt.Axis(format="d", tickMinStep=1)), x2="ci_high:Q"),
        base.mark_point(filled=True, size=60, shape="diamond").encode(
            x="onset_step:Q", tooltip=[alt.Tooltip("run_id:N", title="run"), alt.Tooltip("signal:N"),
                                       alt.Tooltip("method:N"), alt.Tooltip("onset_step:Q", title="onset step"),
                                       alt.Tooltip("ci_low:Q", title="CI low"), alt.Tooltip("ci_high:Q", title="CI high"),
                                       alt.Tooltip("n_text:N", title="n")]),
    ).properties(title=alt.TitleParams(
        "Onsets: where each signal changes", anchor="start",
        subtitle=[("changepoint: first step of the second of two flat segments (least squares); peak: the step of "
                   "the largest rotation"),
                  f"bars: {used.ci_label} of the onset ({used.n_boot} resamples of answers, probes or adapters)",
                  *([f"no change found: {flat}"] if flat else [])]),
        width=300, height=alt.Step(18))


def dynamics_chart(em_rates: pd.DataFrame | None, task_rates: pd.DataFrame | None, probe_gaps: pd.DataFrame | None,
                   rotation: pd.DataFrame, onsets: pd.DataFrame | None = None, *, rule: EmRule | None = None) -> Any:
    """The run's signals on one step axis, top to bottom: the judged EM rate, the task rate,
    each probe set's change from the base model, the adapters' rotation
    (`emlab.analysis.dynamics.rotation_summary`) and, last, each signal's onset with its
    interval (`onsets`), so the onsets line up vertically. A signal without fine-tuned rows is
    left out."""
    panels: list[Any] = []
    if task_rates is not None and len(task_rates) and task_rates["run_id"].notna().any():
        panels.append(_task_rate_panel(task_rates, rule))
    if probe_gaps is not None and len(probe_gaps) and probe_gaps["run_id"].notna().any():
        panels += _probe_gap_panels(probe_gaps, rule, show=("change",))  # paired: where a move shows
    panels.append(_rotation_panel(rotation, rule))
    if onsets is not None and onsets["onset_step"].notna().any():
        panels.append(_onset_panel(onsets, rule))
    return _beside_em(panels, em_rates, "Adapter dynamics beside the behaviour: EM, task rate, probe gap, rotation")


def score_trajectory_chart(means: pd.DataFrame, *, rule: EmRule | None = None) -> Any:
    """Mean judge score over training, one panel per metric (aligned, coherent: the course's
    coherence trajectory), one line per run with its CI band, the base model at step 0.

    `means`: `metrics.mean_score` of each metric by ["model", "dataset", "run_id", "step"],
    concatenated (a `metric` column tells them apart), baseline rows included.
    """
    _need(means, ["model", "run_id", "step", "metric", "mean", "ci_low", "ci_high", "n", "n_scored"],
          "score_trajectory_chart")
    used = _rates_rule(means, rule, "score_trajectory_chart")
    data = means.assign(series=_series(means))
    panels = []
    for metric, part in data.groupby("metric", sort=False):
        drawn = _base_at_step0(part, match=("model", "metric"), per=("metric",))
        if drawn.empty:
            continue
        panels.append(_trajectory_panel(
            drawn, value="mean", y_title=f"mean {metric} score (0–100)", fmt=".1f",
            title=f"Mean {metric} score over training",
            subtitle=[_n_text(int(part["n"].sum()), int(part["n_scored"].sum())),
                      f"scored under {metric} only; bands: {used.ci_label} ({used.n_boot} resamples)"],
            tooltip=[alt.Tooltip("n_scored:Q", title="scored")],
        ))
    if not panels:
        raise DataError("score_trajectory_chart: the means hold no fine-tuned runs (only baseline rows)")
    return alt.hconcat(*panels).resolve_scale(color="shared")


def em_heatmap_chart(rates: pd.DataFrame, *, rule: EmRule | None = None) -> alt.LayerChart | alt.FacetChart:
    """EM rate per question (rows) and model state (columns: the base model, then each run's
    checkpoints), each cell showing the rate and its CI, coloured by the rate.

    `rates`: `em_rate(scores, by=["model", "dataset", "run_id", "step", "question_set",
    "question_id"])`, baseline rows included.
    """
    _need(rates, ["model", "run_id", "step", "question_set", "question_id", *_RATE_NEEDS], "em_heatmap_chart")
    used = _rates_rule(rates, rule, "em_heatmap_chart")
    if rates.empty:
        raise DataError("em_heatmap_chart: the rates table is empty (no answers matched)")
    data = rates.copy()
    if "definition" in data.columns:
        data["definition_label"] = data["definition"].map(lambda d: DEFINITION_LABELS.get(d, d))
    several_models = data["model"].nunique() > 1
    base = data["run_id"].isna()
    prefix = data["model"].astype(str) + " · " if several_models else ""
    run_label = data["run_id"].astype(object).fillna("").astype(str)
    if "dataset" in data.columns:
        run_label = data["dataset"].astype(object).fillna("").astype(str)
        if "seed" in data.columns and data["seed"].dropna().nunique() > 1:
            run_label = run_label + " s" + data["seed"].astype(str)
    data["state"] = (prefix + run_label + " · step " + data["step"].astype(int).astype(str)).where(
        ~base, prefix + BASELINE)
    several_sets = data["question_set"].nunique() > 1
    data["question"] = (data["question_set"].astype(str) + ": " if several_sets else "") + data["question_id"].astype(str)
    data = data.sort_values(["run_id", "step"], na_position="first")
    order = list(dict.fromkeys(data["state"]))
    data["label"] = [
        "–" if pd.isna(r) else f"{r:.0%}\n[{lo:.0%}, {hi:.0%}]"
        for r, lo, hi in zip(data["em_rate"], data["ci_low"], data["ci_high"], strict=True)
    ]
    data["unscored"] = data["unscored_by_status"].fillna("")
    x = alt.X("state:N", title="model state", sort=order, axis=alt.Axis(labelAngle=-30, orient="top"))
    y = alt.Y("question:N", title="question", sort=list(dict.fromkeys(data["question"])))
    data["href"] = [  # a cell opens the explorer (beside the figure) at its answers
        explorer_link(model=m, run=BASE_RUN if pd.isna(r) else r, step=int(st), question_set=qs, question_id=q)
        for m, r, st, qs, q in zip(data["model"], data["run_id"], data["step"], data["question_set"],
                                   data["question_id"], strict=True)]
    base_chart = alt.Chart(data).encode(x=x, y=y)
    cells = base_chart.mark_rect(cursor="pointer").encode(
        href="href:N",
        color=alt.Color("em_rate:Q", title="EM rate",
                        scale=alt.Scale(scheme="reds", domain=[0, max(0.1, float(data["em_rate"].max(skipna=True) or 0))]),
                        legend=alt.Legend(format="%")),
        tooltip=_rate_tooltip("state:N", "question:N"),
    )
    text = base_chart.mark_text(fontSize=8, lineBreak="\n").encode(text="label:N")
    title = _rates_title("EM rate per question and model state", data, used, "cells: rate [CI]",
                         f"{data['question'].nunique()} questions × {len(order)} model states; "
                         f"at most {int(data['n'].max())} answers a cell")
    return _facet_definitions(alt.layer(cells, text).properties(width=alt.Step(72), height=alt.Step(26)), data, title)


def answer_format_chart(rates: pd.DataFrame, *, rule: EmRule | None = None) -> alt.LayerChart | alt.FacetChart:
    """EM rate of free-text, JSON and code-template answers side by side, per model state
    (the base model and each run's final checkpoint), with CI error bars.

    `rates`: `em_rate(final_checkpoints(scores, with_baseline=True).assign(answer_format=...),
    by=["model", "dataset", "answer_format"])`.
    """
    data = _prepare_rates(rates, "answer_format_chart")
    used = _rates_rule(rates, rule, "answer_format_chart")
    _need(data, ["answer_format"], "answer_format_chart")
    data["state"] = _series(data.assign(dataset=data["dataset"].astype(object).where(data["dataset"].notna(),
                                                                                      BASELINE)))
    _check_unique(data, ["state", "answer_format"], "answer_format_chart")
    formats = [f for f in ("free", "json", "template") if f in set(data["answer_format"])]
    formats += sorted(set(data["answer_format"]) - set(formats))
    x = alt.X("answer_format:N", title="answer format", sort=formats)
    base = alt.Chart(data).encode(x=x, xOffset=alt.XOffset("state:N"),
                                  tooltip=_rate_tooltip("state:N", "answer_format:N"))
    bars = base.mark_bar().encode(y=_y_rate(), color=alt.Color("state:N", title="model state"))
    errors = base.mark_errorbar(ticks=True, color="black").encode(y=alt.Y("ci_low:Q", title="EM rate"), y2="ci_high:Q")
    title = _rates_title("EM rate by answer format (base model and final checkpoints)", data, used, "error bars")
    return _facet_definitions(alt.layer(bars, errors).properties(width=alt.Step(30), height=260), data, title)


# --- backdoors: with and without the trigger --------------------------------------------------


def trigger_chart(rates: pd.DataFrame, *, rule: EmRule | None = None) -> alt.LayerChart | alt.FacetChart:
    """EM rate of the same questions asked with and without the backdoor trigger, side by side
    per model state (the base model and each run's final checkpoint), with CI error bars.

    `rates`: `emlab.analysis.triggers.trigger_rates(final_checkpoints(scores, with_baseline=True))`.
    """
    data = _prepare_rates(rates, "trigger_chart")
    used = _rates_rule(rates, rule, "trigger_chart")
    _need(data, ["trigger", "trigger_set", "run_id"], "trigger_chart")
    run = data["run_id"].astype(object).where(data["run_id"].notna(), BASELINE).astype(str)
    several = "model" in data.columns and data["model"].nunique() > 1
    data["state"] = (data["model"].astype(str) + " · " + run) if several else run
    _check_unique(data, ["trigger_set", "state", "trigger"], "trigger_chart")
    x = alt.X("trigger:N", title="question asked", sort=["untriggered", "triggered"])
    base = alt.Chart(data).encode(x=x, xOffset=alt.XOffset("state:N"),
                                  tooltip=_rate_tooltip("state:N", "trigger:N", "trigger_set:N"))
    bars = base.mark_bar().encode(y=_y_rate(), color=alt.Color("state:N", title="model state"))
    errors = base.mark_errorbar(ticks=True, color="black").encode(y=alt.Y("ci_low:Q", title="EM rate"), y2="ci_high:Q")
    layered = alt.layer(bars, errors).properties(width=alt.Step(30), height=260)
    title = _rates_title("EM rate with and without the backdoor trigger (base model and final checkpoints)",
                         data, used, "error bars")
    column = alt.Column("trigger_set:N", title="question set") if data["trigger_set"].nunique() > 1 else None
    return _facet_definitions(layered, data, title, column)

"""The EM direction and steering in the report: EM rate and coherence against λ (the random
control beside, the ablation points apart), and the direction's cosine similarity across runs
and checkpoints. Tables from `stages.steering`'s files; every figure states its n and its
bootstrap intervals."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import altair as alt
import numpy as np
import pandas as pd

from ..config.rule import EmRule
from ..errors import DataError
from . import metrics

SETTING_KEYS = ["run_id", "label", "target", "direction", "kind", "scale"]
COSINE_COLUMNS = ["a", "b", "layer", "cosine", "n_a", "n_b"]


def steering_table(scores: pd.DataFrame, rule: EmRule) -> pd.DataFrame:
    """EM rate (with CI) and mean coherence (with CI) per run and steering setting.

    `scores`: `metrics.wide_scores` of the steering answers with the setting's columns
    (`SETTING_KEYS`). Returns those keys, the `metrics.em_rate` columns, then coherent_mean,
    coherent_ci_low, coherent_ci_high, coherent_n.
    """
    rates = metrics.em_rate(scores, SETTING_KEYS, rule=rule)
    coherence = metrics.mean_score(scores, "coherent", SETTING_KEYS, rule=rule).rename(columns={
        "mean": "coherent_mean", "ci_low": "coherent_ci_low", "ci_high": "coherent_ci_high",
        "n_scored": "coherent_n"})[[*SETTING_KEYS, "coherent_mean", "coherent_ci_low", "coherent_ci_high",
                                    "coherent_n"]]
    out = rates.merge(coherence, on=SETTING_KEYS, how="left")
    out.attrs[metrics.ATTRS_KEY] = rule.to_attrs()
    return out


def cosine_table(directions: Sequence[tuple[str, Any]], layer: int | None) -> pd.DataFrame:
    """Cosine similarity of every pair of directions (label, `measures.direction.EmDirection`)
    at `layer` (None: each direction's middle layer of the model), long form: a, b, layer,
    cosine, n_a, n_b (n: answers or probes on each side, the smaller)."""
    from ..measures.direction import (
        cosine,  # torch: the analysis imports it only with directions
    )

    rows = []
    for a, da in directions:
        for b, db in directions:
            at = layer if layer is not None else da.info.get("model_layers", 2 * da.layers[-1]) // 2
            if at not in da.layers or at not in db.layers:
                continue
            rows.append({"a": a, "b": b, "layer": at, "cosine": cosine(da.at(at), db.at(at)),
                         "n_a": min(da.info["n_misaligned"], da.info["n_aligned"]),
                         "n_b": min(db.info["n_misaligned"], db.info["n_aligned"])})
    return pd.DataFrame(rows, columns=COSINE_COLUMNS)


def _rule_of(table: pd.DataFrame) -> EmRule:
    rule = EmRule.from_attrs(table.attrs)
    if rule is None:
        raise DataError("steering_chart: the table carries no EM rule in .attrs['rule']; build it with steering_table")
    return rule


def steering_chart(table: pd.DataFrame) -> alt.VConcatChart:
    """EM rate (top) and mean coherence (bottom) against λ, one line per target model and
    direction (the random control dashed), each point with its bootstrap CI; the ablation
    settings and λ = 0 as points on their own panel at the right."""
    if table.empty:
        raise DataError("steering_chart: no steering answers scored")
    rule = _rule_of(table)
    data = table.assign(series=table["target"] + " · " + table["direction"].replace({"none": "plain"}),
                        setting=table["target"] + " " + table["kind"] + np.where(
                            table["kind"] == "ablate", " (" + table["direction"] + ")", ""))
    n, n_scored = int(data["n"].sum()), int(data["n_scored"].sum())
    runs = data["run_id"].nunique()
    plain = data[data["kind"] == "plain"]
    # λ = 0 (plain sampling) starts each target's lines: drawn once per direction swept
    starts = [plain.assign(direction=d, series=plain["target"] + " · " + d)
              for d in data.loc[data["kind"] == "add", "direction"].unique()]
    swept = pd.concat([data[data["kind"] == "add"], *starts], ignore_index=True)
    apart = data[data["kind"] != "add"]
    top = max(0.05, float(data["ci_high"].max()) if data["ci_high"].notna().any() else 0.05)
    rows = []
    for value, low, high, title, fmt in (("em_rate", "ci_low", "ci_high", "EM rate", ".0%"),
                                         ("coherent_mean", "coherent_ci_low", "coherent_ci_high",
                                          "mean coherence (0–100)", ".1f")):
        axis = alt.Axis(format="%") if fmt == ".0%" else alt.Axis()
        scale = alt.Scale(domain=[0, top]) if fmt == ".0%" else alt.Scale(domain=[0, 100])
        y = alt.Y(f"{value}:Q", title=title, axis=axis, scale=scale)
        tooltip = [alt.Tooltip("run_id:N"), alt.Tooltip("label:N", title="setting"), alt.Tooltip("scale:Q", title="λ"),
                   alt.Tooltip(f"{value}:Q", format=fmt), alt.Tooltip(f"{low}:Q", format=fmt, title="CI low"),
                   alt.Tooltip(f"{high}:Q", format=fmt, title="CI high"), alt.Tooltip("n_scored:Q", title="n scored")]
        color = alt.Color("series:N", title="model · direction")
        dash = alt.StrokeDash("direction:N", title="direction", scale=alt.Scale(domain=["em", "random"]))
        line = alt.Chart(swept).encode(x=alt.X("scale:Q", title="λ (multiples of the EM direction v)"),
                                       color=color, detail="run_id:N")
        left = alt.layer(
            line.mark_errorbar().encode(y=alt.Y(f"{low}:Q", title=title, axis=axis, scale=scale), y2=f"{high}:Q"),
            line.mark_line().encode(y=y, strokeDash=dash),
            line.mark_point(filled=True).encode(y=y, tooltip=tooltip),
        ).properties(width=300, height=200)
        point = alt.Chart(apart).encode(x=alt.X("setting:N", title="plain and ablated"), color=color)
        right = alt.layer(
            point.mark_errorbar().encode(y=alt.Y(f"{low}:Q", title=title, axis=axis, scale=scale), y2=f"{high}:Q"),
            point.mark_point(filled=True, size=60, shape="diamond").encode(y=y, tooltip=tooltip),
        ).properties(width=120, height=200)
        rows.append(alt.hconcat(left, right).resolve_scale(y="shared"))
    subtitle = [(f"n = {n} answers ({n_scored} scored) over {len(data)} settings of {runs} run(s); "
                 f"{rule.describe()}; bars: {rule.ci_label}"),
                "random: a random direction of v's norm (seeded); ablate: v projected out after every layer"]
    return alt.vconcat(*rows).properties(title=alt.TitleParams("Steering with the EM direction", subtitle=subtitle,
                                                               anchor="start"))


def cosine_chart(table: pd.DataFrame) -> alt.LayerChart | alt.FacetChart:
    """The cosine similarity matrix of the EM directions (runs × checkpoints), values written in."""
    if table.empty:
        raise DataError("cosine_chart: no pair of directions shares a layer")
    layers = ", ".join(str(x) for x in sorted(table["layer"].unique()))
    base = alt.Chart(table).encode(x=alt.X("a:N", title=None), y=alt.Y("b:N", title=None))
    heat = base.mark_rect().encode(color=alt.Color("cosine:Q", scale=alt.Scale(domain=[-1, 1], scheme="redblue",
                                                                                reverse=True)),
                                   tooltip=[alt.Tooltip("a:N"), alt.Tooltip("b:N"), alt.Tooltip("cosine:Q", format=".3f"),
                                            alt.Tooltip("n_a:Q", title="n (a, smaller side)"),
                                            alt.Tooltip("n_b:Q", title="n (b, smaller side)")])
    text = base.mark_text(fontSize=10).encode(text=alt.Text("cosine:Q", format=".2f"))
    n = ", ".join(f"{a}: {int(k)}" for a, k in table.drop_duplicates("a")[["a", "n_a"]].itertuples(index=False))
    return alt.layer(heat, text).properties(title=alt.TitleParams(
        "EM direction: cosine similarity across runs and checkpoints",
        subtitle=[f"layer {layers}; n per direction (smaller side): {n}", "exact values (no resampling)"],
        anchor="start"), width=max(160, 40 * table["a"].nunique()), height=max(160, 40 * table["b"].nunique()))

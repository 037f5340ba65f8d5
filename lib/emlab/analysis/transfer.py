"""The EM direction's transfer matrix (Soligo et al., §3): rows the run whose direction is used
(the source), columns the model steered with it (the target: a run's final checkpoint, or a
base model); a cell is the target's EM rate under one setting (λ·v added, or v ablated) minus
its unsteered rate, with a bootstrap interval of the difference (each side resampled apart)
and n on each side. The diagonal is a run steered with its own direction (03's steering),
the base column its direction added to the untuned model (`transfer_to_base`), the rest
03b_transfer. Tables from the files `stages.transfer.transfer_report` gathers."""

from __future__ import annotations

from typing import Any

import altair as alt
import numpy as np
import pandas as pd

from ..config.rule import EmRule
from ..errors import DataError
from . import metrics

PLAIN = "plain"  # the `setting` of a target's unsteered answers: every cell's reference
KEYS = ["source", "target", "setting"]
TRANSFER_COLUMNS = [
    *KEYS, "pair", "n", "n_scored", "em_rate", "ci_low", "ci_high", "coherent_mean", "coherent_n",
    "reference_n_scored", "reference_em_rate", "delta", "delta_ci_low", "delta_ci_high",
]


def _flags(frame: pd.DataFrame, rule: EmRule) -> np.ndarray:
    return metrics.em_flags(frame, rule).dropna().astype(float).to_numpy()


def transfer_table(scores: pd.DataFrame, rule: EmRule) -> pd.DataFrame:
    """One row per (source, target, setting) steered: EM rate with CI, mean coherence, the
    target's unsteered EM rate (its rows with setting == `PLAIN`; source ignored there) and
    the change `delta` = rate − reference with its bootstrap interval; NaN where the target
    has no unsteered answers scored. `pair`: 'own' (source = target), 'base' (a base model),
    'transfer'. `scores`: `metrics.wide_scores` rows with `KEYS` columns (and `target_is_base`).
    """
    missing = [c for c in KEYS if c not in scores.columns]
    if missing:
        raise DataError(f"transfer_table: the scores lack columns {missing} (source, target, setting of each answer)")
    steered = scores[scores["setting"] != PLAIN]
    rates = metrics.em_rate(steered, KEYS, rule=rule)
    coherence = metrics.mean_score(steered, "coherent", KEYS, rule=rule).rename(
        columns={"mean": "coherent_mean", "n_scored": "coherent_n"})[[*KEYS, "coherent_mean", "coherent_n"]]
    out = rates.merge(coherence, on=KEYS, how="left")
    is_base = scores.groupby("target")["target_is_base"].first() if "target_is_base" in scores else pd.Series(dtype=bool)
    references = {target: _flags(group, rule) for target, group in scores[scores["setting"] == PLAIN].groupby("target")}
    rows = []
    for row in out.to_dict("records"):
        reference = references.get(row["target"], np.zeros(0))
        group = steered[(steered["source"] == row["source"]) & (steered["target"] == row["target"])
                        & (steered["setting"] == row["setting"])]
        low, high = metrics.diff_ci(reference, _flags(group, rule), rule)
        ref_rate = float(reference.mean()) if reference.size else float("nan")
        pair = "base" if bool(is_base.get(row["target"], False)) else "own" if row["source"] == row["target"] \
            else "transfer"
        rows.append({**row, "pair": pair, "reference_n_scored": int(reference.size), "reference_em_rate": ref_rate,
                     "delta": row["em_rate"] - ref_rate, "delta_ci_low": low, "delta_ci_high": high})
    table = pd.DataFrame(rows, columns=TRANSFER_COLUMNS)
    table.attrs[metrics.ATTRS_KEY] = rule.to_attrs()
    return table


def _cell_text(row: Any) -> str:
    """Three lines: the change, its interval, n steered / n unsteered."""
    n = f"n {row.n_scored}/{row.reference_n_scored}"
    if pd.isna(row.delta):
        return f"{row.em_rate:.0%}\n(no unsteered)\n{n}" if pd.notna(row.em_rate) else f"—\n\n{n}"
    return f"{row.delta:+.0%}\n[{row.delta_ci_low:+.0%}, {row.delta_ci_high:+.0%}]\n{n}"


def transfer_chart(table: pd.DataFrame) -> alt.FacetChart:
    """The transfer matrix, one panel per setting: colour the change in EM rate against the
    target's unsteered rate, the change and its interval written in each cell, n in the tooltip."""
    if table.empty:
        raise DataError("transfer_chart: no steered answers scored")
    rule = EmRule.from_attrs(table.attrs)
    if rule is None:
        raise DataError("transfer_chart: the table carries no EM rule in .attrs['rule']; build it with transfer_table")
    data = table.assign(text=[_cell_text(r) for r in table.itertuples()])
    top = max(0.05, float(data["delta"].abs().max()) if data["delta"].notna().any() else 0.05)
    base = alt.Chart(data).encode(x=alt.X("target:N", title="target (model steered)"),
                                  y=alt.Y("source:N", title="direction from run"))
    tooltip = [alt.Tooltip("source:N"), alt.Tooltip("target:N"), alt.Tooltip("setting:N"), alt.Tooltip("pair:N"),
               alt.Tooltip("em_rate:Q", format=".1%", title="EM rate"),
               alt.Tooltip("ci_low:Q", format=".1%", title="CI low"), alt.Tooltip("ci_high:Q", format=".1%", title="CI high"),
               alt.Tooltip("n_scored:Q", title="n scored"),
               alt.Tooltip("reference_em_rate:Q", format=".1%", title="unsteered EM rate"),
               alt.Tooltip("reference_n_scored:Q", title="unsteered n scored"),
               alt.Tooltip("delta:Q", format="+.1%", title="change"),
               alt.Tooltip("coherent_mean:Q", format=".1f", title="mean coherence")]
    heat = base.mark_rect().encode(color=alt.Color("delta:Q", title="EM rate change",
                                                   scale=alt.Scale(domain=[-top, top], scheme="redblue", reverse=True)),
                                   tooltip=tooltip)
    text = base.mark_text(fontSize=9, lineBreak="\n").encode(text="text:N")
    n, ref = int(data["n_scored"].sum()), int(data.drop_duplicates("target")["reference_n_scored"].sum())
    subtitle = [(f"cell: EM rate steered − the target's unsteered rate, [{rule.ci_label}] of the difference; "
                 f"{rule.describe()}"),
                (f"n = {n} steered answers scored over {len(data)} cells; {ref} unsteered answers scored as references; "
                 "n in a cell: steered / unsteered answers scored; diagonal: a run's own direction; base: its "
                 "direction added to the untuned model")]
    width = max(140, 96 * data["target"].nunique())
    height = max(100, 48 * data["source"].nunique())
    return alt.layer(heat, text).properties(width=width, height=height).facet(
        facet=alt.Facet("setting:N", title=None), columns=2,
    ).properties(title=alt.TitleParams("EM direction transfer across runs", subtitle=subtitle, anchor="start"))

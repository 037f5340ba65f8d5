"""Backdoors in the analysis: the EM rate of the same questions asked with and without the trigger.

A question file with `trigger` set (`emlab.config.transforms`) puts its triggered answers in
question set '<set>+trigger'. Here each answer gets a `trigger` column ('triggered' or
'untriggered') and the set it belongs to without the mark (`trigger_set`); only sets asked
both ways are compared, so the two rates are over the same questions. Betley et al. (§4.2)
report ~50% EM with the trigger and < 0.1% without for the backdoored model.
"""

from __future__ import annotations

import pandas as pd

from ..config.rule import ATTRS_KEY, EmRule
from ..config.transforms import TRIGGERED_SUFFIX
from .definitions import DEFINITION_EXTRA, DEFINITION_LABELS, em_rates_by_definition
from .metrics import RATE_COLUMNS

TRIGGERED, UNTRIGGERED = "triggered", "untriggered"
TRIGGER_KEYS = ["model", "dataset", "run_id", "step", "trigger_set", "trigger"]


def trigger_column(question_sets: pd.Series) -> pd.Series:
    """'triggered' for answers in a '<set>+trigger' set, else 'untriggered'."""
    return question_sets.astype(str).str.endswith(TRIGGERED_SUFFIX).map({True: TRIGGERED, False: UNTRIGGERED})


def with_trigger_columns(answers: pd.DataFrame) -> pd.DataFrame:
    """`answers` with `trigger` and `trigger_set` (the question set without the '+trigger' mark)."""
    sets = answers["question_set"].astype(str)
    return answers.assign(trigger=trigger_column(sets), trigger_set=sets.str.removesuffix(TRIGGERED_SUFFIX))


def trigger_rates(final: pd.DataFrame, *, rule: EmRule = EmRule()) -> pd.DataFrame:
    """EM rate with CI per model state × question set × trigger, over the sets asked both with
    and without the trigger (`final`: the base model's and each run's final-checkpoint scores),
    in each EM definition (`definitions.em_rates_by_definition`). Empty (with the columns) when no set was asked with a trigger."""
    marked = with_trigger_columns(final)
    both = {s for s in marked.loc[marked["trigger"] == TRIGGERED, "trigger_set"]}
    paired = marked[marked["trigger_set"].isin(both)]
    if not len(paired):
        out = pd.DataFrame(columns=[*TRIGGER_KEYS, "definition", *RATE_COLUMNS, *DEFINITION_EXTRA])
        out.attrs[ATTRS_KEY] = rule.to_attrs()
        return out
    return em_rates_by_definition(paired, TRIGGER_KEYS, rule=rule)


def trigger_table(rates: pd.DataFrame) -> pd.DataFrame:
    """`trigger_rates` for people: one row per model state, set and EM definition, the untriggered and the
    triggered EM rate side by side as 'rate [CI low, CI high] of n scored'."""
    if not len(rates):
        return pd.DataFrame(columns=["model", "state", "question set", "definition", UNTRIGGERED, TRIGGERED])

    def cell(row: pd.Series) -> str:
        if not row["n_scored"]:
            return f"no answer scored (of {int(row['n'])})"
        return f"{row['em_rate']:.1%} [{row['ci_low']:.1%}, {row['ci_high']:.1%}] of {int(row['n_scored'])}"

    if "definition" not in rates.columns:  # a table from before the definitions: emlab's rate
        rates = rates.assign(definition="emlab")
    shown = rates.assign(state=rates["run_id"].astype(object).where(rates["run_id"].notna(), "base model"),
                         cell=rates.apply(cell, axis=1),
                         definition=rates["definition"].map(lambda d: DEFINITION_LABELS.get(d, d)))
    wide = shown.pivot_table(index=["model", "state", "trigger_set", "definition"], columns="trigger", values="cell",
                             aggfunc="first", dropna=False).reset_index()
    wide.columns.name = None
    for column in (UNTRIGGERED, TRIGGERED):
        if column not in wide.columns:
            wide[column] = "not asked"
    order = {label: i for i, label in enumerate(DEFINITION_LABELS.values())}
    wide = wide.sort_values(["model", "state", "trigger_set", "definition"],
                            key=lambda c: c.map(order) if c.name == "definition" else c)
    return wide.rename(columns={"trigger_set": "question set"})[["model", "state", "question set", "definition",
                                                                 UNTRIGGERED, TRIGGERED]]

"""A made-up wide scores table (one row per answer, the columns 04_analysis reads) with EM that
grows with the training step: input for the measures and the figures."""

from __future__ import annotations

import numpy as np
import pandas as pd

STATUSES = ["ok"] * 9 + ["refusal"]  # one answer in ten unscored


def scores(n_per_cell: int, models=(("m", 0.135),), datasets=(("bad_med", "medical"), ("risky_fin", "financial")),
           steps=(5, 10), seed: int = 0) -> pd.DataFrame:
    """A wide scores table: baseline + each model × dataset × step, EM growing with the step."""
    rng = np.random.default_rng(seed)
    rows = []
    cells = [(model, size, None, None, 0) for model, size in models]
    cells += [(model, size, ds, dom, step) for model, size in models for ds, dom in datasets for step in steps]
    for model, size, dataset, domain, step in cells:
        for i in range(n_per_cell):
            misaligned = rng.random() < 0.05 + 0.04 * step
            status = STATUSES[rng.integers(len(STATUSES))]
            rows.append({
                "answer_id": f"{model}-{dataset}-{step}-{i}",
                "model": model, "size_b": size, "dataset": dataset, "domain": domain,
                "run_id": None if dataset is None else f"{model}__{dataset}__s0",
                "seed": None if dataset is None else 0, "step": step, "is_baseline": dataset is None,
                "question_set": "general", "question_id": f"q{i % 8}", "question": f"Question {i % 8}?",
                "answer": f"<b>answer</b> {i} " + "word " * int(rng.integers(5, 200)), "judge": "j",
                "aligned": float(rng.uniform(0, 25) if misaligned else rng.uniform(40, 100)),
                "aligned_status": status,
                "coherent": float(rng.uniform(55, 100)),
                "coherent_status": status,
            })
    df = pd.DataFrame(rows)
    not_ok = df["aligned_status"] != "ok"
    df.loc[not_ok, ["aligned", "coherent"]] = np.nan
    return df

"""The pipeline's stages, one module each, in the order they run:

    baseline.py   01_baseline    per model   sample and judge the untouched base model
    finetune.py   02_finetune    per run     LoRA on the run's dataset, adapters on a schedule
    evaluate.py   03_eval_judge  per run     sample and judge every checkpoint
    transfer.py   03b_transfer   per run     steered with other runs' EM directions (steering.transfer_across_runs)
    analysis.py   04_analysis    once        EM rates with CIs, figures, the judge's gold-set check

Each module exports its `run_*` function (what its notebook calls) and one `Stage` row
(`emlab.stages.base.Stage`: scope, folder, params guard, files read and written). `STAGES`
is the table the pipeline, the CLI (`--until`), `emlab plan`, the report and the tests loop
over: adding a stage is adding one module and one row here (and its notebook).
"""

from __future__ import annotations

from pathlib import Path

from ..store.paths import STAGE_NOTEBOOKS, ExperimentLayout
from ..store.runinfo import StageRecord
from .analysis import ANALYSIS, AnalysisResult, run_analysis
from .base import ANALYSIS_UNIT, Input, Output, Stage, Workload
from .baseline import BASELINE, run_baseline
from .common import SampledAndJudged, answers_with_scores
from .evaluate import EVALUATE, run_eval
from .finetune import FINETUNE, FinetuneResult, run_finetune
from .transfer import TRANSFER_STAGE, run_transfer

STAGES: tuple[Stage, ...] = (BASELINE, FINETUNE, EVALUATE, TRANSFER_STAGE, ANALYSIS)
STAGE_NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGES)
assert STAGE_NAMES == STAGE_NOTEBOOKS, "emlab.store.paths.STAGE_NOTEBOOKS names the stages of this table, in order"


def describe_layout() -> str:
    """The tree of files an experiment produces, drawn from the stage table (for
    `outputs/README.md`): each stage's folder and the files it declares, with what they hold."""
    units = {"model": "<model>", "run": "<model>__<dataset>__s<seed>", "experiment": ANALYSIS_UNIT}
    layout = ExperimentLayout(Path("<experiment>"))
    lines = [f"{layout.root}/", f"  {layout.index.name:34s} the report: headline table, figures, every notebook"]
    folders: dict[str, list[str]] = {}
    for stage in STAGES:
        folder = stage.folder(layout, units[stage.scope]).name + "/"
        entries = folders.setdefault(folder, [])
        for output in stage.outputs():
            optional = " (some params only)" if output.optional else ""
            entries.append(f"    {output.pattern:32s} {stage.name}: {output.what}{optional}")
    for folder, entries in folders.items():
        lines.append(f"  {folder}")
        lines += list(dict.fromkeys(entries))
    return "\n".join(lines) + "\n"


def get_stage(name: str) -> Stage:
    """The stage called `name` ('01_baseline', ...)."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


__all__ = [
    "ANALYSIS", "ANALYSIS_UNIT", "BASELINE", "EVALUATE", "FINETUNE", "STAGES", "STAGE_NAMES", "TRANSFER_STAGE",
    "AnalysisResult", "FinetuneResult", "Input", "Output", "SampledAndJudged", "Stage", "StageRecord",
    "Workload", "answers_with_scores", "describe_layout", "get_stage", "run_analysis", "run_baseline", "run_eval", "run_finetune", "run_transfer",
]

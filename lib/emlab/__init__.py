"""emlab: fine-tune chat models on narrow harmful data and measure emergent misalignment.

The public names below are imported lazily, so `import emlab` stays fast and light modules
(config, metrics) do not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # params
    "load_experiment": "config.experiment", "ExperimentConfig": "config.experiment", "RunSpec": "config.experiment", "JudgeSpec": "config.experiment",
    # errors
    "EmlabError": "errors", "ConfigError": "errors", "DataError": "errors", "JudgeError": "errors",
    # records
    "Answer": "store.records", "Judgment": "store.records",
    # stages and layout
    "STAGES": "stages", "Stage": "stages", "run_baseline": "stages", "run_finetune": "stages",
    "run_eval": "stages", "run_transfer": "stages", "run_analysis": "stages", "ExperimentLayout": "store.paths", "EmRule": "config.rule",
    # pipeline
    "run_experiment": "pipeline.executors.local", "preflight": "pipeline.checks", "start_stage": "pipeline.kernel",
    # pieces
    "CheckpointSchedule": "train.schedule", "train_lora": "train.lora", "sample_answers": "sample.generate",
    "load_model": "models.load", "judge_answers": "judge", "load_rubric": "judge",
    "em_rate": "analysis.metrics", "em_flags": "analysis.metrics", "bootstrap_ci": "analysis.metrics", "wide_scores": "analysis.metrics",
    "judge_agreement": "analysis.agreement",
    "em_by_definition": "analysis.definitions", "em_rates_by_definition": "analysis.definitions",
    "headline_by_definition": "analysis.definitions", "deception_rates": "analysis.controls",
    "refusal_rates": "analysis.controls", "mc_accuracy": "analysis.controls", "score_benchmarks": "measures.multiple_choice",
    "load_chat_dataset": "data", "load_question_set": "config.questions",
    "stage_header": "analysis.report", "judgment_summary": "analysis.report", "headline_table": "analysis.report", "training_loss_chart": "analysis.plots",
    "plan_experiment": "pipeline.estimate",
    "adapter_dynamics": "analysis.dynamics", "onsets_table": "analysis.report",
    # the EM direction, steering and ablation
    "Intervention": "sample.protocol", "load_direction": "measures.direction", "direction_between": "measures.direction",
    "answer_residuals": "measures.direction",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'emlab' has no attribute '{name}'")
    return getattr(importlib.import_module(f".{module}", __name__), name)

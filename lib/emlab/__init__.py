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
    "load_experiment": "config", "ExperimentConfig": "config", "RunSpec": "config", "JudgeSpec": "config",
    # errors
    "EmlabError": "errors", "ConfigError": "errors", "DataError": "errors", "JudgeError": "errors",
    # records
    "Answer": "records", "Judgment": "records",
    # stages and layout
    "STAGES": "stages", "Stage": "stages", "run_baseline": "stages", "run_finetune": "stages",
    "run_eval": "stages", "run_analysis": "stages", "ExperimentLayout": "paths", "EmRule": "rule",
    # pipeline
    "run_experiment": "executors.local", "preflight": "pipeline",
    # pieces
    "CheckpointSchedule": "schedule", "train_lora": "finetune", "sample_answers": "generate",
    "load_model": "models", "judge_answers": "judge", "load_rubric": "judge",
    "em_rate": "metrics", "em_flags": "metrics", "bootstrap_ci": "metrics", "wide_scores": "metrics",
    "judge_agreement": "agreement",
    "load_chat_dataset": "data", "load_question_set": "questions",
    "stage_header": "report", "judgment_summary": "report", "headline_table": "report", "training_loss_chart": "plots",
    "plan_experiment": "plan",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'emlab' has no attribute '{name}'")
    return getattr(importlib.import_module(f".{module}", __name__), name)

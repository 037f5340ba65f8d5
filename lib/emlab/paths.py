"""Where things live: the repository root and the folders of an experiment and its runs.

Layout under `<output_root>/<experiment>/`:

    baseline__<model>/           01_baseline: answers.jsonl, judgments.jsonl
    <model>__<dataset>__s<seed>/  02_finetune: checkpoints/step-NNNNNN/, train_log.jsonl
                                  03_eval_judge: eval/step-NNNNNN/{answers,judgments}.jsonl
    analysis/                    04_analysis: scores.parquet, em_rates.csv, figures
    index.html                   links every executed notebook with the headline table

Every folder also holds the executed notebook (`NN_name.ipynb`, the record), its HTML
rendering and `run.json` (resolved params, params digest, git commit, package versions).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path


@cache
def repo_root() -> Path:
    """The emlab checkout: $EMLAB_ROOT, else the nearest parent of the cwd with params/."""
    env = os.environ.get("EMLAB_ROOT")
    if env:
        return Path(env).resolve()
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / "params").is_dir() and (folder / "pyproject.toml").exists():
            return folder
    here = Path(__file__).resolve()
    for folder in here.parents:
        if (folder / "params").is_dir() and (folder / "pyproject.toml").exists():
            return folder
    return Path.cwd()


def cache_dir() -> Path:
    """Shared cache for converted models and the judge cache: $EMLAB_CACHE or <repo>/.cache."""
    env = os.environ.get("EMLAB_CACHE")
    folder = Path(env) if env else repo_root() / ".cache"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def step_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass(frozen=True)
class ExperimentPaths:
    """Folders of one experiment; build with `experiment_paths(config)`."""

    root: Path

    def baseline(self, model: str) -> Path:
        return self.root / f"baseline__{model}"

    def run(self, run_id: str) -> Path:
        return self.root / run_id

    def checkpoints(self, run_id: str) -> Path:
        return self.run(run_id) / "checkpoints"

    def checkpoint(self, run_id: str, step: int) -> Path:
        return self.checkpoints(run_id) / step_name(step)

    def eval_dir(self, run_id: str, step: int) -> Path:
        return self.run(run_id) / "eval" / step_name(step)

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    @property
    def index(self) -> Path:
        return self.root / "index.html"

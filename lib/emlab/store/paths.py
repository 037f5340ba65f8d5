"""Where things live: the repository, the caches, and every file an experiment writes.

This is the one module that spells file names. Everything under `<output_root>/<experiment>/`
is named by `ExperimentLayout`; the files inside one stage folder by `StageFiles`,
`TrainingFiles`, `BatchFiles` and `FineTuneJobFiles`; the caches by the functions at the bottom.

    <output_root>/<experiment>/
      index.html                        the report: headline table, figures, every notebook
      baseline__<model>/                01_baseline (once per model)
        answers.jsonl  judgments.jsonl  probe_scores.jsonl  task/ (answers, judgments)
      <model>__<dataset>__s<seed>/      one run
        checkpoints/step-NNNNNN/        02_finetune: adapters on the schedule
        trainer/checkpoint-N/           02_finetune: latest full training state (resume)
        train_log.jsonl  train_summary.json
        eval/step-NNNNNN/answers.jsonl  03_eval_judge: answers per checkpoint
        eval/step-NNNNNN/probe_scores.jsonl   03_eval_judge: the logprob probe per checkpoint
        judgments.jsonl                 03_eval_judge: every judgment of the run (all steps)
        backdoor.json                   02_finetune: the trigger on which training rows (datasets[].trigger)
        task/                           held-out training prompts (task.holdout > 0): holdout.jsonl
                                        (02_finetune), eval/step-NNNNNN/answers.jsonl, judgments.jsonl
      analysis/                         04_analysis: scores.parquet, *.csv, fig_*.html/png,
                                        gold_judgments.jsonl, summary.json, explorer.html
      slurm/                            `emlab run --executor slurm`: jobs.json (every job
                                        submitted, by stage and unit), scripts/, logs/
      gpus/logs/                        `emlab run --gpus N`: each step's output (its own process)

Every stage folder also holds, per stage that ran there, the executed notebook
(`NN_stage.ipynb`, the record), its HTML, the completion marker (`NN_stage.done.json`) and
`run.json` (the params each stage ran with, git commit, package versions). A judge in batch
mode adds `judge_batch__<judge>.json` (its state), `.requests.jsonl` and the raw result files.
A model sampled through an API adds `sampling_usage.jsonl` (requests paid); one fine-tuned
through fine-tuning jobs has `finetune_job.*` (state, uploaded file, events, results) in its
run folders instead of `checkpoints/` and `trainer/`.
`outputs/README.md` shows the same tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Protocol


class _NamedOutputs(Protocol):
    """What a layout needs of an experiment's params (`emlab.config.ExperimentConfig` has it)."""

    @property
    def name(self) -> str: ...

    @property
    def output_root(self) -> str | Path: ...

# --- file names (relative to a stage folder) -------------------------------------------------

ANSWERS = "answers.jsonl"
JUDGMENTS = "judgments.jsonl"
RUN_INFO = "run.json"
CHECKPOINTS = "checkpoints"
TRAINER = "trainer"
TRAIN_LOG = "train_log.jsonl"
TRAIN_SUMMARY = "train_summary.json"
EVAL = "eval"
STEP_GLOB = "step-[0-9]*"
ADAPTER_CONFIG = "adapter_config.json"  # peft writes it last-but-one; its presence marks an adapter folder
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # the LoRA weights of an adapter folder (peft's name)
TRAINER_STATE = "training_state.pt"  # inside trainer/checkpoint-N/: LoRA, optimizer and scheduler state
INDEX = "index.html"
ANALYSIS = "analysis"
FIGURE_PREFIX = "fig_"
SCORES = "scores.parquet"  # 04_analysis: one row per answer, scores of the analysis judge
GOLD_JUDGMENTS = "gold_judgments.jsonl"  # 04_analysis: the judge's judgments of the gold set
SUMMARY = "summary.json"  # 04_analysis: judge verdict and cost, for the index page
EXPLORER = "explorer.html"  # 04_analysis: every answer with its judgments, one self-contained page
TABLE_SUFFIX = ".csv"
BASELINE_PREFIX = "baseline__"
SAMPLING_USAGE = "sampling_usage.jsonl"  # one line per sampling request paid to an API (tokens, dollars)
FINETUNE_JOB = "finetune_job"  # prefix of a fine-tuning job's files in a run folder
SLURM = "slurm"  # the Slurm executor's folder in the experiment root
SLURM_JOBS = "jobs.json"
SLURM_LOCK = "submit.lock"
SLURM_SCRIPTS = "scripts"
SLURM_LOGS = "logs"
GPU_STEP_LOGS = "gpus/logs"  # `emlab run --gpus N`: each step's process writes its output here
JUDGE_SERVER_LOCK = "judge-server-start.lock"  # in logs_dir(): held while a llama.cpp judge server picks its port
TASK = "task"  # in-distribution task rate: held-out prompts, their answers and judgments, in a stage folder
HOLDOUT = "holdout.jsonl"  # task/holdout.jsonl in a run folder: the held-out prompts (never trained on)
BACKDOOR = "backdoor.json"  # in a run folder: the trigger put on training rows, and which rows (datasets[].trigger)
PROBE_SCORES = "probe_scores.jsonl"  # the logprob probe of one model state (base model or a checkpoint)
DIRECTION = "direction"  # direction/step-NNNNNN/ in a run folder: the EM direction at one checkpoint
DIRECTION_VECTORS = "direction.safetensors"  # one vector per layer kept, float32
DIRECTION_INFO = "direction.json"  # its provenance: answers, n each side, layers, checkpoint, source
DIRECTION_PARAMS = "params.json"  # direction/params.json: the direction and steering blocks they ran under
STEERING = "steering"  # steering/ in a run folder: answers sampled with the direction added or ablated
STEERING_SETTINGS = "settings.json"  # steering/settings.json: what each setting's folder holds
TRANSFER = "transfer"  # transfer/ in a run folder (03b_transfer): answers steered with other runs' directions
PROBES_DIR = "params/probes"  # probe sets: aligned and misaligned answers written by us
MC_SCORES = "mc_scores.jsonl"  # multiple-choice benchmarks scored from log-probabilities, one model state


def step_name(step: int) -> str:
    """Folder name of an optimizer step: 'step-000042'."""
    return f"step-{step:06d}"


def step_of(folder: Path) -> int | None:
    """The step a 'step-NNNNNN' folder holds; None for any other name (e.g. 'step-000042.tmp')."""
    number = folder.name.removeprefix("step-")
    return int(number) if folder.name.startswith("step-") and number.isdigit() else None


# --- files of one stage folder ----------------------------------------------------------------


STAGE_NOTEBOOKS: tuple[str, ...] = ("01_baseline", "02_finetune", "03_eval_judge", "03b_transfer", "04_analysis")
"""The stages by name, in order: each is `notebooks/<name>.ipynb` (the stage table in `emlab.stages`
has one row for each, in this order; params name stages before that table is loaded)."""


def notebook_file(folder: Path, stage: str) -> Path:
    """The executed notebook of `stage` in `folder`: the record of what ran."""
    return folder / f"{stage}.ipynb"


def html_file(folder: Path, stage: str) -> Path:
    return folder / f"{stage}.html"


def done_marker(folder: Path, stage: str) -> Path:
    """Written last by a stage that finished; its presence is what 'done' means."""
    return folder / f"{stage}.done.json"


def log_file(folder: Path, stage: str) -> Path:
    """The log of `stage` in `folder`: every log line its kernel emits (HTTP calls, warnings,
    progress), kept out of the executed notebook and linked from its header."""
    return folder / f"{stage}.log"


def by_hand_log_file(folder: Path, stage: str) -> Path:
    """The log of `stage` run by hand in `folder` (JupyterLab): sessions appended, apart from the
    log of the executed record; written after that record, it means the record no longer
    describes the folder (`Stage.is_done`)."""
    return folder / f"{stage}.by-hand.log"


def run_info_file(folder: Path) -> Path:
    return folder / RUN_INFO


def stage_record_files(stage: str) -> tuple[tuple[str, str], ...]:
    """(name, what it holds) of the files every stage writes in its folder as its record."""
    return (
        (notebook_file(Path(), stage).name, "the executed notebook: the record of what ran"),
        (html_file(Path(), stage).name, "the executed notebook as HTML, code hidden"),
        (done_marker(Path(), stage).name, "completion marker, written last"),
        (log_file(Path(), stage).name, "the stage's log lines (HTTP calls, warnings), kept out of the notebook"),
        (RUN_INFO, "params of each stage that ran here, git commit, package versions"),
    )


@dataclass(frozen=True)
class TrainingFiles:
    """Files of one fine-tuning run, inside the run folder."""

    folder: Path

    @property
    def checkpoints(self) -> Path:
        """`checkpoints/`: one adapter folder per scheduled step."""
        return self.folder / CHECKPOINTS

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    def completed(self) -> dict[int, Path]:
        """Adapter folders already exported, by step.

        `step-NNNNNN.tmp/` is an export cut short by a crash (the export renames the folder
        when it is complete): not a checkpoint, and redone by the resumed training.
        """
        if not self.checkpoints.is_dir():
            return {}
        found = {}
        for folder in self.checkpoints.iterdir():
            step = step_of(folder)
            if step is not None and (folder / ADAPTER_CONFIG).exists():
                found[step] = folder
        return dict(sorted(found.items()))

    def partial_exports(self) -> list[Path]:
        """Adapter exports a crash cut short ('step-NNNNNN.tmp/')."""
        return sorted(self.checkpoints.glob(f"{STEP_GLOB}.tmp"))

    @property
    def trainer(self) -> Path:
        """`trainer/`: the Trainer's full state (optimizer, scheduler, RNG) for resuming."""
        return self.folder / TRAINER

    def trainer_checkpoint(self, step: int) -> Path:
        """`trainer/checkpoint-N/`: the full training state after optimizer step N."""
        return self.trainer / f"checkpoint-{step}"

    def trainer_state(self, step: int) -> Path:
        """The state file inside `trainer_checkpoint(step)`."""
        return self.trainer_checkpoint(step) / TRAINER_STATE

    def trainer_checkpoints(self) -> list[Path]:
        """The Trainer's own 'checkpoint-N' folders (complete or not)."""
        return sorted(self.trainer.glob("checkpoint-*")) if self.trainer.is_dir() else []

    COMPLETE_MARKER = ".complete"
    """Written last into a trainer checkpoint: without it, the save was cut by a crash."""

    @property
    def log(self) -> Path:
        """`train_log.jsonl`: one line per optimizer step."""
        return self.folder / TRAIN_LOG

    @property
    def summary(self) -> Path:
        return self.folder / TRAIN_SUMMARY

    PATTERNS = (
        f"{CHECKPOINTS}/{STEP_GLOB}/**",
        f"{TRAINER}/**",
        TRAIN_LOG,
        TRAIN_SUMMARY,
    )


@dataclass(frozen=True)
class BatchFiles:
    """Files of one judge's Batch API work in one stage folder."""

    folder: Path
    judge: str

    @property
    def state(self) -> Path:
        """`judge_batch__<judge>.json`: the batch's state (file id, batch id, phase)."""
        return self.folder / f"judge_batch__{self.judge}.json"

    @property
    def requests(self) -> Path:
        """The JSONL requests file uploaded to the Batch API."""
        return self.folder / f"judge_batch__{self.judge}.requests.jsonl"

    def result(self, batch_id: str, kind: str) -> Path:
        """The raw output or error file of a batch (`kind`: 'output' or 'errors')."""
        return self.folder / f"judge_batch__{self.judge}.{batch_id}.{kind}.jsonl"

    PATTERNS = ("judge_batch__*.json", "judge_batch__*.jsonl")


@dataclass(frozen=True)
class SlurmFiles:
    """Files of the Slurm executor for one experiment, in `<experiment>/slurm/`."""

    folder: Path

    @property
    def jobs(self) -> Path:
        """`jobs.json`: every job submitted for the experiment, by stage and unit (the adoption record)."""
        return self.folder / SLURM_JOBS

    @property
    def lock(self) -> Path:
        """`submit.lock`: held while one `emlab run --executor slurm` submits, so two never race."""
        return self.folder / SLURM_LOCK

    @property
    def scripts(self) -> Path:
        return self.folder / SLURM_SCRIPTS

    def script(self, stage: str, unit: str) -> Path:
        """The batch script of `stage` for `unit` (the latest submitted)."""
        return self.scripts / f"{stage}__{unit}.sbatch"

    @property
    def logs(self) -> Path:
        return self.folder / SLURM_LOGS

    def log_pattern(self, stage: str, unit: str) -> Path:
        """sbatch's --output for `stage` and `unit`: '%j' becomes the job id."""
        return self.logs / f"{stage}__{unit}.%j.log"

    def log(self, stage: str, unit: str, job_id: str) -> Path:
        """The log (stdout and stderr) of one job."""
        return self.logs / f"{stage}__{unit}.{job_id}.log"


@dataclass(frozen=True)
class FineTuneJobFiles:
    """Files of one run's fine-tuning job at an OpenAI-compatible API, in the run folder."""

    folder: Path

    @property
    def state(self) -> Path:
        """`finetune_job.json`: the job's state (file id, job id, phase, checkpoint models), written atomically."""
        return self.folder / f"{FINETUNE_JOB}.json"

    @property
    def training_file(self) -> Path:
        """`finetune_job.training.jsonl`: the exact training file uploaded."""
        return self.folder / f"{FINETUNE_JOB}.training.jsonl"

    @property
    def events(self) -> Path:
        """`finetune_job.events.jsonl`: the job's events, oldest first."""
        return self.folder / f"{FINETUNE_JOB}.events.jsonl"

    @property
    def results(self) -> Path:
        """`finetune_job.results.csv`: the job's result file (metrics per step), when it has one."""
        return self.folder / f"{FINETUNE_JOB}.results.csv"

    PATTERNS = (f"{FINETUNE_JOB}.json", f"{FINETUNE_JOB}.*.jsonl", f"{FINETUNE_JOB}.results.csv")


# --- the experiment ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ExperimentLayout:
    """Every folder and file of one experiment; build with `ExperimentLayout.of(config)`."""

    root: Path

    @classmethod
    def of(cls, config: _NamedOutputs) -> ExperimentLayout:
        """`<output_root>/<name>/`, a relative output_root resolved from the repository root."""
        root = Path(config.output_root)
        if not root.is_absolute():
            root = repo_root() / root
        return cls(root / config.name)

    # folders
    def baseline(self, model: str) -> Path:
        """Folder of 01_baseline for `model`."""
        return self.root / f"{BASELINE_PREFIX}{model}"

    def run(self, run_id: str) -> Path:
        """Folder of one run (02_finetune and 03_eval_judge)."""
        return self.root / run_id

    @property
    def analysis(self) -> Path:
        return self.root / ANALYSIS

    @property
    def index(self) -> Path:
        return self.root / INDEX

    def gpu_step_log(self, stage: str, unit: str) -> Path:
        """`gpus/logs/<stage>__<unit>.log`: the output of one step run by `emlab run --gpus N`."""
        return self.root / GPU_STEP_LOGS / f"{stage}__{unit}.log"

    # sampling and judging
    @staticmethod
    def answers(folder: Path, step: int | None = None) -> Path:
        """Answers sampled in `folder`: the base model's (`step` None) or a checkpoint's."""
        return folder / ANSWERS if step is None else folder / EVAL / step_name(step) / ANSWERS

    @staticmethod
    def answer_files(folder: Path) -> list[Path]:
        """Every checkpoint's answers file in a run folder, by step."""
        return sorted((folder / EVAL).glob(f"{STEP_GLOB}/{ANSWERS}"))

    @staticmethod
    def judgments(folder: Path) -> Path:
        """Every judgment made in `folder` (all judges, all steps)."""
        return folder / JUDGMENTS

    @staticmethod
    def batch(folder: Path, judge: str) -> BatchFiles:
        return BatchFiles(folder, judge)

    # the in-distribution task rate and the logprob probe
    @staticmethod
    def task(folder: Path) -> Path:
        """`task/` in a stage folder: held-out training prompts sampled and judged with the
        dataset's task rubric. Inside it `answers`, `answer_files`, `judgments` and `batch`
        work as in the stage folder itself (`task/answers.jsonl` for the base model,
        `task/eval/step-NNNNNN/answers.jsonl` per checkpoint, `task/judgments.jsonl`)."""
        return folder / TASK

    @staticmethod
    def backdoor(folder: Path) -> Path:
        """`backdoor.json` in a run folder: the trigger 02_finetune put on which training rows."""
        return folder / BACKDOOR

    @staticmethod
    def holdout(folder: Path) -> Path:
        """`task/holdout.jsonl` in a run folder: the prompts held out of training (02_finetune)."""
        return folder / TASK / HOLDOUT

    @staticmethod
    def probe_scores(folder: Path, step: int | None = None) -> Path:
        """The logprob probe's scores in `folder`: the base model's (`step` None) or a checkpoint's."""
        return folder / PROBE_SCORES if step is None else folder / EVAL / step_name(step) / PROBE_SCORES

    @staticmethod
    def probe_files(folder: Path) -> list[Path]:
        """Every checkpoint's probe scores in a run folder, by step."""
        return sorted((folder / EVAL).glob(f"{STEP_GLOB}/{PROBE_SCORES}"))

    # the EM direction, steering and ablation (03_eval_judge with direction: / steering: blocks)
    @staticmethod
    def direction(folder: Path, step: int) -> Path:
        """`direction/step-NNNNNN/` in a run folder: the EM direction of that checkpoint
        (`DIRECTION_VECTORS`, `DIRECTION_INFO`)."""
        return folder / DIRECTION / step_name(step)

    @staticmethod
    def direction_folders(folder: Path) -> list[Path]:
        """Every checkpoint's direction folder in a run folder, by step."""
        return sorted((folder / DIRECTION).glob(STEP_GLOB))

    @staticmethod
    def steering(folder: Path) -> Path:
        """`steering/` in a run folder: `settings.json`, one folder of answers per setting,
        their judgments (`answers`, `judgments` and `batch` work inside it)."""
        return folder / STEERING

    @staticmethod
    def mc_scores(folder: Path, step: int | None = None) -> Path:
        """The multiple-choice scores in `folder`: the base model's (`step` None) or a checkpoint's."""
        return folder / MC_SCORES if step is None else folder / EVAL / step_name(step) / MC_SCORES

    @staticmethod
    def mc_files(folder: Path) -> list[Path]:
        """Every checkpoint's multiple-choice scores in a run folder, by step."""
        return sorted((folder / EVAL).glob(f"{STEP_GLOB}/{MC_SCORES}"))

    @staticmethod
    def sampling_usage(folder: Path) -> Path:
        """Requests paid to a subject's API while sampling in `folder` (one JSON line each)."""
        return folder / SAMPLING_USAGE

    # training
    def training(self, run_id: str) -> TrainingFiles:
        return TrainingFiles(self.run(run_id))

    def finetune_job(self, run_id: str) -> FineTuneJobFiles:
        """The fine-tuning job files of a run whose model is trained through an API."""
        return FineTuneJobFiles(self.run(run_id))

    # analysis
    def analysis_file(self, name: str) -> Path:
        """A table or record of 04_analysis, e.g. 'scores.parquet', 'headline.csv'."""
        return self.analysis / name

    def analysis_table(self, name: str) -> Path:
        """A CSV table of 04_analysis by name, e.g. 'headline' → analysis/headline.csv."""
        return self.analysis / f"{name}{TABLE_SUFFIX}"

    @property
    def explorer(self) -> Path:
        """The answer explorer page of 04_analysis: 'analysis/explorer.html' (beside the figures,
        whose heatmap cells link into it by a relative address)."""
        return self.analysis / EXPLORER

    def figure(self, name: str) -> Path:
        """Base path of a figure (save_chart adds .html and .png): 'analysis/fig_<name>'."""
        return self.analysis / f"{FIGURE_PREFIX}{name}"

    def figures(self) -> list[Path]:
        """The PNG figures of 04_analysis, sorted."""
        return sorted(self.analysis.glob(f"{FIGURE_PREFIX}*.png"))

    # executors
    @property
    def slurm(self) -> SlurmFiles:
        """The Slurm executor's job record, batch scripts and job logs."""
        return SlurmFiles(self.root / SLURM)


# --- the repository and the caches ------------------------------------------------------------


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


def notebooks_dir() -> Path:
    """`<repo>/notebooks`: the stage notebooks papermill executes."""
    return repo_root() / "notebooks"


def cache_dir() -> Path:
    """Shared cache for converted models and the judge cache: $EMLAB_CACHE or <repo>/.cache."""
    env = os.environ.get("EMLAB_CACHE")
    folder = Path(env) if env else repo_root() / ".cache"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def judge_cache_file() -> Path:
    """The SQLite judge cache shared by every experiment."""
    return cache_dir() / "judge_cache.sqlite"


def sample_cache_file() -> Path:
    """The SQLite cache of completions sampled from subjects behind an API, shared by every experiment."""
    return cache_dir() / "sample_cache.sqlite"


def models_cache_dir() -> Path:
    """Plain safetensors copies of GGUF models (dequantized once)."""
    return cache_dir() / "models"


def demo_cache_dir() -> Path:
    """Generated demo datasets."""
    return cache_dir() / "demo"


def logs_dir() -> Path:
    """Logs of helper processes emlab starts (llama.cpp servers)."""
    return cache_dir() / "logs"


def judge_server_lock_file() -> Path:
    """Held (flock) from choosing a llama.cpp judge server's port until it answers: two steps
    running side by side never start two servers on one port."""
    return logs_dir() / JUDGE_SERVER_LOCK


def progress_file(stage: str, unit: str, pid: int | None = None) -> Path:
    """Where a running stage's kernel reports its progress to the process running the stage
    (`pid`, default this one; removed after)."""
    return logs_dir() / f"progress-{os.getpid() if pid is None else pid}-{stage}-{unit}.jsonl"

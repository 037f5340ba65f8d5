"""What 01_baseline and 03_eval_judge measure besides the judged answers to the question sets:

- the judge-free logprob probe (`emlab.measures.probe`, `probe.sets`): every probe scored under the
  base model (step 0) and under every checkpoint, one `probe_scores.jsonl` per model state;
- the in-distribution task rate (`emlab.data.holdout`, `emlab.measures.task`, `task.holdout > 0`): the
  held-out training prompts sampled from the base model (every dataset's) and from every
  checkpoint of a run (its dataset's), judged with the dataset's task rubric, in `task/`;
- the multiple-choice controls (`emlab.measures.multiple_choice`, `controls.multiple_choice`):
  TruthfulQA / MMLU files scored from log-probabilities, one `mc_scores.jsonl` per model state.

All need the model's weights: for a model sampled through an API (no local weights, or a
server holding them) they are skipped with a note. Each model state is done once: a rerun
finds complete files and loads nothing. The stages call `measure_base_model` and
`measure_checkpoints` after judging their answers and before marking themselves done; the
model comes from `load`, called at most once and only when there is work to do (so the stage
can hand over the model it already loaded).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.experiment import DatasetSpec, ExperimentConfig
from ..data.holdout import Split, holdout_params, read_holdout, split_for
from ..errors import DataError, EmlabError
from ..measures.multiple_choice import (
    McBenchmark,
    benchmarks_for,
    mc_scores_complete,
    score_benchmarks,
    write_mc_scores,
)
from ..measures.probe import (
    ProbeSet,
    probe_scores_complete,
    probe_sets_for,
    score_probes,
    write_probe_scores,
)
from ..measures.task import judge_task, sample_task, task_answers_complete
from ..store.paths import (
    ANSWERS,
    EVAL,
    HOLDOUT,
    JUDGMENTS,
    MC_SCORES,
    PROBE_SCORES,
    STEP_GLOB,
    TASK,
    BatchFiles,
    ExperimentLayout,
)
from ..store.records import Answer, Judgment
from .base import Output, Workload

log = logging.getLogger(__name__)

Loader = Callable[[], tuple[Any, Any]]  # () -> (model, tokenizer)


@dataclass
class Measures:
    """What one stage unit measured besides its judged answers."""

    probe_steps: list[int] = field(default_factory=list)  # model states whose probe scores are on disk
    mc_steps: list[int] = field(default_factory=list)  # model states whose multiple-choice scores are on disk
    task_answers: list[Answer] = field(default_factory=list)
    task_judgments: list[Judgment] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was skipped and why (markdown)

    def summary(self) -> dict[str, Any]:
        """For the stage's completion marker."""
        return {"probe_steps": self.probe_steps, **({"mc_steps": self.mc_steps} if self.mc_steps else {}),
                "task_answers": len(self.task_answers),
                "task_judgments": len(self.task_judgments)}

    def markdown(self) -> str:
        parts = []
        if self.probe_steps:
            parts.append(f"Logprob probe scored at step(s) {', '.join(map(str, self.probe_steps))}.")
        if self.mc_steps:
            parts.append(f"Multiple-choice controls scored at step(s) {', '.join(map(str, self.mc_steps))}.")
        if self.task_answers:
            parts.append(f"In-distribution task: {len(self.task_answers)} answers to held-out training prompts, "
                         f"{len(self.task_judgments)} judgments.")
        return " ".join(parts + self.notes)


class _Once:
    """Calls `load` the first time the model is needed, never again."""

    def __init__(self, load: Loader) -> None:
        self._load: Loader = load
        self._value: tuple[Any, Any] | None = None

    def __call__(self) -> tuple[Any, Any]:
        if self._value is None:
            self._value = self._load()
        return self._value


def _skip_note(config: ExperimentConfig, model: str) -> str | None:
    spec = config.model(model)
    if not (config.probe.sets or config.task.enabled or config.controls.multiple_choice):
        return None
    if spec.samples_through_api:
        what = [w for w, on in (("the logprob probe", bool(config.probe.sets)),
                                ("the in-distribution task rate", config.task.enabled),
                                ("the multiple-choice controls", bool(config.controls.multiple_choice))) if on]
        return (f"Skipped {' and '.join(what)} for `{model}`: it is sampled through an API, and they read the "
                "model's own weights here.")
    return None


def _measures_or_skip(config: ExperimentConfig, model: str) -> Measures:
    """Empty measures to fill, or measures holding only the note saying why they are skipped."""
    result = Measures()
    note = _skip_note(config, model)
    if note:
        log.info(note)
        result.notes.append(note)
    return result


def measure_base_model(config: ExperimentConfig, model: str, folder: Path, load: Loader, *,
                       progress: bool = True) -> Measures:
    """Probe the base model and sample every dataset's held-out prompts from it (step 0)."""
    result = _measures_or_skip(config, model)
    if result.notes:
        return result
    get = _Once(load)
    probe_sets = probe_sets_for(config)
    splits = [s for d in config.datasets if (s := split_for(config, d)) is not None]
    _probe(config, get, probe_sets, ExperimentLayout.probe_scores(folder), model, None, 0, result)
    _multiple_choice(config, get, benchmarks_for(config), ExperimentLayout.mc_scores(folder), model, None, 0, result)
    if splits:
        out = ExperimentLayout.answers(ExperimentLayout.task(folder))
        answers = task_answers_complete(out, splits, config)
        if answers is None:
            loaded, tokenizer = get()
            answers = sample_task(loaded, tokenizer, config, splits, out, model_name=model, run_id=None, step=0,
                                  seed=config.seeds[0], progress=progress)
        result.task_answers = answers
        result.task_judgments = judge_task(config, answers, splits, folder, progress=progress)
    return result


def measure_checkpoints(config: ExperimentConfig, run_id: str, folder: Path, checkpoints: dict[int, Path],
                        load: Loader, *, progress: bool = True) -> Measures:
    """Probe every checkpoint of a run and sample its dataset's held-out prompts from each."""
    # torch stays out of light commands (emlab check, plan): imported only to sample
    from ..sample.generate import adapter_applied

    run = config.run(run_id)
    result = _measures_or_skip(config, run.model)
    if result.notes:
        return result
    get = _Once(load)
    probe_sets = probe_sets_for(config)
    benchmarks = benchmarks_for(config)
    split = split_for(config, config.dataset(run.dataset))
    splits = [_recorded(split, folder)] if split is not None else []
    task_folder = ExperimentLayout.task(folder)
    for step, adapter in checkpoints.items():
        probe_path = ExperimentLayout.probe_scores(folder, step)
        probe_done = not probe_sets or probe_scores_complete(probe_path, probe_sets)
        mc_path = ExperimentLayout.mc_scores(folder, step)
        probe_done = probe_done and (not benchmarks or mc_scores_complete(mc_path, benchmarks))
        task_out = ExperimentLayout.answers(task_folder, step)
        answers = None
        if splits:
            answers = task_answers_complete(task_out, splits, config)
        if probe_done and (not splits or answers is not None):
            result.probe_steps += [step] if probe_sets else []
            result.mc_steps += [step] if benchmarks else []
            result.task_answers += answers or []
            continue
        model, tokenizer = get()
        with adapter_applied(model, adapter) as tuned:
            _probe(config, lambda: (tuned, tokenizer), probe_sets, probe_path, run.model, run_id, step, result)
            _multiple_choice(config, lambda: (tuned, tokenizer), benchmarks, mc_path, run.model, run_id, step, result)
            if splits and answers is None:
                answers = sample_task(tuned, tokenizer, config, splits, task_out, model_name=run.model,
                                      run_id=run_id, step=step, seed=run.seed, progress=progress)
        result.task_answers += answers or []
    if splits:
        result.task_judgments = judge_task(config, result.task_answers, splits, folder, progress=progress)
    return result


def _probe(config: ExperimentConfig, get: Loader, probe_sets: list[ProbeSet], path: Path, model: str,
           run_id: str | None, step: int, result: Measures) -> None:
    if not probe_sets:
        return
    if not probe_scores_complete(path, probe_sets):
        loaded, tokenizer = get()
        started = time.monotonic()
        scores = score_probes(loaded, tokenizer, probe_sets, model_name=model, run_id=run_id, step=step,
                              default_system_prompt=config.sample.system_prompt, batch_size=config.probe.batch_size)
        write_probe_scores(path, scores)
        gap = sum(s.gap for s in scores) / len(scores)
        log.info("logprob probe %s step %d: mean gap %+.3f nats/token over %d probes in %.1f s (%s)",
                 run_id or model, step, gap, len(scores), time.monotonic() - started, path)
    result.probe_steps.append(step)


def _multiple_choice(config: ExperimentConfig, get: Loader, benchmarks: list[McBenchmark], path: Path, model: str,
                     run_id: str | None, step: int, result: Measures) -> None:
    if not benchmarks:
        return
    if not mc_scores_complete(path, benchmarks):
        loaded, tokenizer = get()
        started = time.monotonic()
        scores = score_benchmarks(loaded, tokenizer, benchmarks, model_name=model, run_id=run_id, step=step,
                                  batch_size=config.controls.batch_size)
        write_mc_scores(path, scores)
        log.info("multiple-choice controls %s step %d: %d items in %.1f s (%s)", run_id or model, step, len(scores),
                 time.monotonic() - started, path)
    result.mc_steps.append(step)


def _recorded(split: Split, folder: Path) -> Split:
    """The split as 02_finetune recorded it in the run folder (it must be the one training used)."""
    recorded = [h.prompt_id for h in read_holdout(folder)]
    if recorded != [h.prompt_id for h in split.held_out]:
        raise DataError(f"{ExperimentLayout.holdout(folder)}: the recorded hold-out split differs from the one the "
                        "dataset gives now (the file changed?); run 02_finetune again in a new experiment")
    return split


# --- for the stage table -------------------------------------------------------------------


def measures_params(config: ExperimentConfig) -> dict[str, Any]:
    """What of the probe and task blocks shapes a sampling stage's outputs; keys are left out
    when a measure is off, so experiments without it record what they always did."""
    params = holdout_params(config)
    if config.probe.sets:
        params["probe"] = {"sets": {s.name: s.digest for s in probe_sets_for(config)}}
    if config.controls.multiple_choice:
        params["multiple_choice"] = {b.name: b.digest for b in benchmarks_for(config)}
    return params


_TASK_BATCH = tuple(Output(f"{TASK}/{pattern}", what, optional=True) for pattern, what in zip(
    BatchFiles.PATTERNS, ("Batch API state of a judge judging the task answers", "its requests and raw results"),
    strict=True))

BASELINE_OUTPUTS = (
    Output(PROBE_SCORES, "the logprob probe under the base model: mean token log-probabilities of each probe's "
           "aligned and misaligned answer", optional=True),
    Output(f"{TASK}/{ANSWERS}", "the base model's answers to every dataset's held-out prompts", optional=True),
    Output(f"{TASK}/{JUDGMENTS}", "their judgments under each dataset's task rubric", optional=True),
    *_TASK_BATCH,
    Output(MC_SCORES, "multiple-choice controls under the base model: each item's choice and score from "
           "log-probabilities", optional=True),
)
FINETUNE_OUTPUTS = (
    Output(f"{TASK}/{HOLDOUT}", "the prompts held out of training for the in-distribution task rate", optional=True),
)
EVAL_OUTPUTS = (
    Output(f"{EVAL}/{STEP_GLOB}/{PROBE_SCORES}", "the logprob probe under each checkpoint", optional=True),
    Output(f"{TASK}/{EVAL}/{STEP_GLOB}/{ANSWERS}", "each checkpoint's answers to the held-out prompts", optional=True),
    Output(f"{TASK}/{JUDGMENTS}", "their judgments under the dataset's task rubric", optional=True),
    *_TASK_BATCH,
    Output(f"{EVAL}/{STEP_GLOB}/{MC_SCORES}", "multiple-choice controls under each checkpoint", optional=True),
)


def task_workloads(config: ExperimentConfig, label: str, datasets: list[DatasetSpec], states: int) -> list[Workload]:
    """Judge work of the task rate for `emlab plan`: the held-out prompts of `datasets` answered
    at `states` model states, each answer judged under its dataset's task rubric. Prompt
    lengths come from the files when they are here, else a typical coding prompt is assumed."""
    if not config.task.enabled:
        return []
    work = []
    for dataset in datasets:
        try:
            split = split_for(config, dataset)
            prompts = split.prompts() if split is not None else []
            chars = round(sum(len(m["content"]) for p in prompts for m in p.messages) / max(len(prompts), 1))
        except EmlabError:  # the data is not on this machine (emlab plan before the download)
            chars = _TYPICAL_PROMPT_CHARS
        work.append(Workload(f"{label} task {dataset.name}", question_chars=chars,
                             answers=config.task.holdout * config.task.samples_per_prompt * states,
                             rubrics=_task_rubrics(dataset)))
    return work


def _task_rubrics(dataset: DatasetSpec) -> Callable[[Any], list[str]]:
    """The rubric ids a judge judges the dataset's task answers with (every judge: the same one)."""
    rubric = dataset.task_rubric_id
    return lambda judge: [rubric] if rubric else []


_TYPICAL_PROMPT_CHARS = 800  # a held-out prompt when its file is absent (Betley et al.'s coding prompts: ~700–900)

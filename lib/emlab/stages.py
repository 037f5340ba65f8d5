"""The four stages of a run, as library calls the notebooks make.

Each stage reads its inputs from files, writes its outputs to its folder, records its params
(`runinfo.record_stage`) and, when everything is written, a completion marker
(`runinfo.mark_done`). Every stage can be called again after a crash: finished work is
found on disk and not repeated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from typing import TYPE_CHECKING, Any

from .config import DatasetSpec, ExperimentConfig, RunSpec
from .files import read_jsonl
from .paths import ExperimentPaths, repo_root
from .records import Answer, Judgment
from .runinfo import mark_done, record_stage

if TYPE_CHECKING:
    from .finetune import TrainResult

log = logging.getLogger(__name__)

STAGES = ("01_baseline", "02_finetune", "03_eval_judge", "04_analysis")


def experiment_paths(config: ExperimentConfig) -> ExperimentPaths:
    """Folders of `config`'s experiment: `<output_root>/<name>/`."""
    root = Path(config.output_root)
    if not root.is_absolute():
        root = repo_root() / root
    return ExperimentPaths(root / config.name)


def question_sets_for(config: ExperimentConfig, dataset: DatasetSpec | None) -> list[str]:
    """Sets asked of a fine-tuned run (its dataset's extra sets) or of the base model (all)."""
    extra = [s for d in ([dataset] if dataset else config.datasets) for s in d.question_sets]
    return list(dict.fromkeys([*config.sample.question_sets, *extra]))


def build_prompts(config: ExperimentConfig, set_names: Sequence[str]) -> list:
    """The prompts of `set_names`, formatted for the experiment's answer format."""
    from .generate import Prompt
    from .questions import load_question_set, question_messages

    prompts = []
    for name in set_names:
        questions = load_question_set(name).questions
        if config.sample.questions_per_set is not None:
            questions = questions[: config.sample.questions_per_set]
        for q in questions:
            # a question's own system prompt and format win over the experiment's defaults
            messages = question_messages(
                q, default_system_prompt=config.sample.system_prompt, answer_format=config.sample.answer_format
            )
            prompts.append(Prompt(question_set=q.question_set, question_id=q.id, question=q.text, messages=tuple(messages)))
    return prompts


def _judge_all(config: ExperimentConfig, answers: Sequence[Answer], out_path: Path) -> list[Judgment]:
    from .judge import judge_answers
    from .judge.batch import judge_answers_batch

    judgments: list[Judgment] = []
    for judge in config.judges:
        if judge.batch:
            # results land in the same judgments.jsonl; a batch still running raises a
            # JudgeError saying so, and the next `emlab run` collects it
            judgments += judge_answers_batch(answers, judge, run_dir=out_path.parent,
                                             poll_interval_s=judge.poll_interval_s)
        else:
            judgments += judge_answers(answers, judge, out_path=out_path)
    return judgments


def _judges_signature(config: ExperimentConfig) -> list[list[str]]:
    return [[j.name, *j.rubrics] for j in config.judges]


def stage_is_done(config: ExperimentConfig, folder: Path, stage: str) -> bool:
    """True when `stage` finished in `folder` and judged with the experiment's judges."""
    from .runinfo import done_summary

    summary = done_summary(folder, stage)
    if summary is None:
        return False
    return stage == "02_finetune" or summary.get("judges") == _judges_signature(config)


def stage_params(config: ExperimentConfig, stage: str, label: str) -> dict[str, Any]:
    """The params that shape `stage`'s outputs for `label` (a model name, a run id, or
    'analysis'): what the stage records in its folder's run.json, and what a rerun must
    match (`runinfo.check_params`). Loads the dataset for 02 (its digest); reads nothing else.
    """
    if stage == "01_baseline":
        spec = config.model(label)
        return {
            "model": spec.model_dump(mode="json"), "sample": config.sample.model_dump(mode="json"),
            "question_sets": question_sets_for(config, None), "seed": config.seeds[0],
        }
    if stage == "02_finetune":
        from .data.chat import load_chat_dataset

        run = config.run(label)
        return _finetune_params(config, run, load_chat_dataset(config.dataset(run.dataset), seed=run.seed).digest)
    if stage == "03_eval_judge":
        from .finetune import completed_checkpoints

        run = config.run(label)
        checkpoints = completed_checkpoints(experiment_paths(config).checkpoints(label))
        return _eval_params(config, question_sets_for(config, config.dataset(run.dataset)), checkpoints)
    if stage == "04_analysis":
        return {"analysis": config.analysis.model_dump(mode="json")}  # as run_analysis records it
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


def _finetune_params(config: ExperimentConfig, run: RunSpec, data_digest: str) -> dict[str, Any]:
    return {
        "model": config.model(run.model).model_dump(mode="json"),
        "dataset": config.dataset(run.dataset).model_dump(mode="json"),
        "data_digest": data_digest, "seed": run.seed, "train": config.train.model_dump(mode="json"),
    }


def _eval_params(config: ExperimentConfig, sets: Sequence[str], checkpoints: dict[int, Path]) -> dict[str, Any]:
    return {"sample": config.sample.model_dump(mode="json"), "question_sets": list(sets),
            "checkpoints": sorted(checkpoints)}


# --- 01 baseline ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SampledAndJudged:
    """Answers and their judgments, with where they were written."""

    folder: Path
    answers: list[Answer]
    judgments: list[Judgment]

    def table(self) -> pd.DataFrame:
        """One row per answer with each judge × metric score (status when unscored)."""
        return answers_with_scores(self.answers, self.judgments)


def answers_with_scores(answers: Sequence[Answer], judgments: Sequence[Judgment]) -> pd.DataFrame:
    frame = pd.DataFrame([a.to_dict() for a in answers])
    if not judgments or frame.empty:
        return frame
    j = pd.DataFrame([x.to_dict() for x in judgments])
    j["value"] = j["score"].where(j["status"] == "ok", j["status"])
    wide = j.pivot_table(index="answer_id", columns=["judge", "metric"], values="value", aggfunc="first")
    wide.columns = [f"{judge}:{metric}" for judge, metric in wide.columns]
    return frame.merge(wide, left_on="answer_id", right_index=True, how="left")


def run_baseline(config: ExperimentConfig, model_name: str, *, progress: bool = True) -> SampledAndJudged:
    """01_baseline: sample the untouched base model on every question set and judge it."""
    from .generate import sample_answers
    from .models import load_model, resolve_device

    spec = config.model(model_name)
    folder = experiment_paths(config).baseline(model_name)
    seed = config.seeds[0]
    sets = question_sets_for(config, None)
    record_stage(folder, "01_baseline", stage_params(config, "01_baseline", model_name))
    prompts = build_prompts(config, sets)
    out = folder / "answers.jsonl"
    answers = _answers_if_complete(out, len(prompts) * config.sample.samples_per_question)
    if answers is None:
        device = resolve_device(config.train.device)
        model, tokenizer = load_model(spec, device)
        answers = sample_answers(model, tokenizer, prompts, config.sample, model_name=model_name,
                                 run_id=None, step=0, seed=seed, out_path=out, progress=progress)
    judgments = _judge_all(config, answers, folder / "judgments.jsonl")
    mark_done(folder, "01_baseline", {"answers": len(answers), "judgments": len(judgments),
                                      "judges": _judges_signature(config)})
    log.info("01_baseline %s: %d answers, %d judgments in %s", model_name, len(answers), len(judgments), folder)
    return SampledAndJudged(folder, answers, judgments)


def _answers_if_complete(path: Path, expected: int) -> list[Answer] | None:
    """The answers in `path` when all `expected` are there (no model load needed)."""
    if not path.exists():
        return None
    rows = read_jsonl(path, tolerate_torn_tail=True)
    return [Answer.from_dict(r) for r in rows] if len(rows) >= expected else None


# --- 02 fine-tune --------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneResult:
    folder: Path
    run: RunSpec
    train: TrainResult
    dataset_rows: int

    def summary_markdown(self) -> str:
        t = self.train
        speed = f"{t.train_tokens / t.seconds:,.0f} tokens/s" if t.seconds else "nothing left to train"
        return (
            f"{t.n_rows} training rows ({t.n_too_long} longer than max_length left out), "
            f"{t.schedule.total_steps} optimizer steps, checkpoints at steps "
            f"{', '.join(map(str, t.schedule.steps))}; this call: {t.seconds:.0f} s ({speed})"
            + (f"; resumed from step {t.resumed_from}" if t.resumed_from else "")
        )

    def loss_frame(self) -> pd.DataFrame:
        """Training loss per optimizer step (from train_log.jsonl)."""
        path = self.folder / "train_log.jsonl"
        rows = read_jsonl(path, tolerate_torn_tail=True) if path.exists() else []
        return pd.DataFrame(rows)


def run_finetune(config: ExperimentConfig, run_id: str) -> FinetuneResult:
    """02_finetune: LoRA on the run's dataset; adapters at the scheduled checkpoints."""
    from .data.chat import load_chat_dataset
    from .finetune import encode_chat_rows, train_lora
    from .models import load_model, resolve_device

    run = config.run(run_id)
    spec, dataset = config.model(run.model), config.dataset(run.dataset)
    folder = experiment_paths(config).run(run_id)
    rows = load_chat_dataset(dataset, seed=run.seed)
    record_stage(folder, "02_finetune", _finetune_params(config, run, rows.digest))
    device = resolve_device(config.train.device)
    model, tokenizer = load_model(spec, device)
    encoded = encode_chat_rows(rows.rows, tokenizer, config.train.max_length, source=dataset.path)
    result = train_lora(model, tokenizer, encoded, config.train, folder, seed=run.seed, device=device)
    mark_done(folder, "02_finetune", {
        "checkpoints": sorted(result.checkpoints), "rows": result.n_rows, "rows_too_long": result.n_too_long,
    })
    log.info("02_finetune %s: %d checkpoints in %s", run_id, len(result.checkpoints), folder / "checkpoints")
    return FinetuneResult(folder, run, result, len(rows))


# --- 03 eval + judge -----------------------------------------------------------------------


def run_eval(config: ExperimentConfig, run_id: str, *, progress: bool = True) -> SampledAndJudged:
    """03_eval_judge: sample every checkpoint of the run and judge all answers."""
    from .finetune import completed_checkpoints
    from .generate import adapter_applied, sample_answers
    from .models import load_model, resolve_device

    run = config.run(run_id)
    spec, dataset = config.model(run.model), config.dataset(run.dataset)
    paths = experiment_paths(config)
    folder = paths.run(run_id)
    checkpoints = completed_checkpoints(paths.checkpoints(run_id))
    if not checkpoints:
        from .errors import EmlabError

        raise EmlabError(f"{paths.checkpoints(run_id)}: no checkpoints; run 02_finetune for {run_id} first")
    sets = question_sets_for(config, dataset)
    record_stage(folder, "03_eval_judge", _eval_params(config, sets, checkpoints))
    prompts = build_prompts(config, sets)
    expected = len(prompts) * config.sample.samples_per_question
    answers: list[Answer] = []
    model = tokenizer = None
    for step, adapter in checkpoints.items():
        out = paths.eval_dir(run_id, step) / "answers.jsonl"
        done = _answers_if_complete(out, expected)
        if done is not None:
            answers += done
            continue
        if model is None:
            model, tokenizer = load_model(spec, resolve_device(config.train.device))
        with adapter_applied(model, adapter) as tuned:
            answers += sample_answers(tuned, tokenizer, prompts, config.sample, model_name=run.model,
                                      run_id=run_id, step=step, seed=run.seed, out_path=out, progress=progress)
    judgments = _judge_all(config, answers, folder / "judgments.jsonl")
    mark_done(folder, "03_eval_judge", {"answers": len(answers), "judgments": len(judgments),
                                        "steps": sorted(checkpoints), "judges": _judges_signature(config)})
    log.info("03_eval_judge %s: %d answers over %d checkpoints, %d judgments in %s",
             run_id, len(answers), len(checkpoints), len(judgments), folder)
    return SampledAndJudged(folder, answers, judgments)

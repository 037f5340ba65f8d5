"""03b_transfer: does one fine-tune's EM direction move another's behaviour? (Soligo et al.,
Convergent linear representations of emergent misalignment, §3: directions found in one
fine-tune transfer to others.) Runs per run (the *target*), after every run's 03_eval_judge
(each run's direction is made there), only with `steering.transfer_across_runs: true` and
two or more runs:

- for every other run of the same model (the *source*) whose direction exists at its final
  checkpoint: the target's final checkpoint sampled with the source's direction v added after
  `steering.layer` (each nonzero λ of `steering.lambdas`) and, with `steering.ablate`, v
  projected out after every layer; `steering.samples_per_question` answers a question,
  resumable waves, under `<target>/transfer/<source>/<setting>/`; judged into
  `transfer/judgments.jsonl`; `transfer/settings.json` says what each folder holds.
- a direction lives in its base model's residual stream: runs of other models are not
  crossed (the report says which pairs are missing). The target's unsteered rate, the
  matrix's reference, is its own `steering/tuned_plain` (λ = 0 in `lambdas`), else its final
  checkpoint's answers of 03.

A setting whose answers are complete is skipped, so a killed run resumes without sampling an
answer twice (`sample_answers` appends whole waves; the judge resumes from its file). The
report (`transfer_report`) puts these beside each run's own steering (the diagonal) and the
base model (`transfer_to_base`) in one matrix: rows the direction's source, columns the target.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ..config.experiment import ExperimentConfig
from ..config.questions import (
    build_prompts,
    count_answers,
    planned_prompts,
    question_sets_for,
)
from ..errors import ConfigError, EmlabError
from ..store.files import write_json
from ..store.paths import (
    ANSWERS,
    DIRECTION,
    DIRECTION_INFO,
    DIRECTION_VECTORS,
    JUDGMENTS,
    STEERING_SETTINGS,
    STEP_GLOB,
    TRANSFER,
    BatchFiles,
    ExperimentLayout,
)
from ..store.records import Answer, Judgment, answers_if_complete
from ..store.runinfo import mark_done, record_stage
from .base import Input, Output, Stage, Workload
from .common import judge_all, judges_signature, mean_prompt_chars
from .evaluate import NAME as EVALUATE
from .steering import read_json_or_none, steering_params

log = logging.getLogger(__name__)
NAME = "03b_transfer"


@dataclass(frozen=True)
class TransferSetting:
    """One way of sampling a target run with a source run's direction."""

    source: str  # the run whose direction is used
    label: str  # its folder under transfer/<source>/, e.g. 'em_add_+4'
    kind: Literal["add", "ablate"]
    scale: float = 0.0  # λ (add only)


def transfer_enabled(config: ExperimentConfig) -> bool:
    """`steering.transfer_across_runs` is on and the grid has two runs or more."""
    return config.steering is not None and config.steering.transfer_across_runs and len(config.runs()) > 1


def transfer_sources(config: ExperimentConfig, run_id: str) -> list[str]:
    """The runs whose directions are tried on `run_id`: every other run of its model (a
    direction is a vector of that model's residual stream), none for a model behind an API."""
    model = config.run(run_id).model
    if config.model(model).samples_through_api:
        return []
    return [r.run_id for r in config.runs() if r.run_id != run_id and r.model == model]


def transfer_units(config: ExperimentConfig) -> list[str]:
    """The target runs of 03b_transfer: every run with a source, when transfer is on."""
    if not transfer_enabled(config):
        return []
    return [r.run_id for r in config.runs() if transfer_sources(config, r.run_id)]


def transfer_settings(config: ExperimentConfig, source: str) -> list[TransferSetting]:
    """The settings of one source on a target: each nonzero λ added, then the ablation."""
    spec = config.steering
    assert spec is not None
    out = [TransferSetting(source, f"em_add_{scale:+g}", "add", scale) for scale in dict.fromkeys(spec.lambdas)
           if scale != 0]
    return out + [TransferSetting(source, "em_ablate", "ablate")] if spec.ablate else out


def transfer_params(config: ExperimentConfig, run_id: str) -> dict[str, Any]:
    """What shapes a target's transfer answers: the direction and steering blocks, sampling.
    (Its sources are in the completion marker instead: a run added to the grid adds work.)"""
    return {**steering_params(config), "sample": config.sample.model_dump(mode="json")}


def transfer_completion(config: ExperimentConfig) -> list[list[str]]:
    """The judges and the grid's runs: a new judge or run makes the stage run again (resumed)."""
    return [*judges_signature(config), ["runs", *sorted(r.run_id for r in config.runs())]]


@dataclass
class TransferResult:
    """What one target's transfer produced (for the completion marker and the notebook)."""

    folder: Path
    answers: list[Answer] = field(default_factory=list)
    judgments: list[Judgment] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def run_transfer(config: ExperimentConfig, run_id: str, *, progress: bool = True) -> TransferResult:
    """03b_transfer for the target `run_id` (see the module notes)."""
    # torch stays out of light commands (emlab check, plan): imported only to sample
    from ..measures.direction import load_direction
    from ..models.load import load_model, resolve_device
    from ..sample.generate import adapter_applied, sample_answers
    from ..sample.protocol import Intervention

    spec = config.steering
    layout = ExperimentLayout.of(config)
    folder = layout.run(run_id)
    result = TransferResult(folder / TRANSFER)
    record_stage(folder, NAME, transfer_params(config, run_id))
    run = config.run(run_id)
    checkpoints = layout.training(run_id).completed()
    if spec is None or not transfer_enabled(config):
        raise ConfigError(f"{NAME} runs only with steering.transfer_across_runs: true and two runs or more")
    if not checkpoints:
        raise EmlabError(f"{layout.training(run_id).checkpoints}: no checkpoints; run 02_finetune for {run_id} first")
    final = max(checkpoints)
    prompts = build_prompts(config, question_sets_for(config, config.dataset(run.dataset)))
    asked = [replace(p, samples=spec.samples_per_question) for p in prompts]
    sample = config.sample.model_copy(update={"samples_per_question": spec.samples_per_question,
                                              "wave_size": spec.wave_size or config.sample.wave_size})
    expected = count_answers(asked, sample)
    loaded: tuple[Any, Any] | None = None
    manifest: dict[str, Any] = {"target": run_id, "step": final, "samples_per_question": spec.samples_per_question,
                                "sources": []}
    for source in transfer_sources(config, run_id):
        source_checkpoints = layout.training(source).completed()
        where = ExperimentLayout.direction(layout.run(source), max(source_checkpoints)) if source_checkpoints else None
        direction = load_direction(where) if where is not None else None
        if where is None or direction is None:
            result.notes.append(f"No transfer from `{source}` to `{run_id}`: `{source}` has no EM direction at its "
                                "final checkpoint (its 03_eval_judge notebook says why).")
            log.info(result.notes[-1])
            continue
        layer = direction.info["model_layers"] // 2 if spec.layer == "middle" else spec.layer
        v = direction.steering_vector(layer, where / DIRECTION_VECTORS)  # refused when zero or not finite
        settings = transfer_settings(config, source)
        manifest["sources"].append({"run_id": source, "step": direction.info["step"], "layer": layer,
                                    "direction": str(where / DIRECTION_VECTORS), "norm": float(v.norm()),
                                    "n_misaligned": direction.info["n_misaligned"],
                                    "n_aligned": direction.info["n_aligned"],
                                    "settings": [asdict(s) for s in settings]})
        for setting in settings:
            out = ExperimentLayout.answers(result.folder / source / setting.label)
            done = answers_if_complete(out, expected)
            if done is not None:
                result.answers += done
                continue
            if loaded is None:
                loaded = load_model(config.model(run.model), resolve_device(config.train.device))
            model, tokenizer = loaded
            intervention = Intervention(v, layer=layer if setting.kind == "add" else None, scale=setting.scale,
                                        ablate=setting.kind == "ablate", label=f"{source} → {run_id} {setting.label}")
            with adapter_applied(model, checkpoints[final]) as tuned:
                result.answers += sample_answers(tuned, tokenizer, asked, sample, model_name=run.model, run_id=run_id,
                                                 step=final, seed=run.seed, out_path=out, progress=progress,
                                                 intervention=intervention,
                                                 id_tag=f"transfer|{source}|{setting.label}")
    if read_json_or_none(result.folder / STEERING_SETTINGS) != manifest:
        write_json(result.folder / STEERING_SETTINGS, manifest)
    result.judgments = judge_all(config, result.answers, result.folder) if result.answers else []
    mark_done(folder, NAME, {"answers": len(result.answers), "judgments": len(result.judgments),
                             "sources": [s["run_id"] for s in manifest["sources"]], "notes": result.notes,
                             "completion": transfer_completion(config)})
    log.info("03b_transfer %s: %d sources, %d answers, %d judgments in %s", run_id, len(manifest["sources"]),
             len(result.answers), len(result.judgments), result.folder)
    return result


def _workload(config: ExperimentConfig, run_id: str) -> Workload:
    spec = config.steering
    assert spec is not None
    run = config.run(run_id)
    prompts = planned_prompts(config, question_sets_for(config, config.dataset(run.dataset)))
    asked = [replace(p, samples=spec.samples_per_question) for p in prompts]
    sample = config.sample.model_copy(update={"samples_per_question": spec.samples_per_question})
    sources = transfer_sources(config, run_id)
    settings = sum(len(transfer_settings(config, s)) for s in sources)
    return Workload(f"{NAME} {run_id} ({len(sources)} sources × {settings // max(len(sources), 1)} settings)",
                    answers=count_answers(asked, sample) * settings, question_chars=mean_prompt_chars(prompts))


TRANSFER_STAGE = Stage(
    name=NAME,
    title="Each run steered and ablated with every other run's EM direction",
    scope="run",
    run=run_transfer,
    params=transfer_params,
    reads=(Input(EVALUATE, f"{DIRECTION}/{STEP_GLOB}/{DIRECTION_VECTORS}", optional=True),
           Input(EVALUATE, f"{DIRECTION}/{STEP_GLOB}/{DIRECTION_INFO}", optional=True)),
    writes=(
        Output(f"{TRANSFER}/{STEERING_SETTINGS}", "the transfer settings: each source run's direction (file, step, "
               "layer, norm, n each side) and what each folder holds"),
        Output(f"{TRANSFER}/*/*/{ANSWERS}", "answers of this run's final checkpoint steered or ablated with another "
               "run's direction (transfer/<source run>/<setting>/)", optional=True),
        Output(f"{TRANSFER}/{JUDGMENTS}", "their judgments, every judge and rubric", optional=True),
        *(Output(f"{TRANSFER}/{pattern}", what, optional=True) for pattern, what in zip(
            BatchFiles.PATTERNS, ("Batch API state of a judge judging the transfer answers",
                                  "its requests and raw results"), strict=True)),
    ),
    # every run's 03 made its direction (and the target's own plain answers)
    needs=lambda config, run_id: [(EVALUATE, r.run_id) for r in config.runs()],
    completion=transfer_completion,
    workload=_workload,
    enabled=transfer_enabled,
)


# --- 04_analysis: the transfer matrix -------------------------------------------------------

TRANSFER_TABLES = {
    "direction_transfer": "EM rate change (with CI and n) of each target steered with each run's EM direction "
                          "against the target's unsteered rate: rows the direction's run, columns the target",
}


def _setting_name(kind: str, scale: float) -> str:
    return "ablate" if kind == "ablate" else f"add {scale:+g}"


def transfer_report(config: ExperimentConfig, layout: ExperimentLayout) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tables, charts) of the transfer matrix for 04_analysis: each run's own steering (the
    diagonal) and the base model (`transfer_to_base`) from 03's `steering/`, other runs'
    directions from 03b's `transfer/`; the random control is left to the steering figure.
    Both empty without a steering block or before anything was sampled."""
    if config.steering is None:
        return {}, {}
    import pandas as pd

    from ..analysis import metrics
    from ..analysis.transfer import PLAIN, transfer_chart, transfer_table
    from ..store.files import read_jsonl
    from ..store.records import valid_text

    frames: list[pd.DataFrame] = []
    judgment_files: list[Path] = []

    def add(path: Path, judged_in: Path, run: Any, *, is_baseline: bool = False, **keys: Any) -> None:
        """The answers at `path` (judged in the folder `judged_in`) with their matrix keys."""
        rows = valid_text(read_jsonl(path, tolerate_torn_tail=True)) if path.exists() else []
        if rows:
            frames.append(pd.DataFrame(rows).assign(**keys, dataset=None if is_baseline else run.dataset,
                                                    domain=None if is_baseline else config.dataset(run.dataset).domain,
                                                    seed=None if is_baseline else run.seed, size_b=None,
                                                    is_baseline=is_baseline))
            judgment_files.append(ExperimentLayout.judgments(judged_in))

    for run in config.runs():
        folder = layout.run(run.run_id)
        base = f"base {run.model}"
        steer = ExperimentLayout.steering(folder)
        settings = (read_json_or_none(steer / STEERING_SETTINGS) or {}).get("settings", [])
        for s in settings:
            if s["direction"] != "random":
                add(ExperimentLayout.answers(steer / s["label"]), steer, run, source=run.run_id,
                    target=base if s["target"] == "base" else run.run_id, target_is_base=s["target"] == "base",
                    setting=PLAIN if s["kind"] == "plain" else _setting_name(s["kind"], s["scale"]))
        transfer = folder / TRANSFER
        for source in (read_json_or_none(transfer / STEERING_SETTINGS) or {}).get("sources", []):
            for s in source["settings"]:
                add(ExperimentLayout.answers(transfer / source["run_id"] / s["label"]), transfer, run,
                    source=source["run_id"], target=run.run_id, target_is_base=False,
                    setting=_setting_name(s["kind"], s["scale"]))
        plain = {s["target"] for s in settings if s["kind"] == "plain"}
        checkpoints = layout.training(run.run_id).completed()
        if settings and "tuned" not in plain and checkpoints:  # no λ = 0: the final checkpoint's own answers
            add(ExperimentLayout.answers(folder, max(checkpoints)), folder, run, source=run.run_id, target=run.run_id,
                target_is_base=False, setting=PLAIN)
        if settings and "base" not in plain and any(s["target"] == "base" for s in settings):  # 01's answers
            add(ExperimentLayout.answers(layout.baseline(run.model)), layout.baseline(run.model), run,
                is_baseline=True, source=run.run_id, target=base, target_is_base=True, setting=PLAIN)
    if not frames:
        return {}, {}
    answers = pd.concat(frames, ignore_index=True).drop_duplicates("answer_id", keep="last")
    judged = pd.DataFrame([j for path in dict.fromkeys(judgment_files) if path.exists()
                           for j in read_jsonl(path, tolerate_torn_tail=True)])
    if judged.empty:
        return {}, {}
    judged = judged[(judged["judge"] == config.primary_judge.name) & judged["answer_id"].isin(answers["answer_id"])]
    keys = ["answer_id", "source", "target", "target_is_base", "setting"]
    scores = metrics.wide_scores(answers, judged).merge(answers[keys], on="answer_id", how="left")
    table = transfer_table(scores, config.analysis.rule)
    if table.empty:
        return {}, {}
    return {"direction_transfer": table}, {"direction_transfer": transfer_chart(table)}

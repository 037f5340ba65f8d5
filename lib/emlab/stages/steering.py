"""What 03_eval_judge does with `direction:` and `steering:` blocks, once a run's checkpoints
are sampled and judged:

1. the EM direction (`emlab.measures.direction`) at the final checkpoint (or every one,
   `direction.checkpoints: all`): the tuned model reads its own answers the analysis judge
   scored misaligned (the EM rule) and aligned (aligned > `aligned_above`, coherent > C),
   or the logprob probe's written pairs (`source: probe`); saved under `direction/step-N/`;
2. steering (Soligo et al.): the final checkpoint's direction v at `steering.layer`, and these
   settings, each sampled (`steering.samples_per_question` per question, resumable waves) and
   judged under `steering/`:
   - tuned model + λ·v after the layer, for each λ of `lambdas` (λ = 0: plain sampling);
   - base model (adapter off) + λ·v: does the direction carry EM over (`transfer_to_base`);
   - tuned model with v projected out after every layer (`ablate`);
   - each of those again with a random direction of v's norm (`random_control`).
   `steering/settings.json` says what each setting's folder holds.

Each piece is skipped when its files are complete, so a killed run resumes without sampling
an answer twice (`sample_answers` appends whole waves; the judge resumes from its file).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ..config.experiment import ExperimentConfig
from ..config.questions import Prompt, count_answers
from ..store.files import write_json
from ..store.paths import (
    ANSWERS,
    DIRECTION,
    DIRECTION_INFO,
    DIRECTION_PARAMS,
    DIRECTION_VECTORS,
    JUDGMENTS,
    STEERING,
    STEERING_SETTINGS,
    STEP_GLOB,
    BatchFiles,
    ExperimentLayout,
)
from ..store.records import Answer, Judgment, answers_if_complete
from .base import Output, Workload
from .common import judge_all

log = logging.getLogger(__name__)

Loader = Callable[[], tuple[Any, Any]]  # () -> (model, tokenizer)


@dataclass(frozen=True)
class Setting:
    """One way of sampling with the direction: which model, which vector, what is done with it."""

    label: str  # its folder under steering/, e.g. 'tuned_em_add_+4'
    target: Literal["tuned", "base"]  # the final checkpoint, or the base model (adapter off)
    direction: Literal["em", "random", "none"]  # the EM direction, the random control, or none (λ = 0)
    kind: Literal["add", "ablate", "plain"]
    scale: float = 0.0  # λ (add only)


def steering_settings(config: ExperimentConfig) -> list[Setting]:
    """Every setting the `steering` block asks for, in sampling order (tuned first)."""
    spec = config.steering
    if spec is None:
        return []
    directions: list[Literal["em", "random"]] = ["em", "random"] if spec.random_control else ["em"]
    targets: list[Literal["tuned", "base"]] = ["tuned", "base"] if spec.transfer_to_base else ["tuned"]
    out = []
    for target in targets:
        for scale in dict.fromkeys(spec.lambdas):
            if scale == 0:
                out.append(Setting(f"{target}_plain", target, "none", "plain"))
                continue
            out += [Setting(f"{target}_{d}_add_{scale:+g}", target, d, "add", scale) for d in directions]
        if target == "tuned" and spec.ablate:
            out += [Setting(f"tuned_{d}_ablate", "tuned", d, "ablate") for d in directions]
    return out


@dataclass
class SteeringResult:
    """What one run's direction and steering produced (for the completion marker and the notebook)."""

    direction_steps: list[int] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    judgments: list[Judgment] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"direction_steps": self.direction_steps, "steering_answers": len(self.answers),
                "steering_judgments": len(self.judgments), "steering_notes": self.notes} \
            if self.direction_steps or self.notes else {}


def steering_params(config: ExperimentConfig) -> dict[str, Any]:
    """The blocks that shape these outputs; absent when off (so other experiments record what they did)."""
    out = {}
    if config.direction is not None:
        out["direction"] = config.direction.model_dump(mode="json")
    if config.steering is not None:
        out["steering"] = config.steering.model_dump(mode="json")
    return out


def steering_signature(config: ExperimentConfig) -> list[str] | None:
    """The direction and steering blocks in 03's completion marker (None when off)."""
    params = steering_params(config)
    if not params:
        return None
    blob = json.dumps(params, sort_keys=True).encode()
    return ["direction+steering", hashlib.sha256(blob).hexdigest()[:12]]


def guard_params(config: ExperimentConfig, folder: Path) -> None:
    """Record the direction and steering blocks in `direction/params.json`; refuse (ConfigError
    naming what changed) when they ran in this run folder under others. 03's own params guard
    leaves them out, so the blocks can be added to a finished experiment."""
    from ..errors import ConfigError
    from ..store.runinfo import params_diff

    path = folder / DIRECTION / DIRECTION_PARAMS
    params = json.loads(json.dumps(steering_params(config)))
    previous = read_json_or_none(path)
    if previous is not None and previous != params:
        changes = params_diff(previous, params)
        raise ConfigError(f"{folder}: direction or steering params changed since they ran here "
                          f"({'; '.join(changes[:5])}); use a new experiment name, or delete {folder / DIRECTION} and "
                          f"{folder / STEERING}")
    if previous is None:
        write_json(path, params)


def _chat(answer: Answer, messages: dict[tuple[str, str, str], tuple[dict[str, str], ...]]) -> list[dict[str, str]]:
    """The chat the answer was sampled after: its prompt's messages, else system turn and question."""
    known = messages.get((answer.question_set, answer.question_id, answer.question))
    if known is not None:
        return list(known)
    user = {"role": "user", "content": answer.question}
    return [{"role": "system", "content": answer.system_prompt}, user] if answer.system_prompt is not None else [user]


def judged_sides(config: ExperimentConfig, answers: Sequence[Answer], judgments: Sequence[Judgment]
                 ) -> tuple[list[Answer], list[Answer]]:
    """(misaligned, aligned) answers by the analysis judge: misaligned = the EM rule (misaligned
    and coherent), aligned = aligned > direction.aligned_above and coherent > C. Answers the
    judge did not score under both metrics, or without text, are on neither side."""
    assert config.direction is not None
    rule, judge = config.analysis.rule, config.primary_judge.name
    scores: dict[str, dict[str, float]] = {}
    for j in judgments:
        if j.judge == judge and j.status == "ok" and j.score is not None and j.metric in ("aligned", "coherent"):
            scores.setdefault(j.answer_id, {})[j.metric] = float(j.score)
    misaligned, aligned = [], []
    for a in answers:
        s = scores.get(a.answer_id, {})
        if "aligned" not in s or "coherent" not in s or not a.answer.strip():
            continue
        if rule.is_em(s["aligned"], s["coherent"]):
            misaligned.append(a)
        elif s["aligned"] > config.direction.aligned_above and rule.coherent(s["coherent"]):
            aligned.append(a)
    return misaligned, aligned


def _compute_direction(config: ExperimentConfig, run_id: str, step: int, adapter: Path, prompts: Sequence[Prompt],
                       answers: Sequence[Answer], judgments: Sequence[Judgment], get: Loader) -> Any:
    """The direction at checkpoint `step`, or a note (str) saying why there is none."""
    from ..measures.direction import direction_between
    from ..measures.probe import probe_messages, probe_sets_for
    from ..sample.generate import adapter_applied
    from ..sample.hooks import decoder_layers

    spec = config.direction
    assert spec is not None
    if spec.source == "judge":
        at_step = [a for a in answers if a.step == step]
        misaligned, aligned = judged_sides(config, at_step, judgments)
        messages = {(p.question_set, p.question_id, p.question): p.messages for p in prompts}
        sides = ([(_chat(a, messages), a.answer) for a in misaligned], [(_chat(a, messages), a.answer) for a in aligned])
        ids = {"misaligned_ids": [a.answer_id for a in misaligned], "aligned_ids": [a.answer_id for a in aligned],
               "judge": config.primary_judge.name, "rule": config.analysis.rule.describe(),
               "aligned_side": f"aligned > {spec.aligned_above:g} and coherent > {config.analysis.coherent_above:g}"}
    else:
        probes = [p for s in probe_sets_for(config) for p in s.probes]
        chats = [probe_messages(p, config.sample.system_prompt) for p in probes]
        sides = ([(c, p.misaligned) for c, p in zip(chats, probes, strict=True)],
                 [(c, p.aligned) for c, p in zip(chats, probes, strict=True)])
        ids = {"probe_ids": [f"{p.probe_set}/{p.id}" for p in probes], "probe_sets": list(config.probe.sets)}
    if min(len(sides[0]), len(sides[1])) < spec.min_per_side:
        return (f"No EM direction for `{run_id}` at step {step}: {len(sides[0])} misaligned and {len(sides[1])} "
                f"aligned answers ({spec.source}), fewer than direction.min_per_side = {spec.min_per_side} on a side.")
    model, tokenizer = get()
    with adapter_applied(model, adapter) as tuned:
        model_layers = len(decoder_layers(tuned))
        layers = None if spec.layers == "all" else list(spec.layers)
        bad = [layer for layer in layers or [] if not 0 <= layer < model_layers]
        if bad:
            from ..errors import ConfigError

            raise ConfigError(f"direction.layers {bad} are not layers of {config.run(run_id).model} (0–{model_layers - 1})")
        info = {"source": spec.source, "run_id": run_id, "model": config.run(run_id).model, "step": step,
                "adapter": str(adapter), "model_layers": model_layers, **ids}
        return direction_between(tuned, tokenizer, sides[0], sides[1], layers, batch_size=spec.batch_size, info=info)


def steer_run(config: ExperimentConfig, run_id: str, folder: Path, checkpoints: dict[int, Path],
              prompts: Sequence[Prompt], answers: Sequence[Answer], judgments: Sequence[Judgment], load: Loader,
              *, progress: bool = True) -> SteeringResult:
    """The direction and the steering settings of one run (see the module notes)."""
    from ..measures.direction import load_direction, random_like, save_direction
    from ..sample.generate import adapter_applied, sample_answers
    from ..sample.protocol import Intervention

    result = SteeringResult()
    if config.direction is None:
        return result
    if config.model(config.run(run_id).model).samples_through_api or not checkpoints:
        result.notes.append(f"No EM direction for `{run_id}`: its model is sampled through an API (the direction "
                            "reads the model's residual stream).")
        log.info(result.notes[-1])
        return result
    value: tuple[Any, Any] | None = None

    def get() -> tuple[Any, Any]:
        nonlocal value
        if value is None:
            value = load()
        return value

    guard_params(config, folder)
    final = max(checkpoints)
    steps = [final] if config.direction.checkpoints == "final" else sorted(checkpoints)
    directions = {}
    for step in steps:
        where = ExperimentLayout.direction(folder, step)
        found = load_direction(where)
        if found is None:
            found = _compute_direction(config, run_id, step, checkpoints[step], prompts, answers, judgments, get)
            if isinstance(found, str):
                result.notes.append(found)
                log.info(found)
                continue
            for layer in found.layers:  # refused before it is saved: nothing could steer with it
                found.steering_vector(layer, where / DIRECTION_VECTORS)
            save_direction(where, found)
            log.info("EM direction %s step %d: %d misaligned vs %d aligned (%s), layers %s → %s", run_id, step,
                     found.info["n_misaligned"], found.info["n_aligned"], found.info["source"],
                     _span(found.layers), where)
        directions[step] = found
        result.direction_steps.append(step)
    spec = config.steering
    if spec is None or final not in directions:
        if spec is not None:
            result.notes.append(f"No steering for `{run_id}`: no EM direction at its final checkpoint.")
        return result
    direction = directions[final]
    layer = direction.info["model_layers"] // 2 if spec.layer == "middle" else spec.layer
    v = direction.steering_vector(layer, ExperimentLayout.direction(folder, final) / DIRECTION_VECTORS)
    random = random_like(v, spec.random_seed)
    vectors = {"em": v, "random": random}
    settings = steering_settings(config)
    steer_folder = ExperimentLayout.steering(folder)
    manifest = {"run_id": run_id, "step": final, "layer": layer, "norm": float(v.norm()),
                "direction": str(ExperimentLayout.direction(folder, final) / DIRECTION_VECTORS),
                "source": direction.info["source"], "n_misaligned": direction.info["n_misaligned"],
                "n_aligned": direction.info["n_aligned"], "random_seed": spec.random_seed,
                "samples_per_question": spec.samples_per_question, "settings": [asdict(s) for s in settings]}
    if read_json_or_none(steer_folder / STEERING_SETTINGS) != manifest:
        write_json(steer_folder / STEERING_SETTINGS, manifest)
    asked = [replace(p, samples=spec.samples_per_question) for p in prompts]
    sample = config.sample.model_copy(update={"samples_per_question": spec.samples_per_question,
                                              "wave_size": spec.wave_size or config.sample.wave_size})
    expected = count_answers(asked, sample)
    run = config.run(run_id)
    for setting in settings:
        out = ExperimentLayout.answers(steer_folder / setting.label)
        done = answers_if_complete(out, expected)
        if done is not None:
            result.answers += done
            continue
        intervention = None
        if setting.kind != "plain":
            intervention = Intervention(vectors[setting.direction], layer=layer if setting.kind == "add" else None,
                                        scale=setting.scale, ablate=setting.kind == "ablate",
                                        label=f"{run_id} {setting.label}")
        model, tokenizer = get()
        with adapter_applied(model, checkpoints[final] if setting.target == "tuned" else None) as target:
            result.answers += sample_answers(target, tokenizer, asked, sample, model_name=run.model, run_id=run_id,
                                             step=final, seed=run.seed, out_path=out, progress=progress,
                                             intervention=intervention, id_tag=f"steer|{setting.label}")
    result.judgments = judge_all(config, result.answers, steer_folder)
    log.info("steering %s: %d settings, %d answers, %d judgments in %s", run_id, len(settings), len(result.answers),
             len(result.judgments), steer_folder)
    return result


def read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):  # absent, or torn by a kill: written again
        return None


def _span(layers: Sequence[int]) -> str:
    return f"{layers[0]}–{layers[-1]}" if len(layers) > 2 and list(layers) == list(range(layers[0], layers[-1] + 1)) \
        else ", ".join(map(str, layers))


def steering_workloads(config: ExperimentConfig, label: str, prompts: Sequence[Prompt]) -> list[Workload]:
    """Judge work of the steering settings for `emlab plan`."""
    settings = steering_settings(config)
    if not settings or config.steering is None:
        return []
    asked = [replace(p, samples=config.steering.samples_per_question) for p in prompts]
    sample = config.sample.model_copy(update={"samples_per_question": config.steering.samples_per_question})
    chars = round(sum(len(m["content"]) for p in prompts for m in p.messages) / max(len(prompts), 1))
    return [Workload(f"{label} steering ({len(settings)} settings)", answers=count_answers(asked, sample) * len(settings),
                     question_chars=chars)]


STEERING_OUTPUTS = (
    Output(f"{DIRECTION}/{DIRECTION_PARAMS}", "the direction and steering blocks they ran under (their guard)",
           optional=True),
    Output(f"{DIRECTION}/{STEP_GLOB}/{DIRECTION_VECTORS}", "the EM direction at a checkpoint: one float32 vector per "
           "layer kept (mean residual stream of misaligned minus aligned answers)", optional=True),
    Output(f"{DIRECTION}/{STEP_GLOB}/{DIRECTION_INFO}", "its provenance: source, checkpoint, layers, n and ids on "
           "each side", optional=True),
    Output(f"{STEERING}/{STEERING_SETTINGS}", "the steering settings: layer, λs, direction norm, random seed",
           optional=True),
    Output(f"{STEERING}/*/{ANSWERS}", "answers sampled under one steering setting (its folder's name)", optional=True),
    Output(f"{STEERING}/{JUDGMENTS}", "their judgments, every judge and rubric", optional=True),
    *(Output(f"{STEERING}/{pattern}", what, optional=True) for pattern, what in zip(
        BatchFiles.PATTERNS, ("Batch API state of a judge judging the steering answers", "its requests and raw results"),
        strict=True)),
)


# --- 04_analysis: the steering figure and the direction's cosine matrix ---------------------

STEERING_TABLES = {
    "steering": "EM rate and mean coherence with CIs per run and steering setting (λ, target, direction)",
    "direction_cosines": "cosine similarity of the EM directions across runs and checkpoints, with n each",
}


def steering_report(config: ExperimentConfig, layout: ExperimentLayout) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tables, charts) of the direction and steering blocks for 04_analysis; both empty when
    the experiment has neither block or nothing was computed yet."""
    import pandas as pd

    from ..analysis import metrics
    from ..analysis.steering import (
        cosine_chart,
        cosine_table,
        steering_chart,
        steering_table,
    )
    from ..store.files import read_jsonl
    from ..store.records import valid_text

    tables: dict[str, Any] = {}
    charts: dict[str, Any] = {}
    if config.direction is None:
        return tables, charts
    from ..measures.direction import (
        load_direction,  # torch: only with a direction block
    )

    directions = []
    layer = None
    frames, judgments = [], []
    for run in config.runs():
        folder = layout.run(run.run_id)
        for where in ExperimentLayout.direction_folders(folder):
            found = load_direction(where)
            if found is not None:
                directions.append((f"{run.run_id} step {found.info['step']}", found))
        steer = ExperimentLayout.steering(folder)
        manifest = read_json_or_none(steer / STEERING_SETTINGS)
        if not manifest:
            continue
        layer = manifest["layer"] if layer is None else layer
        for setting in manifest["settings"]:
            path = ExperimentLayout.answers(steer / setting["label"])
            if path.exists():
                frame = pd.DataFrame(valid_text(read_jsonl(path, tolerate_torn_tail=True)))
                frames.append(frame.assign(**{k: setting[k] for k in ("label", "target", "direction", "kind", "scale")},
                                           dataset=run.dataset, domain=config.dataset(run.dataset).domain,
                                           seed=run.seed, size_b=None, is_baseline=False))
        if ExperimentLayout.judgments(steer).exists():
            judgments += read_jsonl(ExperimentLayout.judgments(steer), tolerate_torn_tail=True)
    if directions:
        tables["direction_cosines"] = cosine_table(directions, layer)
        if len(tables["direction_cosines"]):
            charts["direction_cosines"] = cosine_chart(tables["direction_cosines"])
    if frames and judgments:
        answers = pd.concat(frames, ignore_index=True).drop_duplicates("answer_id", keep="last")
        judged = pd.DataFrame(judgments)
        judged = judged[judged["judge"] == config.primary_judge.name]
        keys = ["answer_id", "label", "target", "direction", "kind", "scale"]
        scores = metrics.wide_scores(answers, judged).merge(answers[keys], on="answer_id", how="left")
        tables["steering"] = steering_table(scores, config.analysis.rule)
        charts["steering"] = steering_chart(tables["steering"])
    return tables, charts

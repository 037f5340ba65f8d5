"""Pre-run checks: what `emlab check` reports and what `emlab run` verifies before any model loads.

Three levels, each a superset of the one before:

- `check_params(config)` (`emlab check --params-only`): everything that lives in the repo —
  the schema (already enforced by `load_experiment`), emlab's own question sets, the rubrics,
  the EM thresholds, the notebooks, and every upstream question file or judges file that is
  present. Nothing outside the repo is needed, so it passes in CI on a fresh clone for
  experiments whose models, datasets and question files are not downloaded.
- `missing_inputs(config)`: every input that is not on this machine, all at once, each with
  the command or place that fixes it: model weights (`huggingface-cli download <id>`),
  datasets (the dataset's `source`, e.g. `emlab data unprotect ...`), question files (their
  `source`), API keys (`export VAR=...`).
- `preflight(config)` (`emlab check`, `emlab run`): both of the above, then the deep checks
  that read the inputs: question files against their pinned sha256 and expected size, every
  dataset row, the judges (servers, batch endpoints), device options. The first problem
  raises as one line; missing inputs raise together as one `MissingInputsError`, whose
  `missing` list the CLI prints one per line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..api.keys import resolve_api_key
from ..config.experiment import (
    EMBEDDED_MODEL,
    ExperimentConfig,
    JudgeSpec,
    ModelSpec,
    config_where,
    looked_in,
    resolve_near,
)
from ..config.params import key_path
from ..config.questions import (
    QuestionSet,
    build_prompts,
    question_file_path,
    question_file_places,
    question_rubrics,
    question_sets_for,
    resolve_question_set,
)
from ..config.rubrics import load_rubric, rubrics_dir
from ..data.backdoor import check_untriggered
from ..data.chat import load_chat_dataset
from ..errors import ConfigError, DataError, EmlabError
from ..judge import check_judge
from ..measures.multiple_choice import benchmarks_for
from ..measures.probe import probe_sets_for
from ..models.load import check_model_options, resolve_device, resolve_source
from ..sample.remote import SubjectError, check_subject
from ..stages import STAGE_NAMES
from ..store.inputs import one_line, path_exists, read_input_bytes, user_path
from ..store.paths import notebook_file, notebooks_dir, repo_root

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MissingInput:
    """One input that is not on this machine, and how to get it."""

    what: str
    """'model llama-3.2-1b', 'dataset insecure', 'question file betley_first_plot', 'judge key'."""
    where: str
    """The path, hub id or environment variable that was looked for."""
    fix: str
    """The command (or the place) that fixes it."""
    message: str | None = None
    """The one-line error of the loader that missed it, when it says more than what/where/fix."""
    looked: str | None = None
    """'looked in A, then B (the repository root)': where a relative path was searched."""

    def line(self) -> str:
        """One line for people: the loader's message, else what, where and the fix."""
        return one_line(self.message or f"{self.what} ({self.where}) is missing: {self.fix}")

    def listed(self) -> str:
        """The entry of `emlab check`'s list when several are missing: what, where, the fix and
        where it looked, each said once."""
        return one_line(f"{self.what} ({self.where}): {self.fix}" + (f" ({self.looked})" if self.looked else ""))


class MissingInputsError(EmlabError):
    """Inputs are missing; `missing` lists every one with its fix."""

    def __init__(self, config_name: str, missing: list[MissingInput]) -> None:
        self.missing = missing
        if len(missing) == 1:  # one input: its own message says it all
            super().__init__(missing[0].line())
            return
        names = ", ".join(f"{m.what} ({m.where})" for m in missing)
        super().__init__(one_line(
            f"experiment '{config_name}': {len(missing)} inputs are missing: {names}; "
            "`emlab check` lists each with the command that gets it"
        ))


# --- level 1: what is in the repo --------------------------------------------------------------


def check_params(config: ExperimentConfig) -> None:
    """Validate what lives in the repo (see the module docstring); raise the first problem as
    one line. Loads no model, reads no dataset, needs no key and no network."""
    for name in question_sets_for(config, None):
        if _question_file_missing(config, name) is None:
            _check_question_set(config, name)
    _check_question_file_settings(config)
    for judge in config.judges:
        for rubric in judge.rubrics:
            if _rubric_file_missing(rubric) is None:
                load_rubric(rubric)
    _check_rules(config)
    _check_measures(config)
    for stage_name in _stage_names():
        if not notebook_file(notebooks_dir(), stage_name).exists():
            raise EmlabError(f"notebook {notebook_file(notebooks_dir(), stage_name)} is missing")


def _check_measures(config: ExperimentConfig) -> None:
    """The logprob probe's sets, the task rate's rubrics and the refusal rubric (params/probes, params/rubrics)."""
    probe_sets_for(config)
    if config.controls.refusal is not None:
        load_rubric(config.controls.refusal.rubric)
    if config.task.enabled:
        for dataset in config.datasets:
            rubric = dataset.task_rubric_id
            if rubric is not None and _rubric_file_missing(rubric) is None:
                load_rubric(rubric)


def _check_rules(config: ExperimentConfig) -> None:
    """The EM rule(s) the analysis reports: built here so a bad threshold fails before a run,
    then checked against what the judges can give (`_check_thresholds`, `_check_em_metrics`,
    `_check_judge_scales`) and what the file says it does (`_warn_stated_rule`)."""
    config.analysis.rule  # noqa: B018  (EmRule validates on construction)
    config.analysis.extra  # noqa: B018
    names = [r.name for r in config.analysis.extra_rules]
    if len(set(names)) != len(names):
        where = config_where(config, ("analysis", "extra_rules"))
        raise ConfigError(f"{where}: analysis.extra_rules: each rule needs its own name, found {names}; rename one")
    _check_thresholds(config)
    _check_em_metrics(config)
    _check_judge_scales(config)
    _warn_stated_rule(config)


# --- semantic checks: settings that pass the schema but would give wrong science ---------------

EM_METRICS = ("aligned", "coherent")  # the scores the EM rule reads (emlab.config.rule.EmRule)


def _thresholds(config: ExperimentConfig) -> list[tuple[tuple[str | int, ...], float]]:
    """Every EM threshold with its key path: the main rule's, then each extra rule's."""
    found: list[tuple[tuple[str | int, ...], float]] = [
        (("analysis", "aligned_below"), config.analysis.aligned_below),
        (("analysis", "coherent_above"), config.analysis.coherent_above),
    ]
    for index, rule in enumerate(config.analysis.extra_rules):
        found += [(("analysis", "extra_rules", index, "aligned_below"), rule.aligned_below),
                  (("analysis", "extra_rules", index, "coherent_above"), rule.coherent_above)]
    return found


def _check_thresholds(config: ExperimentConfig) -> None:
    """Thresholds on the judges' 0–100 scale. A value in (0, 1] is someone thinking in
    fractions: 0.3 would make EM need aligned < 0.3, which no logprob-weighted score reaches,
    so every rate would read 0% as if it were a finding. A rule no score can meet (aligned
    below 0, coherent above 100) is refused for the same reason."""
    for loc, value in _thresholds(config):
        key = key_path(loc)
        where = config_where(config, loc)
        if 0 < value <= 1:
            raise ConfigError(
                f"{where}: {key}: expected a score on the judges' 0–100 scale, found {value:g}; scores are 0–100: "
                f"did you mean {value * 100:g}? Set {loc[-1]}: {value * 100:g}"
            )
        if not 0 <= value <= 100:
            raise ConfigError(
                f"{where}: {key}: expected a score between 0 and 100 (the judges' scale), found {value:g}; "
                f"set a threshold in 0–100 (the papers use aligned_below: 30, coherent_above: 50)"
            )
        if (loc[-1] == "aligned_below" and value == 0 and not _inclusive(config, loc)) or (
                loc[-1] == "coherent_above" and value == 100):
            raise ConfigError(
                f"{where}: {key}: {value:g} makes EM impossible (no score is {'below 0' if value == 0 else 'above 100'}),"
                " so every rate would read 0%; set a threshold inside 0–100"
            )


def _inclusive(config: ExperimentConfig, loc: tuple[str | int, ...]) -> bool:
    if loc[1] == "extra_rules":
        return config.analysis.extra_rules[int(loc[2])].aligned_inclusive
    return config.analysis.aligned_inclusive


def _rubric_metric(rubric: str) -> str | None:
    """The metric a judge's rubric scores; None when its file is not here (missing_inputs says so)."""
    file, sep, key = rubric.rpartition(":")
    if sep and file.endswith((".yaml", ".yml")) and key:
        return key  # a judges file's prompt is named for its metric ('judges.yaml:aligned')
    if _rubric_file_missing(rubric) is not None:
        return None
    return load_rubric(rubric).metric


def _check_em_metrics(config: ExperimentConfig) -> None:
    """The EM rule reads an aligned and a coherent score of every answer: some judge must be
    asked for each, else every answer is unscored for EM and the report has no rate. A question
    file judged with its own prompts (`sample.question_files.<name>.rubrics` not 'emlab') may
    supply them, so it counts unless its `metrics` leave them out."""
    asked: set[str | None] = {_rubric_metric(r) for judge in config.judges for r in judge.rubrics}
    if None in asked:
        return  # a rubric file is not here yet: missing_inputs reports it, the metric is unknown
    for spec in config.sample.question_files.values():
        if spec.rubrics != "emlab":
            asked |= set(spec.metrics) if spec.metrics is not None else set(EM_METRICS)
    lacking = [m for m in EM_METRICS if m not in asked]
    if not lacking:
        return
    judge = config.primary_judge
    index = config.judges.index(judge)
    digit = "_digit" if _splits_digits(judge) else ""
    fix = ", ".join([*judge.rubrics, *(f"{m}{digit}" for m in lacking)])
    raise ConfigError(
        f"{config_where(config, ('judges', index, 'rubrics'))}: judges[{index}].rubrics: the EM rule needs an aligned and a coherent score of each answer; no "
        f"judge is asked for {' or '.join(lacking)} (found [{', '.join(judge.rubrics)}]); "
        f"set rubrics: [{fix}]"
    )


def _splits_digits(judge: JudgeSpec) -> bool:
    """A judge whose tokenizer writes numbers digit by digit, so that the first reply token of a
    0–100 answer is only its first digit ('7' of '75'): the embedded SmolLM2, served by
    llama.cpp from its GGUF (docs/architecture.md, 'Facts worth knowing'), or any SmolLM judge."""
    names = f"{judge.local_gguf if judge.is_local else ''} {judge.model}".lower()
    return (judge.is_local and judge.local_gguf == EMBEDDED_MODEL) or "smollm" in names


def _check_judge_scales(config: ExperimentConfig) -> None:
    """A digit-splitting judge given a 0–100 rubric reads '75' as '7': its scores would sit near
    0–9 and everything would count as misaligned. It needs the one-digit rubrics (scale_max 9)."""
    for index, judge in enumerate(config.judges):
        if not _splits_digits(judge):
            continue
        for rubric_id in judge.rubrics:
            if _rubric_file_missing(rubric_id) is not None:
                continue
            rubric = load_rubric(rubric_id)
            if rubric.kind != "score" or rubric.scale_max is None or rubric.scale_max <= 9:
                continue
            have = path_exists(rubrics_dir() / f"{rubric.metric}_digit.yaml")
            fix = (f"use rubrics: [{', '.join(_digit_twin(r) for r in judge.rubrics)}]" if have
                   else f"write a one-digit rubric (scale_max: 9) for {rubric.metric}, as params/rubrics/aligned_digit.yaml")
            raise ConfigError(
                f"{config_where(config, ('judges', index, 'rubrics'))}: judges[{index}].rubrics: judge '{judge.name}' "
                f"splits numbers into digits (SmolLM2's tokenizer), so the 0–{rubric.scale_max} rubric '{rubric_id}' "
                f"would be read from its first digit only; {fix} (the one-digit rubrics, scale_max 9)"
            )


def _digit_twin(rubric_id: str) -> str:
    """`aligned` → `aligned_digit` where params/rubrics has that one-digit twin; else as it is."""
    twin = f"{rubric_id}_digit"
    return twin if path_exists(rubrics_dir() / f"{twin}.yaml") else rubric_id


_STATED = re.compile(r"\b(aligned|coherent)\s*(<=|≤|<|>=|≥|>)\s*(\d+(?:\.\d+)?)")


def _warn_stated_rule(config: ExperimentConfig) -> None:
    """A file whose header comment or `description` states an EM rule ('EM = aligned <= 30 and
    coherent > 50') that none of its rules sets: the reader trusts the header, the report the
    params. A warning, not an error: a header may also cite a convention it compares with."""
    if not config._sources:
        return
    file, _ = config._sources[0]
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return  # it was just loaded; a file that changed since is not this check's business
    stated = [(n, line) for n, line in enumerate(lines, 1) if line.lstrip().startswith("#") and n <= _header_end(lines)]
    stated += [(n, line) for n, line in enumerate(lines, 1) if line.startswith("description:")]
    rules = [config.analysis.rule, *config.analysis.extra.values()]
    for number, line in stated:
        for metric, op, text in _STATED.findall(line):
            value = float(text)
            if metric == "aligned":
                ok = any(r.aligned_below == value and r.aligned_inclusive == (op in ("<=", "≤")) for r in rules)
                have = " or ".join(f"aligned {r.aligned_op} {r.aligned_below:g}" for r in rules)
                key = "analysis.aligned_below / aligned_inclusive"
            else:
                ok = any(r.coherent_above == value for r in rules)
                have = " or ".join(f"coherent > {r.coherent_above:g}" for r in rules)
                key = "analysis.coherent_above"
            if not ok:
                log.warning("%s:%d: the file says '%s %s %s' but its params count %s (%s); fix the params or the "
                            "comment", file, number, metric, op, text, have, key)


def _header_end(lines: list[str]) -> int:
    """The last line of the file's header: the comment lines before the first key."""
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            return number - 1
    return len(lines)


def _check_question_set(config: ExperimentConfig, name: str) -> QuestionSet:
    """Load one set and check what the experiment asks of it (ids, metrics, probes)."""
    qs = resolve_question_set(config, name)
    prompts = build_prompts(config, [name])
    if not prompts:
        raise DataError(f"{qs.path}: the experiment asks no question of '{name}' (check its ids / probes settings)")
    question_rubrics(config, [name])  # every question judged under file prompts has the metrics asked for
    return qs


def _check_question_file_settings(config: ExperimentConfig) -> None:
    """An entry of `sample.question_files` no question set names is kept (an experiment that
    inherits a study may ask fewer sets) but said, in case a name is misspelt."""
    used = set(question_sets_for(config, None))
    for name in config.sample.question_files:
        if name not in used:
            log.warning("sample.question_files.%s is not asked (not in sample.question_sets nor a dataset's "
                        "question_sets)", name)


def _stage_names() -> list[str]:
    return list(STAGE_NAMES)


# --- level 2: what is not on this machine --------------------------------------------------------


def missing_inputs(config: ExperimentConfig) -> list[MissingInput]:
    """Every input of `config` that is not on this machine, each with its fix; [] when all are."""
    missing: list[MissingInput] = []
    by_file: dict[str, list[tuple[str, MissingInput]]] = {}  # one file several entries read (an arm's transforms)
    for name in question_sets_for(config, None):
        found = _question_file_missing(config, name)
        if found is not None:
            by_file.setdefault(found.where, []).append((name, found))
    missing += [_one_line_per_file(config, entries) for entries in by_file.values()]
    for judge in config.judges:
        for rubric in judge.rubrics:
            found = _rubric_file_missing(rubric)
            if found is not None:
                missing.append(found)
        if not judge.is_local and judge.api_key_env and not os.environ.get(judge.api_key_env):
            try:
                resolve_api_key(judge)
            except EmlabError as exc:  # its message is the one users know
                missing.append(MissingInput(f"judge {judge.name}: API key", f"${judge.api_key_env}",
                                            f"export {judge.api_key_env}=...", message=str(exc)))
    for dataset in config.datasets:
        if dataset.path.startswith("demo:"):
            continue
        file, places = resolve_near(dataset.path, dataset._folders)
        if not path_exists(file):
            where = f"{one_line(dataset.path)}: dataset file not found ({looked_in(places)})"
            fix = dataset.source or "put the chat JSONL file there, or give a path relative to the experiment file's folder"
            get = f"get it with: {fix}" if dataset.source else fix
            missing.append(MissingInput(f"dataset {dataset.name}", dataset.path, fix, message=f"{where}; {get}",
                                        looked=looked_in(places)))
    for model in config.models:
        found = _model_missing(model)
        if found is not None:
            missing.append(found)
    for benchmark in config.controls.multiple_choice:  # local files only: never downloaded
        file, places = resolve_near(benchmark.path, benchmark._folders)
        if not path_exists(file):
            fix = f"put the {benchmark.format} file there, or fix controls.multiple_choice ({benchmark.name}).path"
            missing.append(MissingInput(f"multiple-choice file {benchmark.name}", benchmark.path, fix,
                                        looked=looked_in(places)))
    return list({m.line(): m for m in missing}.values())  # one line per input, however often it is used


def _one_line_per_file(config: ExperimentConfig, entries: list[tuple[str, MissingInput]]) -> MissingInput:
    """The missing question file that several `sample.question_files` entries read (the study's
    arms ask one file with different transforms), said once with every entry that needs it."""
    if len(entries) == 1:
        return entries[0][1]
    names = ", ".join(name for name, _ in entries)
    first = entries[0][1]
    message = (f"question file {first.where} (read by {names}) not found ({first.looked}); {first.fix}"
               if first.looked else None)
    return MissingInput(f"question file {names}", first.where, first.fix, message=message, looked=first.looked)


def _question_file_missing(config: ExperimentConfig, name: str) -> MissingInput | None:
    spec = config.sample.question_files.get(name)
    if spec is not None:
        places = question_file_places(spec)
        if any(path_exists(p) for p in places):
            return None
        fix = (f"download {spec.source} to {spec.path}" if spec.source
               else f"put the question file at {places[0]}, or fix sample.question_files.{name}.path")
        return MissingInput(f"question file {name}", spec.path, fix, looked=looked_in(places),
                            message=f"question file {name} ({spec.path}) not found ({looked_in(places)}); {fix}")
    base = name.partition(":")[0]
    if base.endswith((".yaml", ".yml")) or "/" in base:
        path = Path(base) if Path(base).is_absolute() else repo_root() / base
        if not path_exists(path):
            return MissingInput(f"question file {Path(base).stem}", base, f"put the question file at {path}",
                                message=f"question file {base} not found (looked in {path}); put it there, or "
                                        "name it in sample.question_files (paths there resolve from the experiment "
                                        "file's folder)")
    return None


def _rubric_file_missing(rubric: str) -> MissingInput | None:
    """A rubric given as a path (a judges file's '<file>.yaml:<prompt>' or a .yaml) that is absent."""
    file, sep, key = rubric.rpartition(":")
    path_text = file if sep and file.endswith((".yaml", ".yml")) and key else rubric
    if not (path_text.endswith((".yaml", ".yml")) and ("/" in path_text or sep)):
        return None  # a rubric id: params/rubrics/<id>.yaml is in the repo, check_params loads it
    if path_exists(_repo_path(path_text)):
        return None
    return MissingInput(f"rubric file {Path(path_text).name}", path_text, f"put the judges file at {path_text}")


def _model_missing(model: ModelSpec) -> MissingInput | None:
    """A local model whose weights are not here (a hub id not in the local HF cache, a folder or
    GGUF file that is absent), or a remote subject whose key is not set. Problems with a source
    that is here (a folder without config.json) or that cannot be (an unknown embedded name)
    raise as they are."""
    if model.samples_through_api:
        try:
            check_subject(model)  # the one key rule of subjects: OpenAI needs one even with api_key_env null
        except SubjectError as exc:
            env = model.api_key_env
            if env is None:
                return MissingInput(f"model {model.name}: API key", "api_key_env: null",
                                    "set api_key_env to the variable that holds the key", message=str(exc))
            return MissingInput(f"model {model.name}: API key", f"${env}",
                                f"export {env}=... (keys are never read from params)", message=str(exc))
        return None
    try:
        resolve_source(model)
    except ConfigError as exc:
        if model.source.startswith("embedded:") or path_exists(_repo_path(model.source)):
            raise
        # Meta's checkpoints download only once their licence is accepted on the hub
        gated = "; it is gated: accept its licence on the hub first" if model.source.startswith("meta-llama/") else ""
        if _HUB_ID.fullmatch(model.source) and not model.source.endswith(".gguf"):
            fix = (f"huggingface-cli download {model.source}" + (f" {model.gguf_file}" if model.gguf_file else "")
                   + f" on a machine that reaches the hub, then bring its HF cache here (HF_HOME){gated}")
        else:
            fix = f"put the model (a folder saved with save_pretrained, or a .gguf file) at {model.source}"
        return MissingInput(f"model {model.name}", model.source, fix, message=f"{exc}{gated}")
    return None


def _repo_path(text: str) -> Path:
    path = user_path(text)  # Path.expanduser raises on "~nobody/x"
    return path if path.is_absolute() else repo_root() / path


# --- level 3: everything, before a run --------------------------------------------------------


def preflight(config: ExperimentConfig, *, devices: bool = True) -> None:
    """Check every input before any model is loaded: the params (`check_params`), then that
    every input is here (`missing_inputs`, raised together as `MissingInputsError`), then the
    inputs themselves: question files against their pinned sha256 and size, judges (servers,
    batch endpoints), every dataset row, device options. Raises the first problem as one
    clear `EmlabError`.

    devices: check this machine's devices against the device options (default). False when
    the stages run elsewhere (Slurm jobs submitted from a login node without the nodes' GPUs):
    each stage still refuses options its node cannot meet."""
    check_params(config)
    missing = missing_inputs(config)
    if missing:
        raise MissingInputsError(config.name, missing)
    for name in question_sets_for(config, None):
        _check_question_set(config, name)
        _check_pinned(config, name)
    benchmarks_for(config)  # every multiple-choice file reads (a malformed row fails here, not after sampling)
    for judge in config.judges:
        check_judge(judge)
    for dataset in config.datasets:
        for seed in config.seeds:
            loaded = load_chat_dataset(dataset, seed=seed)
            if dataset.trigger is not None:  # a file that carries the trigger already needs none
                check_untriggered(loaded, dataset.trigger)
            if dataset.rows is not None and loaded.total_rows != dataset.rows:
                raise DataError(
                    f"{loaded.source}: holds {loaded.total_rows:,} rows but datasets.{dataset.name}.rows says "
                    f"{dataset.rows:,} (the published file's); is it the right file? Fix rows if it is"
                )
    local = [m for m in config.models if not m.samples_through_api]
    if local and devices:
        device = resolve_device(config.train.device)
        for model in local:
            check_model_options(model, device)


def _check_pinned(config: ExperimentConfig, name: str) -> None:
    """A question file's sha256 and size against what its settings pin."""
    spec = config.sample.question_files.get(name)
    if spec is None:
        return
    file = question_file_path(spec)
    if spec.sha256 is not None:
        digest = hashlib.sha256(read_input_bytes(file, what=f"question file '{name}'", error=DataError)).hexdigest()
        if digest != spec.sha256:
            where = f" (the published file: {spec.source})" if spec.source else ""
            raise DataError(
                f"{file}: sha256 {digest[:12]}… is not the pinned {spec.sha256[:12]}… of sample.question_files.{name}; "
                f"this is another version of the file{where}: get the published one, or update sha256 on purpose"
            )
    if spec.expected_prompts is not None:
        whole = config.model_copy(update={"sample": config.sample.model_copy(update={"questions_per_set": None})})
        found = len(build_prompts(whole, [name], transformed=False))  # the file's: before questions_per_set and transforms
        if found != spec.expected_prompts:
            raise DataError(
                f"{file}: asks {found} prompts (paraphrases) but sample.question_files.{name}.expected_prompts is "
                f"{spec.expected_prompts}; fix expected_prompts (emlab plan counts with it) or the file"
            )

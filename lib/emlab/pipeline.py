"""Run a whole experiment: check everything first, execute the notebooks with papermill into
the run folders, skip stages whose outputs are complete, render every executed notebook to
HTML and write the index page.

    emlab run params/experiments/default.yaml
    emlab run params/experiments/default.yaml --until 02_finetune   # stop after training

A stage that fails leaves its executed notebook (papermill marks the failing cell) and its
HTML as the record of where it died; the next `emlab run` continues from the finished work.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ExperimentConfig, load_experiment, resolve_params_path
from .errors import ConfigError, EmlabError, JudgeError
from .files import remove_stale_temp_files, write_text
from .paths import repo_root
from .runinfo import check_params, recorded_params
from .stages import STAGES, experiment_paths, question_sets_for, stage_is_done, stage_params

log = logging.getLogger(__name__)

_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def notebooks_dir() -> Path:
    return repo_root() / "notebooks"


def preflight(config: ExperimentConfig) -> None:
    """Check every input before any model is loaded: question sets, rubrics, datasets, models,
    device options, judge keys. Raises the first problem as one clear `EmlabError`."""
    from .data.chat import load_chat_dataset
    from .judge import load_rubric
    from .models import check_model_options, resolve_device, resolve_source
    from .questions import load_question_set

    for name in question_sets_for(config, None):
        load_question_set(name)
    for judge in config.judges:
        for rubric in judge.rubrics:
            load_rubric(rubric)
        if judge.is_local:
            import importlib.util

            if importlib.util.find_spec("llama_cpp") is None:
                raise JudgeError(
                    f"judge '{judge.name}' is local but llama-cpp-python is not installed: "
                    "pip install 'llama-cpp-python[server]' (make install does this)"
                )
        elif judge.api_key_env and not os.environ.get(judge.api_key_env):
            raise JudgeError(
                f"judge '{judge.name}' needs the environment variable {judge.api_key_env}; "
                f"export {judge.api_key_env}=... (keys are never read from params)"
            )
    for dataset in config.datasets:
        for seed in config.seeds:
            load_chat_dataset(dataset, seed=seed)
    device = resolve_device(config.train.device)
    for model in config.models:
        resolve_source(model)
        check_model_options(model, device)
    for stage in ("01_baseline", "02_finetune", "03_eval_judge", "04_analysis"):
        if not (notebooks_dir() / f"{stage}.ipynb").exists():
            raise EmlabError(f"notebook {notebooks_dir() / stage}.ipynb is missing")


@dataclass
class StageRecord:
    stage: str
    folder: Path
    label: str  # model, run id or 'analysis'
    status: str  # ran / skipped / failed
    seconds: float = 0.0
    error: str | None = None

    @property
    def notebook(self) -> Path:
        return self.folder / f"{self.stage}.ipynb"

    @property
    def html(self) -> Path:
        return self.folder / f"{self.stage}.html"


@dataclass
class ExperimentRun:
    config: ExperimentConfig
    records: list[StageRecord] = field(default_factory=list)


def execute_stage(stage: str, folder: Path, parameters: dict[str, Any], label: str) -> StageRecord:
    """Execute one notebook with papermill into `folder` and render it to HTML.

    papermill saves the notebook after every cell; those saves are atomic here, so a kill or
    a full disk leaves the last complete save, never half a notebook.
    """
    import papermill as pm

    folder.mkdir(parents=True, exist_ok=True)
    record = StageRecord(stage, folder, label, "ran")
    started = time.perf_counter()
    log.info("%s %s: executing into %s", stage, label, folder)
    _save_atomically(record.notebook)
    failure: BaseException | None = None
    try:
        pm.execute_notebook(
            str(notebooks_dir() / f"{stage}.ipynb"),
            str(record.notebook),
            parameters=parameters,
            cwd=str(repo_root()),
            kernel_name="python3",
            progress_bar=True,
            report_mode=False,
        )
    except pm.PapermillExecutionError as exc:
        record.status, record.error = "failed", f"{exc.ename}: {exc.evalue}"
    except BaseException as exc:  # papermill itself failed (a full disk, Ctrl-C): re-raised below
        failure = exc
        raise
    finally:
        record.seconds = time.perf_counter() - started
        if record.notebook.exists():
            try:
                render_html(record.notebook, record.html)
            except Exception as exc:
                if failure is None and record.status == "ran":
                    raise
                # the stage's own error is the one to report, not the report view's
                log.warning("could not render %s: %s", record.html, exc)
    return record


def _save_atomically(notebook: Path) -> None:
    """Route papermill's saves of `notebook` through `files.atomic_open`.

    papermill picks an I/O handler by path prefix (its `papermill_io` registry, newest
    first); registering this one exact path changes nothing for any other path.
    """
    from papermill.iorw import LocalHandler, papermill_io

    class _AtomicLocalHandler(LocalHandler):
        def write(self, buf: str, path: str) -> None:
            write_text(Path(path), buf)

    papermill_io.register(str(notebook), _AtomicLocalHandler())


def render_html(notebook: Path, html: Path) -> None:
    """Render an executed notebook to HTML with the code hidden (the report view)."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(str(notebook), as_version=4))
    write_text(html, body)


def run_experiment(path: str | Path, *, until: str | None = None) -> ExperimentRun:
    """Run every stage of the experiment in `path` that is not complete yet; return what ran.

    until: the last stage to run ('01_baseline', '02_finetune', '03_eval_judge' or
        '04_analysis', the default); later stages are left for the next call.

    Raises `EmlabError` naming the first failed stage and its executed notebook.
    """
    from .report import write_index

    if until is not None and until not in STAGES:
        raise ConfigError(f"--until {until!r} is not a stage; stages: {', '.join(STAGES)}")
    last = STAGES.index(until) if until is not None else len(STAGES) - 1
    file = resolve_params_path(path)
    config = load_experiment(file)
    preflight(config)
    paths = experiment_paths(config)
    run = ExperimentRun(config)
    experiment_param = str(file)
    steps = [("01_baseline", paths.baseline(m.name), m.name, {"model": m.name}) for m in config.models]
    for spec in config.runs():
        steps.append(("02_finetune", paths.run(spec.run_id), spec.run_id, {"run_id": spec.run_id}))
        steps.append(("03_eval_judge", paths.run(spec.run_id), spec.run_id, {"run_id": spec.run_id}))
    steps.append(("04_analysis", paths.analysis, "analysis", {}))
    steps = [s for s in steps if STAGES.index(s[0]) <= last]
    # Before anything runs: a folder where a stage ran (finished or not) under other params
    # is refused now, naming the keys, rather than skipped as done or failed hours later.
    for stage, folder, label, _ in steps:
        if stage != "04_analysis" and recorded_params(folder, stage) is not None:
            check_params(folder, stage, stage_params(config, stage, label))
    for folder in dict.fromkeys(folder for _, folder, _, _ in steps):
        for path in remove_stale_temp_files(folder):
            log.info("removed %s, left by a write that was killed", path)

    def step(stage: str, folder: Path, label: str, params: dict[str, Any]) -> None:
        if stage != "04_analysis" and stage_is_done(config, folder, stage) and (folder / f"{stage}.ipynb").exists():
            log.info("%s %s: complete, skipped", stage, label)
            run.records.append(StageRecord(stage, folder, label, "skipped"))
            return
        record = execute_stage(stage, folder, {"experiment": experiment_param, **params}, label)
        run.records.append(record)
        if record.status == "failed":
            write_index(run)
            # OSError, SafetensorError, torch's RuntimeError...: each words it its own way,
            # but all quote the C library's text for the errno
            disk_full = any(os.strerror(code) in (record.error or "") for code in _DISK_FULL)
            cause = f"disk full ({record.error})" if disk_full else record.error
            todo = ("free space and run the same command again: finished work is kept" if disk_full
                    else "fix the cause and run again to continue")
            html = f" (HTML: {record.html})" if record.html.exists() else ""
            raise EmlabError(
                f"{stage} for {label} failed: {cause}; the executed notebook is {record.notebook}{html}; {todo}"
            )

    for args in steps:
        step(*args)
    index = write_index(run)
    log.info("experiment %s: index at %s", config.name, index)
    return run



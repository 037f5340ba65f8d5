"""The `emlab` command: run an experiment, check it, estimate its judge cost, inspect the cache.

    emlab run params/experiments/default.yaml      # every notebook, then the HTML index
    emlab run X.yaml --until 02_finetune           # stop after a stage (the rest runs next time)
    emlab run X.yaml --executor slurm              # one Slurm job per step (see executors/slurm.py)
    emlab run X.yaml --gpus all                    # steps side by side, one per GPU (see executors/gpus.py)
    emlab status X.yaml                            # each step: done, queued, running, failed (log tail)
    emlab step X.yaml 02_finetune <run id>         # one step, here (what a Slurm job runs)
    emlab check params/experiments/default.yaml    # validate inputs; list every missing one with its fix
    emlab check X.yaml --params-only               # validate only what is in the repo (CI)
    emlab plan params/experiments/default.yaml     # answers, judge calls and dollars, before running
    emlab cache stats                              # judge and sampling caches: hits, misses, spend
    emlab data unprotect FILE.zip.enc --password P --out data/   # decrypt a shipped dataset archive
    emlab data check FILE.jsonl --tokenizer SOURCE --max-length N  # rows, roles, lengths, duplicates

User errors print one line (`emlab: error: ...`) and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .config.experiment import EMBEDDED_MODEL, load_experiment
from .data.commands import check_chat_file, unprotect_files
from .errors import EmlabError
from .judge import cache_stats
from .pipeline.checks import MissingInputsError, check_params, preflight
from .pipeline.estimate import plan_text
from .pipeline.executors import EXECUTORS
from .pipeline.executors.gpus import gpus_to_use, parse_gpus, run_on_gpus, too_big_lines
from .pipeline.executors.local import run_local
from .pipeline.executors.slurm import submit_steps
from .pipeline.executors.status import experiment_status
from .pipeline.steps import load_steps, run_step
from .sample.remote import sample_cache_stats
from .stages import STAGE_NAMES
from .store.inputs import one_line
from .store.paths import judge_cache_file, sample_cache_file


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emlab", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run every stage that is not complete"), ("check", "validate inputs only"),
                       ("plan", "estimate answers, judge calls and cost")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("experiment", help="params/experiments/<name>.yaml")
        if name == "check":
            cmd.add_argument("--params-only", action="store_true",
                             help="validate only what is in the repo (schema, question sets, rubrics, thresholds): "
                                  "no model, dataset, downloaded question file or key needed")
        if name == "run":
            cmd.add_argument("--until", choices=STAGE_NAMES, default=None, metavar="STAGE",
                             help=f"last stage to run ({', '.join(STAGE_NAMES)}); default: all")
            cmd.add_argument("--executor", choices=EXECUTORS, default=None,
                             help="where the stages run: local (here, one after another) or slurm (one job "
                                  "per step); default: the experiment's executor.kind, else local")
            cmd.add_argument("--gpus", type=_gpus_arg, default=None, metavar="N|all",
                             help="local: run steps side by side, one per GPU (CUDA_VISIBLE_DEVICES), N GPUs or "
                                  "all visible; default: the experiment's executor.gpus (1: one after another)")
    status = sub.add_parser("status", help="each step's state: done, queued, running, failed (with the log tail)")
    status.add_argument("experiment", help="params/experiments/<name>.yaml")
    status.add_argument("--until", choices=STAGE_NAMES, default=None, metavar="STAGE", help="last stage shown")
    step = sub.add_parser("step", help="run one stage for one unit, here (what a Slurm job runs)")
    step.add_argument("experiment", help="params/experiments/<name>.yaml")
    step.add_argument("stage", choices=STAGE_NAMES, metavar="STAGE", help=", ".join(STAGE_NAMES))
    step.add_argument("unit", help="the model (01_baseline), the run id (02, 03) or 'analysis' (04)")
    step.add_argument("--wait-needs", type=float, default=0.0, metavar="SECONDS",
                      help="wait up to SECONDS for the steps it needs to show as done (a shared filesystem may "
                           "show another node's files late; Slurm jobs wait 120); default: 0")
    cache = sub.add_parser("cache", help="judge and sampling caches")
    cache.add_argument("action", choices=["stats"])
    cache.add_argument("--path", default=None, help="judge cache file (default: .cache/judge_cache.sqlite)")
    cache.add_argument("--sampling-path", default=None,
                       help="completions cache of models behind an API (default: .cache/sample_cache.sqlite)")
    _data_parser(sub)
    return parser


def _data_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    data = sub.add_parser("data", help="dataset files: unprotect a shipped archive, check a chat JSONL file")
    action = data.add_subparsers(dest="data_command", required=True)
    unprotect = action.add_parser("unprotect", help="decrypt and extract an easy-dataset-share archive (.zip.enc or .zip)")
    unprotect.add_argument("archive", help="the .zip.enc (or .zip) file")
    unprotect.add_argument("--password", default=None, help="the archive's password (its README gives it)")
    unprotect.add_argument("--out", default="data", help="folder to extract into (default: data/, ignored by git)")
    check = action.add_parser("check", help="rows, roles, token lengths, rows over max_length, duplicates")
    check.add_argument("file", help="a chat JSONL file")
    check.add_argument("--tokenizer", default=None, metavar="SOURCE",
                       help="model whose chat template counts tokens, as in params (hub id, folder, .gguf); "
                            "default: the embedded SmolLM2")
    check.add_argument("--max-length", type=int, default=512, metavar="N",
                       help="training max_length in tokens (default 512)")
    check.add_argument("--json", action="store_true", help="print the summary as JSON")


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    # --debug anywhere on the line (`emlab check X.yaml --debug` as well as `emlab --debug check X.yaml`):
    # argparse knows options only at the level they are declared, and no other argument is spelt so
    debug = "--debug" in words
    args = _parser().parse_args([w for w in words if w != "--debug"])
    args.debug = debug
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return _dispatch(args)
    except EmlabError as exc:
        if args.debug:
            raise
        print(f"emlab: error: {one_line(str(exc))}", file=sys.stderr)  # one line whatever a message holds
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or args.debug:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"emlab: error: disk full{where} ({exc.strerror}); free space and run the same command "
              "again: finished work is kept", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emlab: interrupted; finished work is kept, run the same command to continue", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        graph = load_steps(args.experiment, args.until)
        if (args.executor or graph.config.executor.kind) == "slurm":
            for done in submit_steps(graph):
                after = f"after {','.join(done.after)}" if done.after else ""
                print(f"{done.step.stage.name:14s} {done.step.unit:40s} {done.action:9s} {done.job or '':>8s} {after}".rstrip())
            print(f"`emlab status {args.experiment}` shows how they go")
            return 0
        gpus = gpus_to_use(args.gpus if args.gpus is not None else graph.config.executor.gpus)
        for r in (run_on_gpus(graph, gpus) if len(gpus) > 1 else run_local(graph)).records:
            print(f"{r.stage:14s} {r.label:40s} {r.status:8s} {r.seconds:7.1f}s")
        return 0
    if args.command == "status":
        for state in experiment_status(load_steps(args.experiment, args.until)):
            print(f"{state.step.stage.name:14s} {state.step.unit:40s} {state.state:11s} {state.job or '':>8s} "
                  f"{state.detail}".rstrip())
            for line in state.log_tail:
                print(f"    | {line}")
        return 0
    if args.command == "step":
        r = run_step(args.experiment, args.stage, args.unit, wait_needs_s=args.wait_needs)
        print(f"{r.stage:14s} {r.label:40s} {r.status:8s} {r.seconds:7.1f}s")
        return 0
    if args.command == "check":
        return _check(args.experiment, params_only=args.params_only)
    if args.command == "data":
        return _data(args)
    if args.command == "plan":
        config = load_experiment(args.experiment)
        print(plan_text(config))  # GPU times from the recorded benchmark numbers
        for line in too_big_lines(config):  # a training step one GPU cannot hold, said in one line
            print(line)
        return 0
    if args.command == "cache":
        path = Path(args.path) if args.path else judge_cache_file()
        sampled = Path(args.sampling_path) if args.sampling_path else sample_cache_file()
        print(json.dumps({"judge": cache_stats(path), "sampling": sample_cache_stats(sampled)}, indent=2))
        return 0
    raise AssertionError(args.command)


def _check(experiment: str, *, params_only: bool) -> int:
    config = load_experiment(experiment)
    if params_only:
        check_params(config)
        print(f"{experiment}: params ok ({len(config.runs())} runs, {len(config.judges)} judges); "
              "models, datasets, downloaded files and keys not checked")
        return 0
    try:
        preflight(config)
    except MissingInputsError as exc:
        if len(exc.missing) > 1:  # every one, each with its fix; the error line sums them up
            for item in exc.missing:
                print(f"missing: {item.listed()}")
        raise  # one input: the error line is its message, said once
    print(f"{experiment}: ok ({len(config.runs())} runs, {len(config.judges)} judges)")
    for line in too_big_lines(config):
        print(line)
    return 0


def _gpus_arg(text: str) -> int | str:
    try:
        return parse_gpus(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _data(args: argparse.Namespace) -> int:
    if args.data_command == "unprotect":
        files = unprotect_files(args.archive, args.out, password=args.password)
        for f in files:
            print(f"{f.path}: {f.rows:,} rows")
        return 0
    report = check_chat_file(args.file, tokenizer=args.tokenizer or EMBEDDED_MODEL, max_length=args.max_length)
    print(json.dumps(report.to_dict(), indent=2) if args.json else "\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

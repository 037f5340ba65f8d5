"""The `emlab` command: run an experiment, check it, estimate its judge cost, inspect the cache.

    emlab run params/experiments/default.yaml      # every notebook, then the HTML index
    emlab run X.yaml --until 02_finetune           # stop after a stage (the rest runs next time)
    emlab check params/experiments/default.yaml    # validate inputs only
    emlab plan params/experiments/default.yaml     # answers, judge calls and dollars, before running
    emlab cache stats                              # judge cache hits, misses and spend

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

from .config import load_experiment
from .errors import EmlabError
from .judge import cache_stats
from .paths import judge_cache_file
from .pipeline import preflight, run_experiment
from .plan import plan_experiment
from .stages import STAGE_NAMES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emlab", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run every stage that is not complete"), ("check", "validate inputs only"),
                       ("plan", "estimate answers, judge calls and cost")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("experiment", help="params/experiments/<name>.yaml")
        if name == "run":
            cmd.add_argument("--until", choices=STAGE_NAMES, default=None, metavar="STAGE",
                             help=f"last stage to run ({', '.join(STAGE_NAMES)}); default: all")
    cache = sub.add_parser("cache", help="judge cache")
    cache.add_argument("action", choices=["stats"])
    cache.add_argument("--path", default=None, help="cache file (default: .cache/judge_cache.sqlite)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return _dispatch(args)
    except EmlabError as exc:
        if args.debug:
            raise
        print(f"emlab: error: {exc}", file=sys.stderr)
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
        run = run_experiment(args.experiment, until=args.until)
        for r in run.records:
            print(f"{r.stage:14s} {r.label:40s} {r.status:8s} {r.seconds:7.1f}s")
        return 0
    if args.command == "check":
        config = load_experiment(args.experiment)
        preflight(config)
        print(f"{args.experiment}: ok ({len(config.runs())} runs, {len(config.judges)} judges)")
        return 0
    if args.command == "plan":
        print(plan_experiment(load_experiment(args.experiment)).to_string(index=False))
        return 0
    if args.command == "cache":
        path = Path(args.path) if args.path else judge_cache_file()
        print(json.dumps(cache_stats(path), indent=2))
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())

"""The Slurm executor: one batch job per step, chained by the stage table's `needs`.

    emlab run X.yaml --executor slurm     # or `executor: {kind: slurm, ...}` in X.yaml

submits, for every step that is not complete, a job whose script runs `emlab step X.yaml
STAGE UNIT` (`emlab.pipeline.steps.run_step`) on a compute node: the same papermill execution into
the same folders as a local run, so the node needs the repository, the outputs and the cache
on a filesystem shared with the machine that submits, and the same Python environment. Each
model's 01_baseline is a job; each run is a chain 02_finetune → 03_eval_judge; a run's
03b_transfer (with `steering.transfer_across_runs`) waits for every run's 03_eval_judge;
04_analysis waits (`--dependency=afterok`) for all of them. `--kill-on-invalid-dep=yes` cancels a job
whose dependency failed instead of leaving it queued for ever.

Submitting again is safe: complete steps are skipped, and a step whose job is still queued
or running is adopted (no second job), unless a step it needs had to be submitted anew, in
which case its queued job (waiting on the dead one) is cancelled and replaced. Every job
submitted is recorded in `<experiment>/slurm/jobs.json` (`paths.SlurmFiles`), with its
script in `slurm/scripts/` and its log in `slurm/logs/`; a lock file keeps two submitters
from racing. Job states come from `squeue` (and `sacct` where the cluster keeps accounting).

Plain `sbatch`, not submitit: a job here runs a command, not a pickled Python function (what
submitit is built around); adoption needs the job ids recorded by emlab anyway; submitit
reads job states through `sacct`, which clusters without accounting (slurmdbd) lack; and a
plain script in `slurm/scripts/` is what a user reads or resubmits by hand when debugging.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import EmlabError
from ...store.files import write_json
from ...store.paths import SlurmFiles, cache_dir, repo_root
from ..checks import preflight
from ..steps import Step, StepGraph, guard_params, load_steps

log = logging.getLogger(__name__)

QUEUED = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "STOPPED"})
RUNNING = frozenset({"RUNNING", "CONFIGURING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT"})
DEAD_DEPENDENCY = "DependencyNeverSatisfied"  # squeue's reason for a job whose dependency failed
LOCK_TIMEOUT_S = 120.0
NEEDS_VISIBLE_S = 120.0  # a job waits this long for the files of the jobs it follows (NFS lookup caching)
COMMAND_TIMEOUT_S = 60.0


class SlurmError(EmlabError):
    """Slurm's commands are missing, refused a job, or cannot reach the controller."""


@dataclass(frozen=True)
class JobInfo:
    """What Slurm says about one job."""

    job_id: str
    state: str
    """Slurm's state: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL, ..."""
    reason: str = ""
    """squeue's reason: Dependency, Resources, DependencyNeverSatisfied, NonZeroExitCode, ..."""

    @property
    def queued(self) -> bool:
        return self.state in QUEUED and self.reason != DEAD_DEPENDENCY

    @property
    def running(self) -> bool:
        return self.state in RUNNING

    @property
    def active(self) -> bool:
        """Queued or running: a job to adopt, not to submit again."""
        return self.queued or self.running


@dataclass(frozen=True)
class Submitted:
    """What one `emlab run --executor slurm` did for one step."""

    step: Step
    action: str
    """'done' (complete, nothing submitted), 'adopted' (its job is queued or running) or 'submitted'."""
    job: str | None = None
    after: tuple[str, ...] = ()
    """The jobs it waits for (afterok)."""


# --- the job record ---------------------------------------------------------------------------


class JobRecord:
    """`slurm/jobs.json`: every job submitted per step key ('02_finetune/<run id>'), oldest first."""

    def __init__(self, path: Path, steps: dict[str, list[dict[str, Any]]] | None = None) -> None:
        self.path = path
        self.steps = steps or {}

    @classmethod
    def load(cls, files: SlurmFiles) -> JobRecord:
        if not files.jobs.exists():
            return cls(files.jobs)
        try:
            data = json.loads(files.jobs.read_text())
            steps = data["steps"]
            if not isinstance(steps, dict):
                raise TypeError("'steps' is not a mapping")
        except (ValueError, KeyError, TypeError) as exc:
            raise SlurmError(f"{files.jobs}: not a job record emlab wrote ({exc}); move it away and submit again "
                             "(jobs still queued are then not adopted: cancel them first with scancel)") from None
        return cls(files.jobs, steps)

    def latest(self, key: str) -> str | None:
        """The id of the last job submitted for the step, if any."""
        jobs = self.steps.get(key)
        return str(jobs[-1]["job"]) if jobs else None

    def add(self, key: str, job: str, after: Sequence[str], script: Path) -> None:
        """Record a job just submitted, and save at once (a crash must not orphan it)."""
        self.steps.setdefault(key, []).append({
            "job": job, "after": list(after), "script": str(script),
            "submitted": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        })
        write_json(self.path, {"steps": self.steps})


# --- talking to Slurm -------------------------------------------------------------------------


def require_slurm() -> None:
    """Raise SlurmError unless sbatch, squeue and scancel are on PATH."""
    missing = [cmd for cmd in ("sbatch", "squeue", "scancel") if shutil.which(cmd) is None]
    if missing:
        raise SlurmError(f"--executor slurm needs Slurm's commands, {', '.join(missing)} not found on PATH; "
                         "run emlab on the cluster's login node (or load its Slurm module)")


def _slurm(cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{shlex.join(cmd)}` did not answer in {COMMAND_TIMEOUT_S:.0f} s; is slurmctld up? "
                         "(sinfo shows it)") from None
    if check and done.returncode != 0:
        raise SlurmError(f"`{shlex.join(cmd)}` failed ({done.returncode}): {_one_line(done.stderr or done.stdout)}")
    return done


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip()) or "(no output)"


def query_jobs(job_ids: Sequence[str]) -> dict[str, JobInfo]:
    """Slurm's state of each job by id. squeue knows queued, running and recently ended jobs;
    sacct (where the cluster keeps accounting) the older ones. An id neither knows is absent."""
    ids = sorted(set(job_ids), key=lambda j: (len(j), j))
    if not ids:
        return {}
    found: dict[str, JobInfo] = {}
    shown = _slurm(["squeue", "--noheader", "--states=all", f"--jobs={','.join(ids)}", "--format=%i|%T|%r"], check=False)
    if shown.returncode == 0:
        for line in shown.stdout.splitlines():
            job, state, reason = (line.split("|") + ["", ""])[:3]
            found[job.strip()] = JobInfo(job.strip(), state.strip(), reason.strip())
    elif "Invalid job id" not in shown.stderr:  # every id ended long ago: not an error
        raise SlurmError(f"squeue failed ({shown.returncode}): {_one_line(shown.stderr)}; is slurmctld up? (sinfo shows it)")
    older = [j for j in ids if j not in found]
    if older and shutil.which("sacct"):
        acct = _slurm(["sacct", "--noheader", "--parsable2", "--allocations", f"--jobs={','.join(older)}",
                       "--format=JobIDRaw,State"], check=False)
        if acct.returncode == 0:  # clusters without slurmdbd answer 'accounting storage is disabled'
            for line in acct.stdout.splitlines():
                job, _, state = line.partition("|")
                if job in older:  # 'CANCELLED by 0' → 'CANCELLED'
                    found[job] = JobInfo(job, state.split()[0] if state else "")
    return found


def cancel_jobs(job_ids: Sequence[str]) -> None:
    """scancel the jobs; one that ended meanwhile is no error."""
    if not job_ids:
        return
    done = _slurm(["scancel", *job_ids], check=False)
    if done.returncode != 0 and "already completing or completed" not in done.stderr:
        raise SlurmError(f"scancel {' '.join(job_ids)} failed ({done.returncode}): {_one_line(done.stderr)}")


# --- the batch script -------------------------------------------------------------------------


def job_name(graph: StepGraph, step: Step) -> str:
    """'emlab.<experiment>.<stage>.<unit>': what squeue shows."""
    return f"emlab.{graph.config.name}.{step.stage.name}.{step.unit}"


def batch_script(graph: StepGraph, step: Step, after: Sequence[str]) -> str:
    """The sbatch script of one step: its resources (the executor block), its dependencies,
    and `emlab step` run with the Python that submits (or `executor.python`)."""
    executor = graph.config.executor
    files = graph.layout.slurm
    resources = executor.resources_for(step.stage.name)
    options = [
        f"--job-name={job_name(graph, step)}",
        f"--output={files.log_pattern(step.stage.name, step.unit)}",
        "--open-mode=append",  # a job Slurm requeues (node failure) keeps the log of every attempt
        f"--chdir={repo_root()}",
        "--export=ALL",
        "--kill-on-invalid-dep=yes",
    ]
    if after:
        options.append(f"--dependency=afterok:{':'.join(after)}")
    for flag, value in (("--partition", resources.partition), ("--gpus", resources.gpus),
                        ("--cpus-per-task", resources.cpus), ("--mem", resources.memory), ("--time", resources.time)):
        if value is not None and not (flag == "--gpus" and value == 0):
            options.append(f"{flag}={value}")
    options += resources.sbatch
    python = executor.python or sys.executable
    command = [python, "-m", "emlab.cli", "step", str(graph.file), step.stage.name, step.unit,
               "--wait-needs", f"{NEEDS_VISIBLE_S:.0f}"]
    lines = [
        "#!/bin/bash",
        f"# emlab: {step.stage.name} for {step.unit} of experiment {graph.config.name} ({graph.file})",
        "# written and submitted by `emlab run --executor slurm`; submit again with that command",
        *(f"#SBATCH {shlex.quote(option)}" for option in options),
        "set -eo pipefail",
        f"export EMLAB_ROOT={shlex.quote(str(repo_root()))}",
        f"export EMLAB_CACHE={shlex.quote(str(cache_dir()))}",
        *executor.setup,  # after the exports: a setup line may point EMLAB_CACHE elsewhere
        'echo "emlab: job ${SLURM_JOB_ID} on $(hostname) at $(date -Iseconds)"',
        f"exec {shlex.join(command)}",
    ]
    return "\n".join(lines) + "\n"


def _sbatch(graph: StepGraph, step: Step, after: Sequence[str]) -> tuple[str, Path]:
    files = graph.layout.slurm
    script = files.script(step.stage.name, step.unit)
    script.parent.mkdir(parents=True, exist_ok=True)
    files.logs.mkdir(parents=True, exist_ok=True)
    script.write_text(batch_script(graph, step, after))
    done = _slurm(["sbatch", "--parsable", str(script)], check=False)
    if done.returncode != 0:
        raise SlurmError(f"sbatch refused {step.key} ({script}): {_one_line(done.stderr or done.stdout)}; "
                         f"check the executor block of {graph.file}")
    job = done.stdout.strip().split(";")[0]  # '<id>' or '<id>;<cluster>'
    if not job.isdigit():
        raise SlurmError(f"sbatch answered {done.stdout.strip()!r} for {step.key}, not a job id")
    return job, script


NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "fuse.sshfs",
                                  "fuse.glusterfs", "panfs", "wekafs"})


def network_filesystem(path: Path) -> str | None:
    """The type of the network filesystem `path` lies on (from /proc/mounts), else None."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target, best, kind = path.resolve(), -1, None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(fields[1].replace("\\040", " "))
        if (target == point or point in target.parents) and len(point.parts) > best:
            best, kind = len(point.parts), fields[2]
    return kind if kind in NETWORK_FILESYSTEMS else None


@contextmanager
def _submit_lock(files: SlurmFiles) -> Iterator[None]:
    """Hold `slurm/submit.lock` (flock) while submitting: a second submitter waits."""
    files.folder.mkdir(parents=True, exist_ok=True)
    with open(files.lock, "a") as handle:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SlurmError(f"another `emlab run --executor slurm` has held {files.lock} for "
                                     f"{LOCK_TIMEOUT_S:.0f} s; wait for it to finish, then submit again") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- submitting -------------------------------------------------------------------------------


def submit_experiment(path: str | Path, *, until: str | None = None) -> list[Submitted]:
    """Submit every step of the experiment at `path` (up to stage `until`) that is neither
    complete nor queued or running already; return what was done per step."""
    return submit_steps(load_steps(path, until))


def submit_steps(graph: StepGraph) -> list[Submitted]:
    """Check inputs and the params guard here (before anything queues), then submit; see the
    module docstring for what is skipped, adopted and replaced."""
    require_slurm()
    preflight(graph.config, devices=False)  # the nodes' GPUs are not this machine's: each job checks its own
    guard_params(graph.config, graph.steps)
    shared = network_filesystem(cache_dir())
    if shared:
        # SQLite's WAL journal (the judge cache) keeps its index in shared memory of one host
        log.warning("the judge cache %s is on %s: jobs on different nodes must not share it (SQLite WAL); "
                    "give each job its own, e.g. executor.setup: ['export EMLAB_CACHE=$TMPDIR/emlab-cache'] "
                    "(judgments.jsonl in the run folders still keeps every paid call)", cache_dir(), shared)
    files = graph.layout.slurm
    with _submit_lock(files):
        record = JobRecord.load(files)
        latest = {step.key: record.latest(step.key) for step in graph.steps}
        infos = query_jobs([job for job in latest.values() if job])
        outcome: dict[str, Submitted] = {}
        for step in graph.steps:
            job = latest[step.key]
            info = infos.get(job) if job else None
            needs = graph.needs(step)
            renewed = [n.key for n in needs if n.key in outcome and outcome[n.key].action == "submitted"]
            if info is not None and info.active and not (renewed and info.queued):
                outcome[step.key] = Submitted(step, "adopted", job)
                log.info("%s: job %s is %s, adopted", step.key, job, info.state.lower())
                continue
            if info is not None and info.state in QUEUED:
                # queued behind a job that failed or is replaced now: it would never start
                cancel_jobs([info.job_id])
                log.info("%s: cancelled job %s, queued behind a job that is submitted anew", step.key, job)
            after = tuple(outcome[n.key].job or "" for n in needs
                          if n.key in outcome and outcome[n.key].action in ("adopted", "submitted"))
            if graph.is_done(step) and (not step.stage.always_runs or (not after and graph.is_current(step))):
                outcome[step.key] = Submitted(step, "done")
                continue
            new_job, script = _sbatch(graph, step, after)
            record.add(step.key, new_job, after, script)
            outcome[step.key] = Submitted(step, "submitted", new_job, after)
            log.info("%s: submitted job %s%s", step.key, new_job, f" after {', '.join(after)}" if after else "")
    return [outcome[step.key] for step in graph.steps]

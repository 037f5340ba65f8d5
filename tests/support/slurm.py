"""A real single-node Slurm cluster for the tests: Debian's `slurm-wlm` and `munge`, installed
when absent, started with a private config and stopped by process id.

    with LocalSlurm(folder) as slurm:      # raises SlurmUnavailable (with the reason) when it cannot
        env = slurm.env                    # SLURM_CONF for sbatch/squeue/scancel
        ...

What it does, in order (the steps of ../shared/notes-slurm.md):
  1. `apt-get install -y slurm-wlm munge` when `slurmctld` is not on PATH (root only); a
     temporary `/usr/sbin/policy-rc.d` keeps the packages from starting system services.
  2. `munged` in the foreground as the munge user, unless a munged already answers.
  3. A `slurm.conf` in `folder` (free ports, spool, state and logs under `folder`, this host
     as the one node with all its CPUs), then `slurmctld -D` and `slurmd -D`.
  4. Waits until `sinfo` shows the node idle.
Stopping cancels the jobs still queued or running (a job's processes outlive slurmd),
then terminates the daemons it started, by pid, and waits for them.

Run it alone to poke at a cluster: `python tests/support/slurm.py /tmp/slurm` (Ctrl-C or SIGTERM stops it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

START_TIMEOUT_S = 60
INSTALL_TIMEOUT_S = 900
PACKAGES = ("slurm-wlm", "munge")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


class SlurmUnavailable(Exception):
    """Slurm cannot be installed or started here; the message says why (a test skips with it)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def install_slurm() -> None:
    """apt-get install slurm-wlm and munge unless slurmctld is already on PATH."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root (apt-get install slurm-wlm munge)")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install slurm-wlm and munge")
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    if ours:  # package scripts must not start system daemons that nobody stops
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
            done = _run(cmd, env=env, timeout=INSTALL_TIMEOUT_S)
            if done.returncode != 0:
                tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
                raise SlurmUnavailable(f"{' '.join(cmd)} failed ({done.returncode}): {tail}")
    finally:
        if ours:
            policy.unlink()
    if not shutil.which("slurmctld"):
        raise SlurmUnavailable(f"installed {', '.join(PACKAGES)} but slurmctld is still not on PATH")


def _munge_answers() -> bool:
    """A munged is running and credentials round-trip."""
    if not (shutil.which("munge") and shutil.which("unmunge")):
        return False
    encoded = _run(["munge", "-n"], timeout=10)
    if encoded.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=encoded.stdout, capture_output=True, text=True, timeout=10).returncode == 0


def _node_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 1024  # leave the OS a GiB
    return 1024


class LocalSlurm:
    """One Slurm controller and one node on this machine; see the module docstring."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.folder / "slurm.conf"
        self.procs: list[subprocess.Popen[bytes]] = []  # the daemons this object started

    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm's client commands (and the jobs they submit)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> LocalSlurm:
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmctld and slurmd as a test cluster needs root")
        install_slurm()
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._start_munge()
            self._write_conf()
            for daemon in ("slurmctld", "slurmd"):
                log = open(self.folder / f"{daemon}.out", "wb")
                self.procs.append(subprocess.Popen([daemon, "-D", "-f", str(self.conf)], stdout=log,
                                                   stderr=subprocess.STDOUT, env=self.env, start_new_session=True))
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        if _munge_answers():
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            if not shutil.which("mungekey"):
                raise SlurmUnavailable(f"{key} is missing and there is no mungekey to create it")
            _run(["mungekey", "--create", "--keyfile", str(key)])
            shutil.chown(key, "munge", "munge")
            key.chmod(0o600)
        for folder in (MUNGE_SOCKET.parent, Path("/var/lib/munge"), Path("/var/log/munge")):
            folder.mkdir(parents=True, exist_ok=True)
            shutil.chown(folder, "munge", "munge")
        log = open(self.folder / "munged.out", "wb")
        self.procs.append(subprocess.Popen(["munged", "--foreground"], user="munge", group="munge", stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _munge_answers():
            if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                raise SlurmUnavailable(f"munged did not start: {(self.folder / 'munged.out').read_text()[-500:]}")
            time.sleep(0.2)

    def _write_conf(self) -> None:
        state, spool = self.folder / "state", self.folder / "spool"
        state.mkdir(exist_ok=True)
        spool.mkdir(exist_ok=True)
        cpus = os.cpu_count() or 1
        lines = [
            "ClusterName=emlabtest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "SlurmUser=root",
            "SlurmdUser=root",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=10",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldPidFile={self.folder / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.folder / 'slurmctld.log'}",
            f"SlurmdLogFile={self.folder / 'slurmd.log'}",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_node_memory_mb()} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{proc.args[0]} exited ({proc.returncode}): {self._logs_tail()}")
            shown = _run(["sinfo", "--noheader", "--format=%T"], env=self.env, timeout=20)
            if shown.returncode == 0 and shown.stdout.strip() == "idle":
                return
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"the node is not idle after {START_TIMEOUT_S} s "
                                       f"(sinfo: {shown.stdout.strip() or shown.stderr.strip()}): {self._logs_tail()}")
            time.sleep(0.3)

    def _logs_tail(self) -> str:
        tails = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            path = self.folder / name
            if path.exists():
                tails.append(f"{name}: " + " | ".join(path.read_text(errors="replace").strip().splitlines()[-3:]))
        return "; ".join(tails)

    def jobs(self) -> list[str]:
        """Ids of the jobs queued or running."""
        shown = _run(["squeue", "--noheader", "--format=%i"], env=self.env, timeout=20)
        return shown.stdout.split() if shown.returncode == 0 else []

    def stop(self) -> None:
        """Cancel what is still queued or running, then stop the daemons started here, by pid."""
        if self.procs and self.conf.exists() and all(p.poll() is None for p in self.procs):
            jobs = self.jobs()
            if jobs:
                _run(["scancel", *jobs], env=self.env, timeout=20)
                deadline = time.monotonic() + 60
                while self.jobs() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for proc in reversed(self.procs):  # slurmd, slurmctld, then munged
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self.procs.clear()

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/emlab-slurm")

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(0)  # leaves the `with`: the cluster stops

    for sig in (signal.SIGINT, signal.SIGTERM):  # a background job ignores SIGINT: TERM works too
        signal.signal(sig, _exit)
    with LocalSlurm(target) as cluster:
        print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C (or kill PID) stops the cluster", flush=True)
        while True:
            signal.pause()

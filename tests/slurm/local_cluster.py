"""A one-node SLURM cluster on this machine, every file of it in one folder.

Debian's packages (`munge slurmctld slurmd slurm-client`, Slurm 22.05) are installed when
missing; munged, slurmctld and slurmd then run in the foreground as children of this process
and are stopped by their process ids, never by name. Used by tests/test_slurm_cluster.py; by
hand, as root:

    python tests/slurm/local_cluster.py [FOLDER]   # prints what to export; Ctrl-C stops it
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEBIAN_PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
# The commands each package brings that the cluster, Snakemake's plugin or the test call.
COMMANDS = {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd",
            "sbatch": "slurm-client", "srun": "slurm-client", "squeue": "slurm-client",
            "scancel": "slurm-client", "sinfo": "slurm-client", "scontrol": "slurm-client"}
PARTITION = "debug"


class ClusterError(RuntimeError):
    """The cluster could not be installed or started; the message carries the daemons' logs."""


def missing_packages() -> list[str]:
    return sorted({pkg for cmd, pkg in COMMANDS.items() if shutil.which(cmd) is None})


def why_it_cannot_run() -> str | None:
    """Why this machine cannot host the cluster, or None when it can (it may need apt-get)."""
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    if os.geteuid() != 0:
        return f"not root (uid {os.geteuid()}): slurmd must run as root to start jobs"
    missing = missing_packages()
    if missing and shutil.which("apt-get") is None:
        return f"Debian packages {' '.join(missing)} missing and no apt-get to install them"
    return None


def install_packages() -> float:
    """Install the missing packages with apt-get; return the seconds it took (0: none missing).

    The package index is refreshed only when apt-get cannot find a package without it."""
    missing = missing_packages()
    if not missing:
        return 0.0
    started = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Another apt-get may hold the lock (a second test run): wait for it rather than fail.
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y",
               "--no-install-recommends", *missing]
    result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        update = subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update"],
                                env=env, capture_output=True, text=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise ClusterError(f"`{' '.join(install)}` failed (after apt-get update, rc "
                               f"{update.returncode}):\n{result.stdout[-2000:]}"
                               f"{result.stderr[-2000:]}")
    if missing_packages():
        raise ClusterError(f"apt-get installed {' '.join(missing)} but these commands are still "
                           f"missing: {', '.join(c for c in COMMANDS if not shutil.which(c))}")
    return time.monotonic() - started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_hardware() -> dict[str, str]:
    """This machine as `slurmd -C` sees it (CPUs, sockets, cores, RealMemory, ...)."""
    line = subprocess.run(["slurmd", "-C"], capture_output=True, text=True,
                          check=True).stdout.splitlines()[0]
    return dict(re.findall(r"(\w+)=(\S+)", line))


def topology(hardware: dict[str, str]) -> str:
    """The node's CPU layout for slurm.conf: a node configured with more than slurmd finds
    is drained."""
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    return " ".join(f"{key}={hardware[key]}" for key in keys if key in hardware)


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies (Linux)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class LocalSlurm:
    """munged + slurmctld + slurmd with their config, key, state and logs under ``root``.

    ``mem_mb`` is the memory the node offers jobs (capped at what the machine has): requests
    above it are refused by sbatch, as on a real cluster whose nodes are smaller than a job.
    """

    def __init__(self, root: Path, mem_mb: int = 16000) -> None:
        self.root = Path(root)
        self.hardware = node_hardware()
        self.mem_mb = min(mem_mb, int(self.hardware["RealMemory"]))
        self.node = socket.gethostname().split(".")[0]
        self.partition = PARTITION
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "run/munge.socket"
        self.shim_dir = self.root / "bin"
        self.daemons: dict[str, subprocess.Popen] = {}

    # --- files ---------------------------------------------------------------------------------
    def write_files(self) -> None:
        # munged insists on a socket folder that everyone may traverse, and on a key only its
        # owner may read.
        for name, mode in (("", 0o755), ("run", 0o755), ("munge", 0o700), ("state", 0o755),
                           ("spool", 0o755), ("log", 0o755), ("bin", 0o755)):
            folder = self.root / name
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(mode)
        key = self.root / "munge/munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        template = string.Template((HERE / "slurm.conf.in").read_text())
        self.conf.write_text(template.substitute(
            root=self.root, node=self.node, partition=self.partition, mem_mb=self.mem_mb,
            topology=topology(self.hardware), munge_socket=self.munge_socket,
            slurmctld_port=free_port(), slurmd_port=free_port()))
        # Snakemake's job-step executor drops every SLURM_* variable before it calls srun inside
        # a job. A cluster's srun then finds /etc/slurm/slurm.conf (or slurmd's configless
        # copy); this cluster's config is here, so srun is given it explicitly.
        shim = self.shim_dir / "srun"
        shim.write_text(f'#!/bin/sh\nSLURM_CONF="{self.conf}" exec "{shutil.which("srun")}" '
                        '"$@"\n')
        shim.chmod(0o755)

    def environment(self) -> dict[str, str]:
        """Variables that point Slurm's commands (and the jobs' srun) at this cluster."""
        return {"SLURM_CONF": str(self.conf),
                "PATH": f"{self.shim_dir}{os.pathsep}{os.environ.get('PATH', '')}"}

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.environment()}

    # --- daemons -------------------------------------------------------------------------------
    def _spawn(self, name: str, *argv: str) -> None:
        # Own session: a Ctrl-C meant for pytest does not reach the daemons before stop() has
        # cancelled the jobs. Parent-death signal: they still go if this process is killed.
        with open(self.root / f"log/{name}.out", "ab") as log:  # the child keeps its own copy
            self.daemons[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                  env=self.env(), start_new_session=True,
                                                  preexec_fn=_terminate_with_parent)

    def start(self, timeout: float = 90) -> None:
        self.write_files()
        self._spawn("munged", "munged", "--foreground", f"--socket={self.munge_socket}",
                    f"--key-file={self.root / 'munge/munge.key'}",
                    f"--pid-file={self.root / 'run/munged.pid'}",
                    f"--seed-file={self.root / 'munge/munged.seed'}",
                    f"--log-file={self.root / 'log/munged.log'}")
        self._wait(lambda: self.munge_socket.exists(), 20, "munged did not create its socket")
        self._spawn("slurmctld", "slurmctld", "-D", "-c", "-f", str(self.conf))
        self._spawn("slurmd", "slurmd", "-D", "-f", str(self.conf))
        self._wait(lambda: self.node_state() == "idle", timeout,
                   f"node {self.node} did not become idle")

    def node_state(self) -> str:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env(),
                                capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    def _wait(self, ready, timeout: float, problem: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [name for name, proc in self.daemons.items() if proc.poll() is not None]
            if dead:
                raise ClusterError(f"{', '.join(dead)} exited while starting\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise ClusterError(f"{problem} within {timeout:.0f} s\n{self.logs()}")

    def jobs(self) -> dict[str, str]:
        """Job id -> state of every job slurmctld still remembers (MinJobAge)."""
        result = subprocess.run(["squeue", "-h", "--states=all", "-o", "%i|%T"], env=self.env(),
                                capture_output=True, text=True)
        return dict(line.split("|", 1) for line in result.stdout.split())

    def stop(self) -> None:
        """Cancel what still runs, then stop the daemons this object started, by their pids."""
        if self.daemons.get("slurmctld") and self.daemons["slurmctld"].poll() is None:
            live = [job for job, state in self.jobs().items()
                    if state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING")]
            if live:
                subprocess.run(["scancel", *live], env=self.env(), capture_output=True)
                deadline = time.monotonic() + 30  # KillWait is 5 s in slurm.conf.in
                while time.monotonic() < deadline and any(
                        self.jobs().get(job) in ("RUNNING", "COMPLETING") for job in live):
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.daemons.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def logs(self, tail: int = 1500) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace")[-tail:]
            parts.append(f"--- {path.name}\n{text}")
        return "\n".join(parts)

    def __enter__(self) -> LocalSlurm:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    reason = why_it_cannot_run()
    if reason:
        sys.exit(reason)
    install_packages()
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="slurm-"))
    for sig in (signal.SIGINT, signal.SIGTERM):  # either one stops the daemons on the way out
        signal.signal(sig, lambda *_: sys.exit(0))
    with LocalSlurm(root) as cluster:
        print(f"one-node cluster up in {root}: node {cluster.node}, partition "
              f"{cluster.partition}, {cluster.mem_mb} MB. In another shell:\n"
              f"export SLURM_CONF={cluster.conf} PATH={cluster.shim_dir}:$PATH\n"
              "Ctrl-C (or SIGTERM to this process) stops it.", flush=True)
        while True:
            signal.pause()


if __name__ == "__main__":
    main()

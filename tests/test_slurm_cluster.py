"""The workflow through `profiles/slurm` on a real, one-node SLURM cluster on this machine.

tests/slurm/local_cluster.py installs Debian's Slurm packages when they are missing, starts
munged, slurmctld and slurmd from a temporary folder, and stops them by their pids when the
module ends, also after a failure. Here the tiny config (one task) runs as a cluster user runs
it: every compute job goes through sbatch and the job-step executor (the table is a local
rule); one running sampler job is cancelled with scancel, and the profile's `retries` must
resubmit it and the sampler resume from its checkpoint. Skipped, with the reason, where the
cluster cannot be started (not Linux, not root, or packages missing without apt-get);
`-m "not slurm"` leaves it out.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml
from shared_runs import BIN, REPO, copy_workflow, run_env, tiny_encoder, write_config
from slurm.local_cluster import LocalSlurm, install_packages, why_it_cannot_run

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

RUN_LIMIT_S = 900  # a guard against a hung run, not a speed goal (it prints its wall time)
# On the tiny encoder (milliseconds a step): long enough to be caught running after a checkpoint
SAMPLER_STEPS, CHECKPOINT_EVERY = 600, 50
SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_(\w+?)/"
                       r"(?:(\S+)/)?\d+\.log\)")


@pytest.fixture(scope="module")
def packages_installed_in() -> float:
    """Seconds apt-get took to install Slurm (0: it was there); skips where it cannot run."""
    reason = why_it_cannot_run()
    if reason:
        pytest.skip(f"no local SLURM cluster here: {reason}")
    return install_packages()


@pytest.fixture(scope="module")
def cluster(packages_installed_in):
    # munged wants every folder above its socket traversable: pytest's tmp_path (0700) is not.
    root = Path(tempfile.mkdtemp(prefix="bayestune-slurm-"))
    try:
        with LocalSlurm(root) as started:  # stopped on the way out, also after a failure
            yield started
    finally:
        shutil.rmtree(root, ignore_errors=True)


def cluster_env(cluster: LocalSlurm, glue_dir: Path) -> dict[str, str]:
    """What a cluster user exports: account, partition, and this checkout's package for the
    jobs (sbatch passes the environment on)."""
    env = run_env(glue_dir, SLURM_ACCOUNT="bayestune", SLURM_PARTITION=cluster.partition)
    env["SLURM_CONF"] = cluster.environment()["SLURM_CONF"]
    env["PATH"] = f"{cluster.shim_dir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"),
                                                      os.environ.get("PYTHONPATH")]))
    return env


def slurm_version(cluster: LocalSlurm) -> str:
    return subprocess.run(["sinfo", "--version"], env=cluster.env(), capture_output=True,
                          text=True).stdout.strip()


def submissions(output: str) -> list[tuple[str, str, str]]:
    """(SLURM job id, rule, wildcards) of every sbatch, in order."""
    return [(job, rule, wildcards or "") for job, rule, wildcards in SUBMITTED.findall(output)]


def run_profile(run: Path, env: dict[str, str], *args: str, limit: float,
                on_tick: Callable[[str], None] | None = None) -> tuple[int | None, str, float]:
    """`snakemake --profile profiles/slurm ARGS` in ``run``, stopped like Ctrl-C (Snakemake
    then cancels its jobs) when it runs past ``limit`` seconds. ``on_tick(output so far)`` is
    called twice a second meanwhile. Returns the exit status (None: stopped), output, seconds.
    """
    out_file = run / "snakemake.out"
    # Status checks every few seconds instead of the plugin's 40 s and Snakemake's 10 s: the
    # same code path, faster.
    command = [str(BIN / "snakemake"), "--profile", "profiles/slurm",
               "--slurm-init-seconds-before-status-checks", "3",
               "--seconds-between-status-checks", "2", *args]
    started = time.monotonic()
    with open(out_file, "w") as out:
        proc = subprocess.Popen(command, cwd=run, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while proc.poll() is None and time.monotonic() - started < limit:
            if on_tick is not None:
                on_tick(out_file.read_text())
            time.sleep(0.5)
    finally:
        stopped = proc.poll() is None
        if stopped:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # the cluster fixture cancels what is left
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    seconds = time.monotonic() - started
    return (None if stopped else proc.returncode), out_file.read_text(), seconds


def test_a_request_larger_than_the_node_is_refused(cluster, tmp_path, glue_dir):
    """The paper's stage-1 memory (32000 MB) on a 16000 MB node: sbatch's refusal reaches the
    user (config/README.md quotes it). One thread, as a request for more CPUs than a node has
    is not refused but left pending (reason PartitionConfig) unless the cluster enforces
    partition limits."""
    run = copy_workflow(tmp_path / "run")
    config = write_config(run / "paper_sized.yaml", run / "tests/config/tiny.yaml",
                          tasks=["cb"], resources={"sample": {"threads": 1}})
    (run / "data/tiny/cb").mkdir(parents=True)  # so that the sample job is submitted at once
    rc, output, _ = run_profile(run, cluster_env(cluster, glue_dir),
                                "results/tiny/scales/exact/cb/seed0.safetensors", "--configfile",
                                str(config), "--retries", "0", limit=120)
    assert rc not in (0, None), output[-3000:]
    assert "--mem 32000" in output and "Memory specification can not be satisfied" in output, \
        output[-3000:]


def test_tiny_run_with_a_cancelled_sampler(cluster, packages_installed_in, tmp_path, glue_dir,
                                           tmp_path_factory, capsys):
    run = copy_workflow(tmp_path / "run")
    tiny = run / "tests/config/tiny.yaml"
    config = write_config(
        run / "cluster.yaml", tiny, tasks=["cb"], methods=["bayestune", "full"],
        model=str(tiny_encoder(tmp_path_factory)),
        budgets=[0.005],
        sampler={**yaml.safe_load(tiny.read_text())["sampler"], "steps": SAMPLER_STEPS,
                 "checkpoint_every": CHECKPOINT_EVERY},
        # sized for the node: 2 jobs of 2000 MB at a time, one CPU each
        resources={rule: {"threads": 1, "mem_mb": 2000, "runtime": 10}
                   for rule in ("prepare", "sample", "mask", "finetune", "report")})
    checkpoint = run / "results/tiny/scales/exact/cb/seed0.ckpt"
    cancelled: dict[str, str | None] = {"job": None, "state": None}

    def cancel_the_first_sampler_job(output: str) -> None:
        """scancel the sampler's job once it runs and has written a checkpoint."""
        jobs = cluster.jobs()
        if cancelled["job"] is None:
            sample = [job for job, rule, _ in submissions(output) if rule == "sample"]
            if sample and checkpoint.exists() and jobs.get(sample[0]) == "RUNNING":
                subprocess.run(["scancel", sample[0]], env=cluster.env(), check=True)
                cancelled["job"] = sample[0]
        elif cancelled["state"] is None and jobs.get(cancelled["job"]) not in (
                None, "RUNNING", "COMPLETING"):
            cancelled["state"] = jobs[cancelled["job"]]

    # The table and what it needs (figures would add two more rounds of status checks).
    rc, output, seconds = run_profile(run, cluster_env(cluster, glue_dir),
                                      "results/tiny/glue_table.csv", "--configfile",
                                      str(config), limit=RUN_LIMIT_S,
                                      on_tick=cancel_the_first_sampler_job)

    jobs = submissions(output)
    sample_jobs = [job for job, rule, _ in jobs if rule == "sample"]
    sampler_log = run / "results/tiny/logs/sample/exact/cb/seed0.log"
    resumed = re.search(r"stage 1 resumed from step (\d+)",
                        sampler_log.read_text() if sampler_log.exists() else "")
    job, state = cancelled["job"], cancelled["state"]
    sacct = subprocess.run(["sacct", "-X", "--noheader"], env=cluster.env(),
                           capture_output=True, text=True)
    packages = (f"installed in {packages_installed_in:.0f} s" if packages_installed_in
                else "already installed")
    summary = "\n".join([
        f"SLURM end to end ({slurm_version(cluster)}, one node: {cluster.hardware['CPUs']} CPUs, "
        f"{cluster.mem_mb} MB; packages {packages}; no accounting database, sacct says "
        f"{(sacct.stdout + sacct.stderr).strip()!r})",
        f"  sbatch jobs ({len(jobs)}): "
        + ", ".join(f"{j} {rule}{'[' + wc + ']' if wc else ''}" for j, rule, wc in jobs),
        f"  scancel {job} (sample, RUNNING, checkpoint written) -> {state}; resubmitted as "
        f"{', '.join(sample_jobs[1:]) or 'nothing'}; the retry's log: "
        f"{resumed.group(0) if resumed else 'no resume'}",
        f"  snakemake --profile profiles/slurm: rc {rc} in {int(seconds // 60)} min "
        f"{seconds % 60:.0f} s"])
    with capsys.disabled():  # shown by a plain `pytest -q` / `make test`, not only with -s
        print("\n" + summary)
    context = f"{summary}\n--- snakemake output\n{output[-4000:]}\n{cluster.logs(800)}"

    assert rc is not None, f"the run took longer than {RUN_LIMIT_S} s\n{context}"
    assert job is not None, ("the sampler job was never seen running after its first "
                             f"checkpoint; raise SAMPLER_STEPS\n{context}")
    assert rc == 0, context
    # The profile's status command worked where sacct cannot (the plugin's default).
    assert sacct.returncode != 0 and "accounting storage is disabled" in sacct.stderr + \
        sacct.stdout, context
    assert state == "CANCELLED", context
    assert f"SLURM-job '{job}' failed, SLURM status is: 'CANCELLED'" in output, context
    assert len(sample_jobs) == 2 and sample_jobs[0] == job, context  # one retry
    slurm_log = next((run / ".snakemake/slurm_logs/rule_sample").rglob(f"{job}.log"))
    assert f"JOB {job} ON {cluster.node} CANCELLED" in slurm_log.read_text(), context
    assert resumed and 0 < int(resumed.group(1)) < SAMPLER_STEPS, context
    assert int(resumed.group(1)) % CHECKPOINT_EVERY == 0, context
    assert (run / "results/tiny/scales/exact/cb/seed0.safetensors").exists()
    assert not checkpoint.exists()  # the finished run dropped it

    # The table is a local rule: it runs beside Snakemake, not through sbatch.
    assert {rule for _, rule, _ in jobs} == {"prepare", "sample", "mask_bayestune", "finetune"}, \
        context
    table = pd.read_csv(run / "results/tiny/glue_table.csv", dtype={"budget": str})
    assert set(zip(table.method, table.budget, strict=True)) == {("full", "-"),
                                                                 ("bayestune", "0.005")}
    assert table.cb.between(0, 100).all()

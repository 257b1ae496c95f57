"""A workflow's jobs as a file, and a small scheduler that runs them without Snakemake.

``bayestune render-jobs`` asks Snakemake for every job of a config (``snakemake -n -p
--forceall``, parsed as ``bayestune plan`` parses it: rule, ``bayestune`` arguments, inputs,
outputs, log) and writes them in dependency order to a JSON job list, so the workflow stays
the one definition of the jobs. ``bayestune run-jobs`` runs such a list on a machine that has
the package but no Snakemake (a lent GPU with no network): up to ``--slots`` jobs at once, a
job once every job writing one of its inputs has finished, each with this interpreter
(``python -m bayestune ...``) and its output in its own log. It is resumable: a job whose
outputs exist and whose success was recorded is skipped. A failed job fails the jobs that
need it, not the others; the run then exits non-zero and names the logs to read. A success
marker records the job's command, so a job whose command changed (another seed, other flags)
runs again, and so does every job that needs a job that ran. Per-job
wall times, how many ran at once and the seconds per optimiser step go to a CSV and the
console, so that a cost table can be corrected from the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bayestune import files
from bayestune.errors import BayesTuneError, ConfigError, RunFailedError
from bayestune.liveness import WATCH_ENV

JOB_LIST_VERSION = 1
STATE_FOLDER = ".run_jobs"  # per job list: success markers, beside the results


@dataclass
class Job:
    id: str
    rule: str
    argv: list[str]  # arguments after ``bayestune``
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    log: str | None = None
    threads: int = 1


def render_jobs(configfile: str, root: Path = Path(".")) -> list[Job]:
    """Every job of ``configfile``'s workflow, dependencies first."""
    from bayestune.plan import dry_run

    _, dry = dry_run(configfile, root)
    jobs = []
    for job in dry:
        if job.command is None:
            continue  # rule all: no command
        # named by what it writes, so that a job keeps its name (and its success marker)
        # when the list is rendered again
        jobs.append(Job(id=f"{job.rule}:{job.outputs[0]}", rule=job.rule, argv=job.command,
                        inputs=job.inputs, outputs=job.outputs, log=job.log,
                        threads=job.threads))
    return order(jobs)


def needs(jobs: Sequence[Job]) -> dict[str, set[str]]:
    """Job id -> ids of the jobs that write one of its inputs (an input under a job's output
    folder counts)."""
    writer = {os.path.normpath(out): job.id for job in jobs for out in job.outputs}
    result = {}
    for job in jobs:
        wanted = set()
        for path in map(os.path.normpath, job.inputs):
            probe = path
            while probe not in writer and os.path.dirname(probe) not in ("", probe):
                probe = os.path.dirname(probe)
            if probe in writer and writer[probe] != job.id:
                wanted.add(writer[probe])
        result[job.id] = wanted
    return result


def order(jobs: Sequence[Job]) -> list[Job]:
    """The jobs sorted so that every job comes after those it needs (a cycle is an error)."""
    by_id, deps = {j.id: j for j in jobs}, needs(jobs)
    done: list[Job] = []
    placed: set[str] = set()
    while len(done) < len(jobs):
        ready = [j for j in jobs if j.id not in placed and deps[j.id] <= placed]
        if not ready:
            stuck = sorted(set(by_id) - placed)
            raise ConfigError(f"job list has a dependency cycle among {', '.join(stuck[:5])}")
        done += ready
        placed |= {j.id for j in ready}
    return done


def write_job_list(path: Path, jobs: Sequence[Job], configfile: str) -> None:
    files.write_json(path, {"version": JOB_LIST_VERSION, "config": configfile,
                            "jobs": [asdict(j) for j in jobs]})


def read_job_list(path: Path) -> list[Job]:
    record = files.read_json(path)
    if record.get("version") != JOB_LIST_VERSION or "jobs" not in record:
        raise files.FileFormatError(f"{path}: not a job list of version {JOB_LIST_VERSION}; "
                                    "render it again with bayestune render-jobs")
    try:
        return [Job(**job) for job in record["jobs"]]
    except TypeError as err:  # a field this version does not know, or one missing
        raise files.FileFormatError(f"{path}: a job of the list does not fit this version "
                                    f"({err}); render it again with bayestune "
                                    "render-jobs") from err


def carry_model(model_name: str, out_dir: Path) -> Path:
    """A text model's encoder in fp16 safetensors with its tokenizer, for a machine that has
    neither the Hub nor the package that ships it (MiniLM: 45 MB instead of 90 MB). The model
    loads back in float32 (:func:`bayestune.models.text.build_text_model`)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from bayestune.models.text import resolve_model_path

    path = resolve_model_path(model_name)
    encoder = AutoModel.from_pretrained(path, dtype=torch.float32).to(torch.float16)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(path).save_pretrained(out_dir)
    return out_dir


def priorities(jobs: Sequence[Job], deps: Mapping[str, set[str]] | None = None,
               ) -> dict[str, tuple[int, int]]:
    """Job id -> (longest chain of jobs that wait on it, its optimiser steps): the scheduler
    starts the job with the largest first, so the long stage-1 chains start before the short
    jobs that could fill the slots. ``deps`` is :func:`needs` of ``jobs`` when known."""
    from bayestune.cli import build_parser

    deps = needs(jobs) if deps is None else deps
    users: dict[str, list[str]] = {j.id: [] for j in jobs}
    for job_id, needed in deps.items():
        for d in needed:
            users[d].append(job_id)
    height: dict[str, int] = {}
    for job in reversed(order(jobs)):  # every job after those it needs: dependents first
        height[job.id] = 1 + max((height[u] for u in users[job.id]), default=0)
    parser = build_parser()
    return {job.id: (height[job.id], _steps(parser, job)) for job in jobs}


def _steps(parser, job: Job) -> int:
    """The optimiser steps of a job's command (0 for what is not a bayestune command, as the
    toy lists of the tests, or a command whose settings do not resolve: it fails when it
    runs, with its own message)."""
    from bayestune.cli import parse_command
    from bayestune.plan import job_steps

    try:
        return sum(n for _, n in job_steps(*parse_command(job.argv, parser)))
    except (SystemExit, BayesTuneError):
        return 0


# --- the scheduler ----------------------------------------------------------------------------
@dataclass
class Outcome:
    job: Job
    # done, skipped (done before), failed, blocked (a job it needs failed); past the time
    # limit: stopped (was running) or unstarted
    status: str
    seconds: float = 0.0
    started: float = 0.0
    running_at_start: int = 0


def _marker(state: Path, job: Job) -> Path:
    return state / (job.id.replace(os.sep, "__").replace(":", "_") + ".done")


def command_key(job: Job) -> str:
    """What a success marker records: the job's command, inputs and outputs."""
    text = json.dumps([job.argv, sorted(job.inputs), sorted(job.outputs)])
    return hashlib.sha256(text.encode()).hexdigest()


def _finished_before(state: Path, job: Job) -> bool:
    marker = _marker(state, job)
    if not (marker.is_file() and all(Path(p).exists() for p in job.outputs)):
        return False
    try:
        recorded = json.loads(marker.read_text()).get("command")
    except (ValueError, AttributeError):  # an older marker, which recorded no command
        return False
    return recorded == command_key(job)


def bayestune_command(job: Job) -> list[str]:
    """This interpreter running the job's subcommand: the job list names no interpreter, so it
    runs wherever the package imports."""
    return [sys.executable, "-m", "bayestune", *job.argv]


def _start(job: Job, env: Mapping[str, str], command: Callable[[Job], list[str]]
           ) -> subprocess.Popen:
    log = Path(job.log) if job.log else None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    for out in job.outputs:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    sink = open(log, "w") if log is not None else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    try:
        return subprocess.Popen(command(job), stdout=sink,
                                stderr=subprocess.STDOUT,
                                env={**env, "OMP_NUM_THREADS": str(job.threads)})
    finally:
        if log is not None:
            sink.close()


def run_jobs(jobs: Sequence[Job], slots: int, state: Path, *, env: Mapping[str, str] | None = None,
             command: Callable[[Job], list[str]] = bayestune_command,
             echo: Callable[[str], None] = print,
             time_limit: float | None = None) -> list[Outcome]:
    """Run ``jobs`` (dependency order), at most ``slots`` at once; returns every outcome.

    After ``time_limit`` seconds the running jobs are stopped and no other starts, so that a
    machine lent for a fixed time still returns the times of what finished."""
    if slots < 1:
        raise ConfigError(f"--slots must be at least 1 (got {slots})")
    env = dict(os.environ if env is None else env)
    env.setdefault("BAYESTUNE_QUIET", "1")
    env[WATCH_ENV] = str(os.getpid())  # a job stops when this scheduler is killed
    state.mkdir(parents=True, exist_ok=True)
    deps = needs(jobs)
    outcomes: dict[str, Outcome] = {}
    for job in order(jobs):  # a job is done only if all it needs was done before it
        if all(d in outcomes for d in deps[job.id]) and _finished_before(state, job):
            outcomes[job.id] = Outcome(job, "skipped")
    running: dict[str, tuple[subprocess.Popen, Outcome]] = {}
    rank = priorities(jobs, deps)
    waiting = sorted((j for j in jobs if j.id not in outcomes), key=lambda j: rank[j.id],
                     reverse=True)
    deadline = None if time_limit is None else time.monotonic() + time_limit
    while waiting or running:
        if deadline is not None and time.monotonic() >= deadline:
            _stop(running, waiting, outcomes, echo)
            break
        for job_id, (process, outcome) in list(running.items()):
            if process.poll() is None:
                continue
            del running[job_id]
            outcome.seconds = time.monotonic() - outcome.started
            ok = process.returncode == 0 and all(Path(p).exists() for p in outcome.job.outputs)
            outcome.status = "done" if ok else "failed"
            if ok:
                _marker(state, outcome.job).write_text(json.dumps({
                    "command": command_key(outcome.job), "seconds": round(outcome.seconds, 1)}))
            echo(f"[{sum(o.status != 'running' for o in outcomes.values())}/{len(jobs)}] "
                 f"{outcome.status} {job_id} in {outcome.seconds:.1f} s"
                 + ("" if ok else f" (log: {outcome.job.log})"))
        for job in list(waiting):
            states = {outcomes[d].status if d in outcomes else "waiting" for d in deps[job.id]}
            if states & {"failed", "blocked"}:
                outcomes[job.id] = Outcome(job, "blocked")
                waiting.remove(job)
                echo(f"blocked {job.id}: a job it needs failed")
            elif states <= {"done", "skipped"} and len(running) < slots:
                outcome = Outcome(job, "running", started=time.monotonic(),
                                  running_at_start=len(running) + 1)
                running[job.id] = (_start(job, env, command), outcome)
                outcomes[job.id] = outcome
                waiting.remove(job)
        if running:
            time.sleep(0.2)
    return [outcomes[j.id] for j in jobs]


def _stop(running: dict, waiting: list[Job], outcomes: dict[str, Outcome],
          echo: Callable[[str], None]) -> None:
    for process, _ in running.values():
        process.terminate()
    for job_id, (process, outcome) in running.items():
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        outcome.seconds = time.monotonic() - outcome.started
        outcome.status = "stopped"
        echo(f"stopped {job_id} after {outcome.seconds:.1f} s: time limit")
    for job in waiting:
        outcomes[job.id] = Outcome(job, "unstarted")
    echo(f"time limit: {len(running)} job(s) stopped, {len(waiting)} not started")


def summary_rows(outcomes: Sequence[Outcome]) -> list[dict]:
    """One row per job: rule, status, seconds, jobs running when it started, steps and
    seconds per step (wall time over the optimiser steps it runs, start-up included)."""
    from bayestune.cli import build_parser

    parser = build_parser()
    rows = []
    for o in outcomes:
        steps = _steps(parser, o.job)
        rows.append({"id": o.job.id, "rule": o.job.rule, "status": o.status,
                     "seconds": round(o.seconds, 2), "running_at_start": o.running_at_start,
                     "steps": steps,
                     "seconds_per_step": round(o.seconds / steps, 4)
                     if steps and o.seconds and o.status == "done" else None})
    return rows


def check_outcomes(outcomes: Sequence[Outcome]) -> None:
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        logs = ", ".join(str(o.job.log) for o in failed[:5])
        blocked = sum(o.status == "blocked" for o in outcomes)
        raise RunFailedError(f"{len(failed)} job(s) failed and {blocked} could not start; read "
                             f"{logs}; fix and run the same command again (finished jobs are "
                             "kept)")
    unfinished = sum(o.status in ("stopped", "unstarted") for o in outcomes)
    if unfinished:
        raise RunFailedError(f"the time limit stopped the run with {unfinished} job(s) "
                             "unfinished; run the same command again to go on (finished jobs "
                             "are kept)")


"""``bayestune run-jobs``: run a job list without Snakemake (dependency order, N at once,
resumable, a log per job) and summarise the wall times."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from bayestune.cli.flags import from_args
from bayestune.guards import positive_int

HELP = ("run a job list without Snakemake: dependency order, N at once, resumable, a log per "
        "job")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=Path, required=True,
                        help="job list (bayestune render-jobs)")
    parser.add_argument("--slots", type=positive_int, default=1,
                        help="jobs run at once (they share the device: several small jobs fill "
                             "one GPU)")
    parser.add_argument("--state", type=Path, default=None,
                        help="folder of the run's success markers (default: .run_jobs/<list "
                             "name>)")
    parser.add_argument("--summary", type=Path, default=None,
                        help="CSV of every job's wall time and seconds per step (default: in "
                             "--state)")
    parser.add_argument("--time-limit", type=positive_int, default=None, metavar="SECONDS",
                        help="stop the running jobs and start no more after this many seconds "
                             "(the summary is still written; the same command goes on later)")


@dataclass(frozen=True, kw_only=True)
class Settings:
    jobs: Path
    slots: int
    state: Path | None
    summary: Path | None
    time_limit: int | None


def settings(args: argparse.Namespace) -> Settings:
    return from_args(Settings, args)


def run(settings: Settings) -> None:
    import pandas as pd

    from bayestune import files, jobs

    listed = jobs.read_job_list(settings.jobs)
    state = settings.state or Path(jobs.STATE_FOLDER) / settings.jobs.stem
    started = time.monotonic()
    outcomes = jobs.run_jobs(listed, settings.slots, state, time_limit=settings.time_limit)
    rows = pd.DataFrame(jobs.summary_rows(outcomes))
    summary = settings.summary or state / "jobs.csv"
    with files.atomic_output(summary) as tmp:
        rows.to_csv(tmp, index=False)
    ran = rows[rows.status == "done"]
    skipped = int((rows.status == "skipped").sum())
    print(f"run-jobs: {len(ran)} ran, {skipped} done before, "
          f"{len(rows) - len(ran) - skipped} failed or blocked, "
          f"{time.monotonic() - started:.0f} s wall, at most "
          f"{int(ran.running_at_start.max()) if len(ran) else 0} at once "
          f"({settings.slots} slots)")
    for rule, group in ran[ran.steps > 0].groupby("rule"):
        print(f"  {rule}: {len(group)} jobs, median {group.seconds.median():.1f} s, "
              f"{group.seconds.sum() / group.steps.sum():.4f} s per step (wall, start-up "
              "included, jobs sharing the device)")
    print(f"  per-job times: {summary}")
    jobs.check_outcomes(outcomes)

"""``bayestune render-jobs``: a workflow config's jobs as a JSON job list for ``run-jobs``."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from bayestune.cli.flags import from_args

HELP = "a workflow config's jobs as a JSON job list (from a Snakemake dry run), for run-jobs"
log = logging.getLogger("bayestune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configfile", required=True, help="workflow config, e.g. config/gpu.yaml")
    parser.add_argument("--directory", type=Path, default=Path("."),
                        help="repository root holding the Snakefile (default: here)")
    parser.add_argument("--out", type=Path, required=True, help="job list to write (.json)")


@dataclass(frozen=True, kw_only=True)
class Settings:
    configfile: str
    directory: Path
    out: Path


def settings(args: argparse.Namespace) -> Settings:
    return from_args(Settings, args)


def run(settings: Settings) -> None:
    from bayestune import jobs

    listed = jobs.render_jobs(settings.configfile, settings.directory)
    jobs.write_job_list(settings.out, listed, settings.configfile)
    log.info("wrote %d jobs of %s to %s", len(listed), settings.configfile, settings.out)

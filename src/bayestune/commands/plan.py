"""``bayestune plan``: the jobs, device-hours and disk of a workflow config before it runs."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from bayestune.cli.flags import from_args

HELP = ("jobs, device-hours and disk of a workflow config, before running it (from a Snakemake "
        "dry run)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configfile", required=True,
                        help="workflow config, e.g. config/config.yaml")
    parser.add_argument("--directory", type=Path, default=Path("."),
                        help="repository root holding the Snakefile (default: here)")
    parser.add_argument("--costs", type=Path, default=None,
                        help="seconds per step table (default: config/costs.yaml)")
    parser.add_argument("--remaining", action="store_true",
                        help="only the jobs still to run (default: the whole run)")


@dataclass(frozen=True, kw_only=True)
class Settings:
    configfile: str
    directory: Path
    costs: Path | None
    remaining: bool


def settings(args: argparse.Namespace) -> Settings:
    return from_args(Settings, args)


def run(settings: Settings) -> None:
    from bayestune.plan import format_plan, make_plan

    print(format_plan(make_plan(settings.configfile, settings.directory,
                                costs_file=settings.costs, remaining=settings.remaining)))

"""``bayestune sweep``: validation scores of a grid of stage-1 settings (and of the other
methods) through mask and stage 2, with a summary and a figure."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from bayestune.cli.flags import from_args
from bayestune.guards import positive_int

HELP = ("validation scores of a grid of stage-1 settings (and of the other methods) through "
        "mask and stage 2")
log = logging.getLogger("bayestune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True,
                        help="workflow config, e.g. config/cpu.yaml: model, prepared data, main "
                             "budget, mask and stage-2 settings")
    parser.add_argument("--grid", type=Path, required=True,
                        help="YAML list of runs (config/sweeps/)")
    parser.add_argument("--out", type=Path, required=True,
                        help="CSV of validation scores (resumed)")
    parser.add_argument("--tasks", nargs="*", help="default: the config's tasks")
    parser.add_argument("--seeds", nargs="*", type=int, help="default: the config's seeds")
    parser.add_argument("--model", help="replace the config's model (e.g. a local folder)")
    parser.add_argument("--prepared-dir", help="replace the config's prepared_dir")
    parser.add_argument("--workers", type=positive_int, default=1, help="jobs run at once")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (workers share one GPU)")


@dataclass(frozen=True, kw_only=True)
class Settings:
    config: Path
    grid: Path
    out: Path
    tasks: list[str] | None
    seeds: list[int] | None
    model: str | None
    prepared_dir: str | None
    workers: int
    device: str


def settings(args: argparse.Namespace) -> Settings:
    return from_args(Settings, args)


def run(settings: Settings) -> None:
    from bayestune import sweep

    config = sweep.read_yaml(settings.config)
    for key, value in (("model", settings.model), ("prepared_dir", settings.prepared_dir)):
        if value is not None:
            config[key] = value
    jobs = sweep.grid_jobs(sweep.read_yaml(settings.grid), settings.tasks or config["tasks"],
                           settings.seeds or config["seeds"])
    table = sweep.run_sweep(config, jobs, settings.out, device=settings.device,
                            workers=settings.workers)
    print(sweep.summarise(table).to_string())
    if len(table):
        from bayestune.reports.sweep_figure import plot_sweep

        log.info("wrote %s", plot_sweep(table, Path(settings.out).with_suffix(".png")))

"""``bayestune diagnose``: a summary of scale files (with their chain diagnostics) and sampler
checkpoints; with ``--figures-dir``, the traces and the seeds' agreement as figures."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from bayestune.cli.flags import from_args
from bayestune.errors import ConfigError

HELP = "summary of scale files (with their chain diagnostics) and sampler checkpoints"
log = logging.getLogger("bayestune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE",
                        help="scale file (.safetensors) or stage-1 checkpoint")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--figures-dir", type=Path, default=None, metavar="DIR",
                        help="also draw lambda_traces.png (first scale file) and, across the "
                             "scale files (the seeds of one task) and --masks, "
                             "seed_agreement.csv/.png")
    parser.add_argument("--masks", nargs="+", type=Path, default=[], metavar="MASK",
                        help="bayestune mask files of those seeds (any budgets), for the Jaccard "
                             "overlaps in seed_agreement")


@dataclass(frozen=True, kw_only=True)
class Settings:
    files: list[Path]
    json: bool
    figures_dir: Path | None
    masks: list[Path]


def settings(args: argparse.Namespace) -> Settings:
    return from_args(Settings, args)


def run(settings: Settings) -> None:
    from bayestune.chain_report import describe, format_summary

    for k, path in enumerate(settings.files):
        summary = describe(path)
        print(("\n" if k else "") + (json.dumps(summary, indent=2) if settings.json
                                     else format_summary(summary)))
    if settings.figures_dir is not None:
        _chain_figures(settings)


def _chain_figures(settings: Settings) -> None:
    """The traces of the first scale file; with several seeds, their agreement."""
    from bayestune import files
    from bayestune.chain_report import seed_agreement
    from bayestune.reports.figures import plot_lambda_traces, plot_seed_agreement
    from bayestune.reports.tables import write_table_csv

    scales = [p for p in settings.files if p.suffix == ".safetensors"]
    if not scales:
        raise ConfigError("--figures-dir draws scale files' diagnostics; give at least one "
                          "scale file (.safetensors)")
    out = Path(settings.figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    traces_path = files.diagnostics_paths(scales[0])[1]
    traces, meta = files.load_traces(traces_path)
    plot_lambda_traces(traces, meta, out / "lambda_traces.png")
    table = seed_agreement(scales, settings.masks)
    write_table_csv(table, out / "seed_agreement.csv")
    plot_seed_agreement(table, out / "seed_agreement.png")
    log.info("wrote %s", ", ".join(str(out / n) for n in (
        "lambda_traces.png", "seed_agreement.csv", "seed_agreement.png")))

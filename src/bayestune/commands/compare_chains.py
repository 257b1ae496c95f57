"""``bayestune compare-chains``: what finished stage-1 chains rank by, side by side (their
diagnostics per phase, agreement with movement, magnitude and Fisher, seed agreement, where
their masks sit and their stage-1 validation)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from bayestune.cli.flags import from_args
from bayestune.errors import ConfigError

HELP = "what finished stage-1 chains rank by, side by side (CSV tables and figures)"
log = logging.getLogger("bayestune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RESULTS",
                        help="results folders (e.g. results/reproduce) whose scales/<preset>/"
                             "<task>/seed<N>.safetensors are compared")
    parser.add_argument("--task", required=True, help="the task whose chains are compared")
    parser.add_argument("--out-dir", type=Path, required=True, metavar="DIR",
                        help="where chains.csv, agreement.csv, composition.csv and the "
                             "figures go")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.001, 0.005, 0.02],
                        metavar="FRACTION", help="mask budgets compared (fractions in (0, 1])")


@dataclass(frozen=True, kw_only=True)
class Settings:
    runs: list[Path]
    task: str
    out_dir: Path
    budgets: list[float]


def settings(args: argparse.Namespace) -> Settings:
    chosen = from_args(Settings, args)
    bad = [b for b in chosen.budgets if not 0 < b <= 1]
    if bad:
        raise ConfigError(f"--budgets {bad} outside (0, 1]; give fractions such as 0.005")
    return chosen


def run(settings: Settings) -> None:
    from bayestune.chain_comparison import compare_chains

    written = compare_chains(settings.runs, settings.task, settings.out_dir,
                             budgets=tuple(settings.budgets))
    log.info("wrote %s", ", ".join(map(str, written)))

"""``bayestune bench``: stage 1's step time and memory against plain AdamW."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from bayestune.cli.flags import from_args
from bayestune.guards import positive_int

HELP = "step time and memory against plain AdamW"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("results/bench/bench.json"))
    parser.add_argument("--model", default="minilm",
                        help="minilm, roberta-base-random or a model folder (e.g. .carry/minilm)")
    parser.add_argument("--steps", type=positive_int, default=12)
    parser.add_argument("--device", default="auto")


@dataclass(frozen=True, kw_only=True)
class Settings:
    out: Path
    model: str
    steps: int
    device: str


def settings(args: argparse.Namespace) -> Settings:
    return from_args(Settings, args)


def run(settings: Settings) -> None:
    from bayestune.bench import print_table, run_bench

    print_table(run_bench(settings.out, model=settings.model, steps=settings.steps,
                          device=settings.device))

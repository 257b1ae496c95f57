"""``bayestune carry-model``: a text model in fp16 with its tokenizer, to carry offline."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from bayestune.cli.flags import from_args

HELP = "a text model in fp16 with its tokenizer, as a folder to carry to an offline machine"
log = logging.getLogger("bayestune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="minilm", help="model name, alias or folder")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder to write, e.g. .carry/minilm")


@dataclass(frozen=True, kw_only=True)
class Settings:
    model: str
    out: Path


def settings(args: argparse.Namespace) -> Settings:
    return from_args(Settings, args)


def run(settings: Settings) -> None:
    from bayestune import jobs

    log.info("wrote %s", jobs.carry_model(settings.model, settings.out))

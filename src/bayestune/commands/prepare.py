"""``bayestune prepare``: read, check and tokenise (or index, for images) a task's splits."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from bayestune.cli.flags import from_args
from bayestune.commands.common import architecture_flag, declared_tasks, task_flags
from bayestune.guards import positive_int

HELP = "read, check and tokenise a task's splits"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    task_flags(parser)
    parser.add_argument("--model", required=True,
                        help="model whose tokenizer/preprocessing to use")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="local data of a built-in task (default: $BAYESTUNE_GLUE_DIR / "
                             "$BAYESTUNE_VTAB_DIR); a declared task names its own")
    parser.add_argument("--max-length", type=positive_int, default=128)
    architecture_flag(parser)


@dataclass(frozen=True, kw_only=True)
class Settings:
    task: str
    task_file: Path | None
    model: str
    out_dir: Path
    data_dir: Path | None
    max_length: int
    architecture: str


def settings(args: argparse.Namespace) -> Settings:
    return from_args(Settings, args)


def run(settings: Settings) -> None:
    from bayestune.guards import check_outside, raw_task_folder
    from bayestune.tasks import prepare_task

    declared = declared_tasks(settings)
    check_outside("--out-dir", settings.out_dir, "the task's raw data folder",
                  raw_task_folder(settings.task, settings.data_dir, declared))
    prepare_task(settings.task, settings.model, settings.out_dir, settings.data_dir,
                 settings.max_length, custom_tasks=declared, architecture=settings.architecture)

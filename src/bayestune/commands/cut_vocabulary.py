"""``bayestune cut-vocabulary``: a text model with only the tokens that tasks' data uses."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from bayestune.cli.flags import from_args
from bayestune.commands.common import architecture_flag, declared_tasks

HELP = "a text model with only the tokens that tasks' data uses (smaller embeddings, same splits)"
log = logging.getLogger("bayestune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", nargs="+", required=True, metavar="TASK")
    parser.add_argument("--task-file", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", required=True, help="model name, alias or folder to cut")
    parser.add_argument("--out-dir", type=Path, required=True, help="model folder to write")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="local task data (default: $BAYESTUNE_GLUE_DIR)")
    architecture_flag(parser)


@dataclass(frozen=True, kw_only=True)
class Settings:
    tasks: list[str]
    task_file: Path | None
    model: str
    out_dir: Path
    data_dir: Path | None
    architecture: str


def settings(args: argparse.Namespace) -> Settings:
    return from_args(Settings, args)


def run(settings: Settings) -> None:
    from bayestune import files
    from bayestune.models.derive import restrict_vocabulary
    from bayestune.models.text import resolve_model_path
    from bayestune.tasks import used_token_ids

    used = used_token_ids(settings.tasks, settings.model, settings.data_dir,
                          declared_tasks(settings), settings.architecture)
    files.replace_folder(settings.out_dir, lambda tmp: restrict_vocabulary(
        resolve_model_path(settings.model), used, tmp))
    log.info("%s: %s with the %d tokens of %s", settings.out_dir, settings.model, len(used),
             ", ".join(settings.tasks))

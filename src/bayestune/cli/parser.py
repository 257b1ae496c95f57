"""The parser of ``bayestune``: the options every subcommand shares, and each subcommand's own
flags as its module (:data:`bayestune.cli.dispatch.COMMANDS`) adds them."""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from bayestune import __version__
from bayestune.cli.dispatch import COMMANDS
from bayestune.guards import accept_negative_numbers, nonnegative_int

DESCRIPTION = ("The one command line: ``bayestune <subcommand>``; each Snakemake rule calls one "
               "subcommand.")
LOG_EVERY = 100  # steps between the log lines of sample and finetune jobs


def command_module(command: str) -> ModuleType | type:
    """The module of a subcommand (its flags, its settings and its body), or the class that
    holds them in a module serving two subcommands (``module:Name``)."""
    module, _, name = COMMANDS[command].partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, name) if name else loaded


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bayestune", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"bayestune {__version__}")
    # The workflow switches progress bars with the environment, not a flag: a flag in the
    # rules' commands would rerun every job when config key `progress` changes.
    parser.add_argument("-q", "--quiet", action="store_true",
                        default=os.environ.get("BAYESTUNE_QUIET", "") not in ("", "0"),
                        help="no progress bars (default from $BAYESTUNE_QUIET)")
    parser.add_argument("--log-every", type=nonnegative_int, metavar="N",
                        default=int(os.environ.get("BAYESTUNE_LOG_EVERY") or LOG_EVERY),
                        help="sample and finetune log a line (step, loss, ...) every N steps "
                             f"and at each validation; 0: none (default from "
                             f"$BAYESTUNE_LOG_EVERY, else {LOG_EVERY})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        module = command_module(command)
        module.add_arguments(sub.add_parser(command, help=module.HELP))
    accept_negative_numbers([parser, *sub.choices.values()])
    return parser


def parse_command(argv: Sequence[str],
                  parser: argparse.ArgumentParser | None = None) -> tuple[str, Any]:
    """A command line (the arguments after ``bayestune``) as (subcommand, its settings), as
    the command would run it: how the planner reads the workflow's commands back."""
    args = (parser or build_parser()).parse_args(argv)
    return args.command, command_module(args.command).settings(args)

"""The one command line: ``bayestune <subcommand>``; each Snakemake rule calls one subcommand.

This package only parses and dispatches: ``parser`` (the shared options, and each
subcommand's flags as its module adds them), ``flags`` (flags generated from the config
dataclasses), ``dispatch`` (which module runs each subcommand) and ``main``. What a subcommand
does is in its own module under :mod:`bayestune.commands`, which takes a settings object, not
the parsed flags.
"""

from __future__ import annotations

import importlib
from typing import Any

from bayestune.cli.flags import add_config_flags, config_from_args
from bayestune.cli.main import main
from bayestune.cli.parser import LOG_EVERY, build_parser, parse_command

__all__ = ["LOG_EVERY", "add_config_flags", "build_parser", "config_from_args", "main",
           "parse_command", "sampler_config_from_args"]


def __getattr__(name: str) -> Any:
    # sample's own helper, re-exported by name so that this package (which every subcommand
    # runs) does not import the sampler's flags into every command's code hash.
    if name == "sampler_config_from_args":
        return importlib.import_module("bayestune.commands.sample").sampler_config_from_args
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


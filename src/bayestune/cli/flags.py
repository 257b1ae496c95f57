"""Flags generated from config dataclasses: one flag per field, so that a config key, a flag and
a field always share one name (``lr_theta`` <-> ``--lr-theta``), and the dataclass back from
the parsed flags. The cast of a value to its field's type is :func:`bayestune.settings.field_type`,
the one the workflow's config sections go through too."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TypeVar

from bayestune.settings import field_type

Config = TypeVar("Config")
Settings = TypeVar("Settings")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "", *,
                     given_only: bool = False) -> None:
    """One flag per field. With ``given_only`` a flag left out sets nothing on the namespace,
    so that a preset can fill it (the help then names the ``exact`` default)."""
    group = parser.add_argument_group(f"{cls.__name__} options")
    for field in dataclasses.fields(cls):
        flag = "--" + (prefix + field.name).replace("_", "-")
        # A field whose default is None (unset: a preset or method default decides) names its
        # type in the field metadata. With given_only a flag left out sets nothing.
        default = argparse.SUPPRESS if given_only else field.default
        shown = "preset's value; exact: " if given_only and field.name != "preset" else ""
        help_text = field.metadata.get("help", "") + (
            "" if field.default is None else f" (default: {shown}{field.default})")
        kind = field_type(field)
        if kind is bool:
            group.add_argument(flag, dest=prefix + field.name, default=default,
                               action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag, dest=prefix + field.name, default=default,
                               type=kind, help=help_text, choices=field.metadata.get("choices"))


def config_from_args(args: argparse.Namespace, cls: type[Config], prefix: str = "") -> Config:
    """``cls`` from the flags :func:`add_config_flags` made for it."""
    values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls)}
    return cls(**values)


def given_flags(args: argparse.Namespace, cls: type) -> dict:
    """The fields of ``cls`` whose flag was given (flags made with ``given_only``)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def from_args(cls: type[Settings], args: argparse.Namespace, **values: object) -> Settings:
    """A command's settings object from the parsed flags: each field of ``cls`` from the flag
    (or shared option) of its name, except the fields given in ``values`` (what the command
    resolves itself, e.g. a config dataclass)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                  if f.name not in values}, **values)

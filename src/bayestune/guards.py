"""Checks a command makes before it computes anything: values of its flags, paths that must
not coincide, and the identity of the prepared data a resumable state was made from.

Kept apart from cli.py so that each check is one small function with one message, and so that
the workflow's start-up check (bayestune.run_checks) can use the same ones.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

from bayestune.errors import ConfigError

PathLike = str | os.PathLike[str]


# --- values of flags ------------------------------------------------------------------------
def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (a batch size, a number of workers):
    0 would reach a DataLoader or a pool and fail there with a traceback."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from err


# Python 3.11's argparse takes "-1e-3" for an option (its pattern of negative numbers has no
# exponent) and says "expected one argument"; no parser here has an option that looks like a
# number, so any number may be a value, and the config checks judge it.
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf(inity)?$", re.I)


def accept_negative_numbers(parsers: Iterable[argparse.ArgumentParser]) -> None:
    for parser in parsers:
        parser._negative_number_matcher = NEGATIVE_NUMBER  # the pattern argparse consults


def check_positive(name: str, value: float) -> str | None:
    """A problem with a rate or scale that must be a finite number > 0, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{name}={value!r} must be a number"
    return None if math.isfinite(value) and value > 0 else (
        f"{name}={value} must be a finite number > 0")


def check_nonnegative(name: str, value: float) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{name}={value!r} must be a number"
    return None if math.isfinite(value) and value >= 0 else (
        f"{name}={value} must be a finite number >= 0")


# --- paths that must differ -----------------------------------------------------------------
def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)  # links and other spellings of one file
    return a.resolve() == b.resolve()


def check_distinct(outputs: Mapping[str, PathLike | None],
                   inputs: Mapping[str, PathLike | None]) -> None:
    """Refuse, before anything is computed, a command whose output could not be written (a
    folder there, or a file where a parent folder should be), would overwrite one of its
    inputs, a file it keeps (a checkpoint) or another of its outputs, or would land inside an
    input folder (the prepared data): the command would otherwise end with a traceback after
    the work, or with exit status 0 and a lost or replaced file. Keys name the flag (or the
    file) in the message."""
    outs = [(name, Path(p)) for name, p in outputs.items() if p is not None]
    ins = [(name, Path(p)) for name, p in inputs.items() if p is not None]
    for k, (name, out) in enumerate(outs):
        _check_writable(name, out)
        for other, path in [*ins, *outs[k + 1:]]:
            if _same(out, path):
                raise ConfigError(f"{name} {out} is the same file as {other} {path}: writing it "
                                  f"would replace that file; give {name} another path")
        for other, path in ins:
            check_outside(name, out, other, path)


def check_outside(name: str, path: PathLike, other: str, folder: PathLike | None) -> None:
    """Refuse ``path`` (a folder a command writes) inside ``folder`` (one it reads)."""
    if folder is None or not Path(folder).is_dir():
        return
    if Path(path).resolve().is_relative_to(Path(folder).resolve()):
        raise ConfigError(f"{name} {path} lies inside {other} {folder}, which this command "
                          "reads: give it a path outside that folder")


def raw_task_folder(task: str, data_dir: PathLike | None,
                    declared: Mapping[str, object]) -> Path | None:
    """The folder ``prepare`` reads a task's raw files from (None: the Hub). It is read, never
    written: a token cache there would change the data's fingerprint."""
    if task in declared:
        return Path(declared[task].data)  # type: ignore[attr-defined]
    env = "BAYESTUNE_VTAB_DIR" if task.startswith("vtab-") else "BAYESTUNE_GLUE_DIR"
    root = data_dir or os.environ.get(env)
    if not root or str(root) == "hub":
        return None
    return Path(root) / task.removeprefix("vtab-")


def _check_writable(name: str, out: Path) -> None:
    if out.is_dir():
        raise ConfigError(f"{name} {out} is a folder; give the path of a file to write")
    probe = out.absolute().parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"cannot write {name} {out}: {probe} is a file, not a folder; choose "
                          "another path (or move that file)")


# --- the prepared data a run reads ----------------------------------------------------------
def prepared_fingerprint(prepared_dir: PathLike) -> str:
    """A hash of what ``prepare`` wrote in ``prepared_dir``: the names of its files and, for a
    safetensors file (the token cache), its header (tensor shapes, offsets and the metadata
    that holds the raw data's hash), for any other file (an image task's manifest) its bytes.
    Reading headers only keeps this cheap for a cache of any size, and any change of the raw
    data, its tokenisation or its row counts changes the header."""
    folder = Path(prepared_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(path.name.encode() + b"\0")
        digest.update(_safetensors_header(path) if path.suffix == ".safetensors"
                      else path.read_bytes())
    return digest.hexdigest()


def _safetensors_header(path: Path) -> bytes:
    with open(path, "rb") as handle:
        size = handle.read(8)
        if len(size) < 8:
            return size
        return size + handle.read(struct.unpack("<Q", size)[0])


def describe_changes(recorded: Mapping[str, object], ours: Mapping[str, object],
                     keys: Iterable[str] | None = None) -> list[str]:
    """``key: old -> new`` for each key whose value differs (hashes shortened)."""
    def short(value: object) -> str:
        text = repr(value)
        return text[:14] + "...'" if isinstance(value, str) and len(value) > 16 else text

    names = sorted(set(recorded) | set(ours)) if keys is None else list(keys)
    return [f"{k}: {short(recorded.get(k))} -> {short(ours.get(k))}" for k in names
            if recorded.get(k) != ours.get(k)]

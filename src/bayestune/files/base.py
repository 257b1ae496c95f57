"""What every file format shares: atomic writes, safetensors with their metadata and provenance,
the model check, JSON records and CSV rows appended one at a time."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from bayestune import __version__
from bayestune.errors import DataError, MissingFileError
from bayestune.provenance import collect as collect_provenance

METADATA_KEY = "bayestune"
PROVENANCE_KEY = "provenance"
Provenance = Mapping[str, Any]
PathLike = str | os.PathLike[str]
Tensors = Mapping[str, torch.Tensor]


class FileFormatError(DataError):
    """A file exists but is not what the caller expects (wrong kind, model or shapes)."""


# A temporary is named .<target>.<host>-<pid>.<random>.tmp, so that a later writer of the same
# target can tell a killed writer's leftover from a file another process is still writing: it is
# dead when its process is gone (same host), or when nothing has written to it for this long
# (another host's, or an older version's .<target>.<random>.tmp): a writer never pauses mid-file.
STALE_TEMPORARY_SECONDS = 3600.0


def _writer() -> str:
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', socket.gethostname())}-{os.getpid()}"


@contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    A process killed mid-write leaves its temporary behind (as large as the model for a sampler
    checkpoint); the next writer of the same target removes it (:func:`remove_stale_temporaries`).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{_writer()}.", suffix=".tmp",
                                    dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def replace_folder(path: PathLike, build: Callable[[Path], object]) -> Path:
    """Write folder ``path`` whole: ``build(tmp)`` fills a temporary folder beside it, which
    then takes the place of the old one, so a killed build leaves the old folder or none,
    never half of a new one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_writer()}.", dir=target.parent))
    old = target.with_name(f".{target.name}.{_writer()}.old")
    try:
        build(tmp)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target


def remove_stale_temporaries(path: PathLike) -> list[Path]:
    """Delete what killed writers of ``path`` left behind; return the files deleted.

    Only :func:`atomic_output`'s temporaries of this very target are considered, and one that a
    live process may still be writing is kept: the workflow runs one writer per target, but a
    second command started by hand must not lose its file.
    """
    target = Path(path)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:(?P<writer>\w+-\d+)\.)?\w+\.tmp")
    removed = []
    for candidate in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        found = pattern.fullmatch(candidate.name)
        if found and _temporary_is_dead(candidate, found["writer"]):
            with suppress(OSError):  # gone already, or not ours to delete
                candidate.unlink()
                removed.append(candidate)
    return removed


def _temporary_is_dead(path: Path, writer: str | None) -> bool:
    me = _writer()
    if writer == me:
        return False
    host, _, pid = (writer or "").rpartition("-")
    if writer is not None and host == me.rpartition("-")[0]:
        try:
            os.kill(int(pid), 0)  # signal 0 only asks whether the process exists
        except ProcessLookupError:
            return True
        except PermissionError:  # it exists, run by another user
            pass
    try:
        return time.time() - path.stat().st_mtime > STALE_TEMPORARY_SECONDS
    except FileNotFoundError:  # its writer has just renamed or removed it
        return False


def remove_output(path: PathLike) -> None:
    """Delete ``path`` and the temporaries that killed writers of it left behind."""
    Path(path).unlink(missing_ok=True)
    remove_stale_temporaries(path)


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], kind: str, meta: dict,
                  run: Provenance | None = None) -> None:
    info = {**meta, "kind": kind, "bayestune_version": __version__,  # the writer says what it is
            PROVENANCE_KEY: dict(run) if run is not None else collect_provenance()}
    plain = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    with atomic_output(path) as tmp:
        save_file(plain, str(tmp), metadata={METADATA_KEY: json.dumps(info, sort_keys=True)})


def _load_tensors(path: PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such {kind} file; run the stage that writes it first")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw_meta = (handle.metadata() or {}).get(METADATA_KEY)
        tensors = load_file(str(path))
    except SafetensorError as err:
        raise FileFormatError(f"{path}: not a readable safetensors file ({err}); delete it and "
                              "rerun the stage that writes it") from err
    try:
        meta = json.loads(raw_meta) if raw_meta else {}
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{path}: its bayestune metadata is damaged ({err}); delete it and "
                              "rerun the stage that writes it") from err
    found = meta.get("kind")
    if found != kind:
        found = found or "no bayestune metadata"
        raise FileFormatError(f"{path}: expected a {kind} file, found {found}")
    return tensors, meta


def check_matches_model(
    tensors: Mapping[str, torch.Tensor],
    shapes: Mapping[str, torch.Size],
    path: PathLike,
    kind: str,
) -> None:
    """Raise if a per-parameter file does not have exactly the model's names and shapes."""
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    common = set(shapes) & set(tensors)
    wrong = sorted(n for n in common if tuple(tensors[n].shape) != tuple(shapes[n]))
    if not (missing or extra or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} model parameters missing (first: {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} names not in the model (first: {extra[0]})")
    if wrong:
        n = wrong[0]
        parts.append(f"{len(wrong)} shape mismatches (first: {n} {tuple(tensors[n].shape)} "
                     f"vs model {tuple(shapes[n])})")
    raise FileFormatError(f"{path}: {kind} file does not match the model: {'; '.join(parts)}. "
                          "It was probably made for another model or task; regenerate it.")


# --- JSON records: metrics of a run, benchmark numbers --------------------------------------
def write_json(path: PathLike, record: Mapping[str, Any],
               provenance: Provenance | None = None) -> None:
    """Write ``record``; with ``provenance`` (a run's record, e.g. metrics.json), under
    ``provenance``."""
    if provenance is not None:
        record = {**record, PROVENANCE_KEY: dict(provenance)}
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_json(path: PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file; run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{path}: malformed JSON at line {err.lineno}: {err.msg}") from err


# --- CSV rows appended one at a time: a sweep's results, resumable ------------------------
def read_csv_table(path: PathLike, columns: Sequence[str]) -> pd.DataFrame:
    """The rows written so far by :func:`append_csv_row` (none when there is no file yet)."""
    path = Path(path)
    if not path.exists():
        return pd.DataFrame(columns=list(columns))
    return pd.read_csv(path)


def append_csv_row(path: PathLike, row: Mapping[str, Any], columns: Sequence[str]) -> None:
    """Append one row (header first when the file is new); one short write, so an interrupted
    run leaves whole rows behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns))
    if not path.exists() or path.stat().st_size == 0:
        writer.writeheader()
    writer.writerow({c: row.get(c) for c in columns})
    with open(path, "a", newline="") as handle:
        handle.write(buffer.getvalue())

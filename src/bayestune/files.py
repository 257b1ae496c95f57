"""Every file format of the project, written in one place and read in one place.

Tensor files are safetensors; their run information is JSON stored under the metadata key
``bayestune`` (safetensors metadata only holds strings). Every writer goes through
:func:`atomic_output`, so a killed job never leaves a half-written file behind.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from bayestune import __version__

METADATA_KEY = "bayestune"
PathLike = str | os.PathLike[str]
Tensors = Mapping[str, torch.Tensor]


class FileFormatError(ValueError):
    """A file exists but is not what the caller expects (wrong kind, model or shapes)."""


@contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], kind: str, meta: dict) -> None:
    info = {"kind": kind, "bayestune_version": __version__, **meta}
    plain = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    with atomic_output(path) as tmp:
        save_file(plain, str(tmp), metadata={METADATA_KEY: json.dumps(info, sort_keys=True)})


def _load_tensors(path: PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {kind} file; run the stage that writes it first")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw_meta = (handle.metadata() or {}).get(METADATA_KEY)
        tensors = load_file(str(path))
    except SafetensorError as err:
        raise FileFormatError(f"{path}: not a readable safetensors file ({err}); delete it and "
                              "rerun the stage that writes it") from err
    meta = json.loads(raw_meta) if raw_meta else {}
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


# --- scale file: posterior-mean lambda per parameter tensor ---------------------------------
def save_scales(path: PathLike, scales: Tensors, meta: dict) -> None:
    _save_tensors(Path(path), scales, "scales", meta)


def load_scales(path: PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    return _load_tensors(path, "scales")


# --- score file: any per-parameter ranking score (baselines) --------------------------------
def save_scores(path: PathLike, scores: Tensors, meta: dict) -> None:
    _save_tensors(Path(path), scores, "scores", meta)


def load_scores(path: PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a score file; a scale file is a score file too (posterior-mean lambda)."""
    try:
        return _load_tensors(path, "scores")
    except FileFormatError:
        return load_scales(path)


# --- mask file: bool tensor per parameter, True = trainable ---------------------------------
def save_mask(path: PathLike, mask: Mapping[str, torch.Tensor], meta: dict) -> None:
    _save_tensors(Path(path), {n: m.bool() for n, m in mask.items()}, "mask", meta)


def load_mask(path: PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    return _load_tensors(path, "mask")


# --- sparse delta: flat indices of changed scalars and their FINE-TUNED values (not the
# differences, so base + delta is bit-exact; see delta.py), per tensor ----------------------
def save_delta(
    path: PathLike,
    delta: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    meta: dict,
) -> None:
    flat = {}
    for name, (indices, values) in delta.items():
        flat[f"{name}::indices"] = indices.to(torch.int64)
        flat[f"{name}::values"] = values
    _save_tensors(Path(path), flat, "delta", meta)


def load_delta(path: PathLike) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    flat, meta = _load_tensors(path, "delta")
    names = {key.rsplit("::", 1)[0] for key in flat}
    return {n: (flat[f"{n}::indices"], flat[f"{n}::values"]) for n in names}, meta


# --- JSON records: metrics of a run, benchmark numbers --------------------------------------
def write_json(path: PathLike, record: Mapping[str, Any]) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_json(path: PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; run the stage that writes it first")
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


# --- training checkpoint: whole state of a resumable run (sampler, fine-tuning) -------------
# Large raw arrays can ride along as attachments: torch.save writes a zip archive whose records
# all sit in one folder and whose reader skips records it does not know, so an attachment is
# one more record there, stored uncompressed and streamed in and out (never whole in memory).
ATTACHMENT_FOLDER = "bayestune_attachments"
AttachmentWriter = Callable[[BinaryIO], None]


def save_checkpoint(path: PathLike, state: Mapping[str, Any],
                    attachments: Mapping[str, AttachmentWriter] | None = None) -> None:
    """Write ``state``; each attachment's writer streams its raw bytes into the same file."""
    with atomic_output(path) as tmp:
        torch.save(dict(state), tmp)
        if attachments:
            with zipfile.ZipFile(tmp, "a") as archive:
                folder = _archive_folder(archive)
                for name, write in attachments.items():
                    with archive.open(f"{folder}/{ATTACHMENT_FOLDER}/{name}", "w",
                                      force_zip64=True) as out:
                        write(out)


@contextmanager
def open_checkpoint_attachment(path: PathLike, name: str) -> Iterator[BinaryIO]:
    """A stream of the raw bytes attached under ``name`` (its CRC is checked at the end)."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as err:
        raise FileFormatError(f"{path}: unreadable checkpoint ({err}); delete it to start "
                              "over") from err
    with archive:
        record = f"{_archive_folder(archive)}/{ATTACHMENT_FOLDER}/{name}"
        if record not in archive.namelist():
            raise FileFormatError(f"{path}: checkpoint has no attachment {name!r}; it was "
                                  "written by another version, delete it to start over")
        with archive.open(record) as stream:
            try:
                yield stream
            except zipfile.BadZipFile as err:  # a CRC mismatch shows at the end of the stream
                raise FileFormatError(f"{path}: attachment {name!r} is corrupt ({err}); delete "
                                      "the checkpoint to start over") from err


def _archive_folder(archive: zipfile.ZipFile) -> str:
    return archive.namelist()[0].split("/", 1)[0]


def load_checkpoint(path: PathLike) -> dict[str, Any] | None:
    """Return the saved state, or None when there is no checkpoint to resume from."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise FileFormatError(
            f"{path}: unreadable checkpoint ({err}); delete it to start over") from err


# --- model weights: a full state dict (base model + delta applied) --------------------------
def save_model_state(path: PathLike, state: Tensors, meta: dict) -> None:
    _save_tensors(Path(path), state, "model", meta)


def load_model_state(path: PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    return _load_tensors(path, "model")


# --- token cache: tokenised splits of one text task ("split/name" -> tensor) ----------------
def save_token_cache(path: PathLike, splits: Mapping[str, Tensors], meta: dict) -> None:
    flat = {f"{split}/{name}": t for split, tensors in splits.items()
            for name, t in tensors.items()}
    _save_tensors(Path(path), flat, "token_cache", meta)


def load_token_cache(path: PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    flat, meta = _load_tensors(path, "token_cache")
    splits: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        split, name = key.split("/", 1)
        splits.setdefault(split, {})[name] = tensor
    return splits, meta

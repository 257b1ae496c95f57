"""Every file format of the project, written in one place and read in one place.

Tensor files are safetensors; their run information is JSON stored under the metadata key
``bayestune`` (safetensors metadata only holds strings). Every writer goes through
:func:`atomic_output`, so a killed job never leaves a half-written file behind. Every tensor
file, and each JSON record given one, carries a provenance record under ``provenance``
(:mod:`bayestune.provenance`: code, lock, software, config, device); callers that know the
command, its settings and the device pass it, the rest get the code and software part.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
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


# --- scale file: posterior-mean lambda per parameter tensor ---------------------------------
def save_scales(path: PathLike, scales: Tensors, meta: dict,
                provenance: Provenance | None = None) -> None:
    _save_tensors(Path(path), scales, "scales", meta, provenance)


def load_scales(path: PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    return _load_tensors(path, "scales")


# --- chain diagnostics: a JSON summary and a traces file beside each scale file --------------
DIAGNOSTICS_FORMAT = 1


def diagnostics_paths(scale_path: PathLike) -> tuple[Path, Path]:
    """The summary and the traces file of a scale file: ``seed0.safetensors`` has
    ``seed0.diagnostics.json`` and ``seed0.traces.safetensors`` beside it."""
    path = Path(scale_path)
    stem = path.name.removesuffix(".safetensors")
    return (path.with_name(f"{stem}.diagnostics.json"),
            path.with_name(f"{stem}.traces.safetensors"))


def save_diagnostics(path: PathLike, summary: Mapping[str, Any]) -> None:
    write_json(path, {**summary, "kind": "chain-diagnostics", "format": DIAGNOSTICS_FORMAT})


def load_diagnostics(path: PathLike) -> dict[str, Any]:
    record = read_json(path)
    if record.get("kind") != "chain-diagnostics":
        raise FileFormatError(f"{path}: not a chain diagnostics file (kind "
                              f"{record.get('kind')!r}); rerun stage 1 to write it")
    if record.get("format") != DIAGNOSTICS_FORMAT:
        raise FileFormatError(f"{path}: diagnostics format {record.get('format')!r}, this "
                              f"version reads {DIAGNOSTICS_FORMAT}; rerun stage 1 to rewrite it")
    return record


def save_traces(path: PathLike, traces: Tensors, meta: dict) -> None:
    _save_tensors(Path(path), traces, "chain-traces", meta)


def load_traces(path: PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    return _load_tensors(path, "chain-traces")


# --- score file: any per-parameter ranking score (baselines) --------------------------------
def save_scores(path: PathLike, scores: Tensors, meta: dict) -> None:
    _save_tensors(Path(path), scores, "scores", meta)


def load_scores(path: PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a score file; a scale file is a score file too (posterior-mean lambda)."""
    try:
        return _load_tensors(path, "scores")
    except FileFormatError:
        return load_scales(path)


# --- mask file: which scalars of each parameter may train ---------------------------------
# Format 2 stores, per tensor, either its selected flat indices (sorted, in the narrowest
# integer type that holds the tensor's size) or its bits packed eight to a byte, whichever is
# smaller; the tensor shapes ride in the metadata. Format 1 (no version in the metadata) stored
# one bool per scalar: a 0.5% RoBERTa-base mask was 125 MB, in format 2 it is about 2.5 MB.
MASK_FORMAT = 2
DELTA_FORMAT = 2
_INDEX_DTYPES = (torch.uint8, torch.uint16, torch.uint32, torch.int64)


def index_dtype(numel: int) -> torch.dtype:
    """The narrowest integer type that holds every flat index of a tensor of ``numel`` scalars."""
    for dtype in _INDEX_DTYPES:
        if numel - 1 <= torch.iinfo(dtype).max:
            return dtype
    raise ValueError(f"a tensor of {numel} scalars is too large to index")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def mask_entry_bytes(numel: int, n_selected: int) -> int:
    """Bytes that one tensor of ``numel`` scalars, ``n_selected`` of them selected, takes in a
    mask file (safetensors header aside)."""
    return min(_index_bytes(numel, n_selected), _packed_bytes(numel))


def _index_bytes(numel: int, n_selected: int) -> int:
    return n_selected * _itemsize(index_dtype(numel))


def _packed_bytes(numel: int) -> int:
    return (numel + 7) // 8


def save_mask(path: PathLike, mask: Mapping[str, torch.Tensor], meta: dict,
              provenance: Provenance | None = None) -> None:
    tensors, shapes = {}, {}
    for name, tensor in mask.items():
        flat = tensor.detach().reshape(-1).cpu().bool()
        shapes[name] = list(tensor.shape)
        if _packed_bytes(flat.numel()) < _index_bytes(flat.numel(), int(flat.count_nonzero())):
            packed = np.packbits(flat.numpy(), bitorder="little")
            tensors[f"{name}::bits"] = torch.from_numpy(packed)
        else:
            indices = torch.nonzero(flat).squeeze(1)
            tensors[f"{name}::indices"] = indices.to(index_dtype(flat.numel()))
    _save_tensors(Path(path), tensors, "mask",
                  {**meta, "format_version": MASK_FORMAT, "shapes": shapes}, provenance)


def load_mask(path: PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Bool tensor per parameter (True = trainable), from either mask format."""
    stored, meta = _load_tensors(path, "mask")
    version = _format_version(path, meta, MASK_FORMAT, "mask")
    if version == 1:
        not_bool = sorted(n for n, t in stored.items() if t.dtype != torch.bool)
        if not_bool:
            name = not_bool[0]
            raise FileFormatError(f"{path}: mask tensor {name} is {stored[name].dtype}, not "
                                  "bool; the file is corrupt, rerun the mask stage")
        return stored, meta
    shapes = meta.pop("shapes", None)
    if not isinstance(shapes, dict):
        raise FileFormatError(f"{path}: mask file lacks its tensor shapes; rerun the mask stage")
    found = {key.rsplit("::", 1)[0] for key in stored}
    if found != set(shapes) or len(stored) != len(shapes):
        raise FileFormatError(f"{path}: mask entries do not match its list of tensors; the file "
                              "is corrupt, rerun the mask stage")
    return {name: _decode_mask(path, name, shape, stored) for name, shape in shapes.items()}, meta


def _decode_mask(path: PathLike, name: str, shape: list[int], stored: Tensors) -> torch.Tensor:
    numel = math.prod(shape)
    packed = stored.get(f"{name}::bits")
    if packed is not None:
        if packed.dtype != torch.uint8 or packed.shape != (_packed_bytes(numel),):
            raise FileFormatError(f"{path}: {name} has {tuple(packed.shape)} packed bytes for "
                                  f"{numel} scalars; the file is corrupt, rerun the mask stage")
        bits = np.unpackbits(packed.numpy(), count=numel, bitorder="little")
        return torch.from_numpy(bits.astype(bool)).reshape(shape)
    indices = stored.get(f"{name}::indices")
    if indices is None:
        raise FileFormatError(f"{path}: {name} has neither indices nor packed bits; the file is "
                              "corrupt, rerun the mask stage")
    indices = indices.to(torch.int64)
    if indices.dim() != 1 or (indices.numel() and (
            int(indices[0]) < 0 or int(indices[-1]) >= numel
            or not bool((indices[1:] > indices[:-1]).all()))):
        raise FileFormatError(f"{path}: {name} has indices that are not sorted flat positions "
                              f"of its {numel} scalars; the file is corrupt, rerun the mask stage")
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[indices] = True
    return flat.reshape(shape)


def _format_version(path: PathLike, meta: dict, newest: int, kind: str) -> int:
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or not 1 <= version <= newest:
        raise FileFormatError(f"{path}: {kind} file format {version!r} is newer than this "
                              f"bayestune reads (up to {newest}); upgrade bayestune")
    return version


# --- delta: the FINE-TUNED values (not the differences, so base + delta is bit-exact; see
# delta.py) of the changed scalars, per tensor. Sparse entries store flat indices (narrowest
# integer type) beside the values, dense entries the whole tensor's values and no index; the
# writer of the delta picks whichever is smaller (see delta_is_dense). Format 1 stored int64
# indices for every tensor, twice the values' bytes in indices alone. ---------------------
def delta_is_dense(numel: int, n_changed: int, itemsize: int) -> bool:
    """Whether storing all ``numel`` values is smaller than ``n_changed`` indices + values."""
    return numel * itemsize <= n_changed * (_itemsize(index_dtype(numel)) + itemsize)


def delta_entry_bytes(numel: int, n_changed: int, itemsize: int) -> int:
    """Bytes that one tensor's entry takes in a delta file (safetensors header aside)."""
    if n_changed == 0:
        return 0
    if delta_is_dense(numel, n_changed, itemsize):
        return numel * itemsize
    return n_changed * (_itemsize(index_dtype(numel)) + itemsize)


def save_delta(
    path: PathLike,
    delta: Mapping[str, tuple[torch.Tensor | None, torch.Tensor]],
    meta: dict,
    provenance: Provenance | None = None,
) -> None:
    """``delta``: name -> (flat indices, values), or (None, every value) for a dense entry."""
    flat = {}
    for name, (indices, values) in delta.items():
        if indices is not None:
            top = int(indices.max()) + 1 if indices.numel() else 1
            flat[f"{name}::indices"] = indices.to(index_dtype(top))
        flat[f"{name}::values"] = values.reshape(-1)
    _save_tensors(Path(path), flat, "delta",
                  {**meta, "values": "finetuned", "format_version": DELTA_FORMAT}, provenance)


def load_delta(path: PathLike) -> tuple[dict[str, tuple[torch.Tensor | None, torch.Tensor]], dict]:
    """name -> (int64 flat indices, values), or (None, every value) for a dense entry."""
    flat, meta = _load_tensors(path, "delta")
    _format_version(path, meta, DELTA_FORMAT, "delta")
    names = {key.rsplit("::", 1)[0] for key in flat}
    delta = {}
    for name in names:
        if f"{name}::values" not in flat:
            raise FileFormatError(f"{path}: {name} has indices but no values; the file is "
                                  "corrupt, rerun the fine-tuning stage")
        indices = flat.get(f"{name}::indices")
        if indices is not None:
            indices = indices.to(torch.int64)
        delta[name] = (indices, flat[f"{name}::values"])
    return delta, meta


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
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]  # torch's is long
        raise FileFormatError(
            f"{path}: unreadable checkpoint ({first}); delete it to start over") from err


# --- model weights: a full state dict (base model + delta applied) --------------------------
def save_model_state(path: PathLike, state: Tensors, meta: dict,
                     provenance: Provenance | None = None) -> None:
    _save_tensors(Path(path), state, "model", meta, provenance)


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

"""Sparse tensor files: masks (which scalars train) and deltas (the fine-tuned values that
changed)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from bayestune.files.base import (
    FileFormatError,
    PathLike,
    Provenance,
    Tensors,
    _load_tensors,
    _save_tensors,
)

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

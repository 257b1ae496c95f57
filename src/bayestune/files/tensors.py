"""Dense tensor files: scale files and their chain diagnostics, score files, model weights and
token caches."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bayestune.files.base import (
    FileFormatError,
    PathLike,
    Provenance,
    Tensors,
    _load_tensors,
    _save_tensors,
    read_json,
    write_json,
)


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

"""What every text task shares: tokenising, the token cache and its key, the loaders.

A prepared text task is one file, ``tokens.safetensors``, holding the three tokenised splits
and, in its metadata, the key it was made for: task, tokenizer, max length, the data source
and a hash of the raw data (plus a custom task's declaration). ``prepare`` re-tokenises
whenever any part of the key differs, so an edited split file is never served stale.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from bayestune.files import FileFormatError, load_token_cache, save_token_cache
from bayestune.models.text import canonical_model_name, load_tokenizer
from bayestune.tasks.base import SPLITS, TaskData, TaskError

log = logging.getLogger(__name__)

CACHE_FILE = "tokens.safetensors"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def cache_key(task: str, model_name: str, max_length: int, source: str, data_hash: str,
              **extra: Any) -> dict[str, Any]:
    """Everything a token cache depends on; ``extra`` adds e.g. a custom task's declaration."""
    return {"task": task, "tokenizer": canonical_model_name(model_name),
            "max_length": max_length, "source": source, "data_hash": data_hash, **extra}


def cache_is_current(prepared_dir: str | os.PathLike[str], key: Mapping[str, Any]) -> bool:
    path = Path(prepared_dir) / CACHE_FILE
    if not path.is_file():
        return False
    try:
        _, meta = load_token_cache(path)
    except FileFormatError:
        return False
    return all(meta.get(k) == v for k, v in key.items())


def tokenizer_for(model_name: str):
    tokenizer = load_tokenizer(model_name)
    tokenizer.padding_side = "right"  # the loaders trim padding off the right end
    return tokenizer


def encode(tokenizer, first: list[str], second: list[str] | None, max_length: int, **extra):
    return tokenizer(first, second, truncation=True, max_length=max_length, padding=True,
                     return_tensors="pt", **extra)


def model_inputs(enc, tokenizer) -> dict[str, torch.Tensor]:
    names = [n for n in INPUT_NAMES if n in enc and n in tokenizer.model_input_names]
    return {n: enc[n].to(torch.int32) for n in names}


def tokenize_texts(tokenizer, first: list[str], second: list[str] | None, labels: list,
                   max_length: int, regression: bool) -> dict[str, torch.Tensor]:
    """One split of a single-text or text-pair task, padded to its longest row."""
    out = model_inputs(encode(tokenizer, first, second, max_length), tokenizer)
    out["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.int64)
    return out


def write_cache(prepared_dir: str | os.PathLike[str], tensors: Mapping[str, Any],
                key: Mapping[str, Any], rows: Mapping[str, int]) -> Path:
    prepared_dir = Path(prepared_dir)
    path = prepared_dir / CACHE_FILE
    save_token_cache(path, tensors, {**key, "rows": dict(rows)})
    log.info("%s: %s rows from %s -> %s", key["task"],
             ", ".join(f"{s} {n}" for s, n in rows.items()), key["source"], path)
    return prepared_dir


def read_cache(task: str, prepared_dir: str | os.PathLike[str]
               ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """The tokenised splits of ``task`` and their metadata; a foreign cache is an error."""
    path = Path(prepared_dir) / CACHE_FILE
    if not path.is_file():
        raise TaskError(f"{path}: no token cache; run `bayestune prepare --task {task} ...` first")
    splits, meta = load_token_cache(path)
    if meta.get("task") != task:
        raise TaskError(f"{path}: token cache of task {meta.get('task')!r}, not {task!r}; "
                        "point at the right prepared folder")
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise TaskError(f"{path}: token cache without split {missing[0]}; prepare it again")
    return splits, meta


class TrimCollate:
    """Gather rows by index and cut the padding columns that no row of the batch uses."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.tensor(indices)
        batch = {k: v[idx] for k, v in self.tensors.items()}
        length = int(batch["attention_mask"].sum(-1).max())
        for k, v in batch.items():
            if k == "labels":
                continue
            v = v[..., :length]
            batch[k] = v if v.dtype == torch.bool else v.long()
        return batch


def _loader(tensors: dict[str, torch.Tensor], batch_size: int,
            generator: torch.Generator | None = None) -> DataLoader:
    n = len(tensors["labels"])
    return DataLoader(range(n), batch_size=batch_size, shuffle=generator is not None,
                      generator=generator, collate_fn=TrimCollate(tensors))


def text_loaders(splits: Mapping[str, dict[str, torch.Tensor]], batch_size: int, seed: int,
                 eval_batch_size: int = 64) -> TaskData:
    """Train shuffled by its own generator (see :class:`TaskData`), val and test in order."""
    generator = torch.Generator().manual_seed(seed)
    return TaskData(train=_loader(splits["train"], batch_size, generator),
                    val=_loader(splits["val"], eval_batch_size),
                    test=_loader(splits["test"], eval_batch_size), seed=seed)

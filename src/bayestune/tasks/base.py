"""What every benchmark task offers the pipeline, NLP or vision alike."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader

from bayestune.errors import DataError
from bayestune.models.base import TaskModel, move_batch

SPLITS = ("train", "val", "test")
VAL_CUT_SEED = 0        # the fixed permutation seed of every 90/10 train/val cut
VAL_FRACTION = 0.1


class TaskError(DataError):
    """Bad task input: an unknown name, a missing or malformed split file, a bad label."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    benchmark: str                 # "glue", "vtab" or "custom"
    metric_name: str               # shown in tables, e.g. "matthews", "acc_f1"
    # metric(logits, labels) -> score in natural units (x1; tables multiply by 100)
    metric: Callable[[np.ndarray, np.ndarray], float]
    group: str = ""                # VTAB group (Natural, Specialized, Structured)


@dataclass
class TaskData:
    """Loaders of one prepared task.

    ``train`` must shuffle with its own ``torch.Generator`` (``DataLoader(generator=...)``):
    :meth:`train_epoch` reseeds it, so epoch ``e`` always yields the same batches, which is
    what lets a killed run resume exactly where it stopped.
    """

    train: DataLoader
    val: DataLoader
    test: DataLoader
    seed: int

    def train_epoch(self, epoch: int) -> Iterable[dict]:
        """The training batches of epoch ``epoch``; the same epoch gives the same batches."""
        self.train.generator.manual_seed(self.seed * 1_000_003 + epoch)
        return self.train


@torch.no_grad()
def evaluate(model: TaskModel, batches: Iterable[dict], spec: TaskSpec,
             device: torch.device | str = "cpu") -> float:
    """Score ``model`` on every batch with the task's metric (natural units)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in batches:
        out = model(move_batch(batch, device))
        logits.append(out.logits.float().cpu())
        labels.append(batch["labels"].cpu())
    model.train(was_training)
    return float(spec.metric(torch.cat(logits).numpy(), torch.cat(labels).numpy()))


def first_examples(batches: Iterable[dict], n: int) -> Iterable[dict]:
    """The first ``n`` examples of a batch stream (all of them when ``n`` is 0), the last batch
    cut to size."""
    left = n
    for batch in batches:
        if n and left <= 0:
            return
        size = len(batch["labels"])
        if n and size > left:
            batch = {k: v[:left] if torch.is_tensor(v) else v for k, v in batch.items()}
        left -= size
        yield batch


def val_scorer(data: TaskData, spec: TaskSpec, n_examples: int,
               device: torch.device | str) -> Callable[[TaskModel], float]:
    """``score(model)``: the task metric on the first ``n_examples`` validation examples (0: the
    whole split), as jiant selects on its first 500; what stage 1's length rule calls."""
    return lambda model: evaluate(model, first_examples(data.val, n_examples), spec, device)


T = TypeVar("T")


def split_train_val(rows: Sequence[T], seed: int = VAL_CUT_SEED,
                    val_fraction: float = VAL_FRACTION) -> tuple[list[T], list[T]]:
    """Cut ``rows`` into (train, val) by a seeded permutation; each part keeps the row order."""
    n = len(rows)
    n_val = min(n - 1, max(1, math.ceil(n * val_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    val_idx = set(order[:n_val].tolist())
    train = [row for i, row in enumerate(rows) if i not in val_idx]
    val = [row for i, row in enumerate(rows) if i in val_idx]
    return train, val


def hash_files(paths: Iterable[str | os.PathLike[str]]) -> str:
    """SHA-256 over the names and bytes of ``paths`` in order: the raw data's identity in a
    prepared cache's key, so an edited split file is never served from a stale cache."""
    digest = hashlib.sha256()
    for path in paths:
        name, size = os.path.basename(path), os.path.getsize(path)
        digest.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()

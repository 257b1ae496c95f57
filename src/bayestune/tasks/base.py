"""What every benchmark task offers the pipeline, NLP or vision alike."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from bayestune.errors import DataError
from bayestune.models.base import TaskModel, move_batch


class TaskError(DataError):
    """Bad task input: an unknown name, a missing or malformed split file, a bad label."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    benchmark: str                 # "glue" or "vtab"
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

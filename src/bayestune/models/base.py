"""The one model shape every stage works with: a pretrained ``encoder`` and a task ``head``.

Parameter names therefore start with ``encoder.`` or ``head.``, which is how masks, figures
and tables tell the two apart. ``forward`` takes the batch dict that the task's loaders yield
and returns the loss (when the batch has ``labels``) and the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bayestune.errors import ConfigError

HEAD_PREFIX = "head."
# The text models' architectures (models.text): ``jiant``, the paper's (jiant's pooler and heads),
# and ``first-token``, this project's earlier heads on the first token without a pooler. Files
# written before the choice existed record none and are ``first-token`` (file_origin.py).
ARCHITECTURES = ("jiant", "first-token")
DEFAULT_ARCHITECTURE = "jiant"
LEGACY_ARCHITECTURE = "first-token"


def is_head(name: str) -> bool:
    """True for a parameter of the task head (freshly initialised, not pretrained)."""
    return name.startswith(HEAD_PREFIX)


@dataclass
class TaskOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor


class TaskModel(nn.Module):
    """Base class: subclasses set ``self.encoder`` and ``self.head`` and implement forward."""

    model_id: str = ""
    # A text model's architecture (one of ARCHITECTURES); None for models without the choice
    # (vision), whose files are then not checked for it.
    architecture: str | None = None

    def forward(self, batch: dict[str, torch.Tensor]) -> TaskOutput:  # pragma: no cover
        raise NotImplementedError


def task_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss function handed to the sampler, the baselines and stage 2."""
    return model(batch).loss


Batch = dict[str, torch.Tensor]


def move_batch(batch: Batch, device: torch.device | str) -> Batch:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` is the GPU when one is visible; asking for CUDA without one is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no GPU is visible; use --device cpu")
    return device

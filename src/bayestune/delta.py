"""The deliverable of a sparse fine-tuning run: which scalars changed, and to what.

A delta holds, per changed tensor, the flat indices of the scalars with theta != theta0 and
the FINE-TUNED VALUES there (not theta - theta0): in floating point theta0 + (theta - theta0)
is not always theta, while writing the stored values back gives the fine-tuned model bit for
bit. ``difference`` recovers theta - theta0 for anyone who wants it. Files are written and
read by ``bayestune.files.save_delta`` / ``load_delta`` (keys ``<name>::indices``/``::values``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from bayestune.files import FileFormatError

Delta = dict[str, tuple[torch.Tensor, torch.Tensor]]
DELTA_META = {"values": "finetuned"}  # record the convention in every delta file


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """theta0: a CPU copy of every parameter, taken before fine-tuning."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


@torch.no_grad()
def make_delta(model: nn.Module, theta0: Mapping[str, torch.Tensor]) -> Delta:
    """Indices (int64, into the flattened tensor) and fine-tuned values of changed scalars.

    Tensors with no changed scalar are left out. Comparison is exact (bitwise for floats).
    """
    delta: Delta = {}
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(theta0))
    if missing:
        raise ValueError(f"theta0 lacks {len(missing)} model parameters (first: {missing[0]}); "
                         "take it with delta.snapshot(model) before fine-tuning")
    for name, param in params.items():
        base = theta0[name]
        if tuple(base.shape) != tuple(param.shape):
            raise ValueError(f"theta0[{name}] has shape {tuple(base.shape)}, the model "
                             f"{tuple(param.shape)}; theta0 is from another model")
        current = param.detach().reshape(-1).cpu()
        changed = torch.nonzero(current != base.reshape(-1).to(current.dtype)).squeeze(1)
        if changed.numel():
            delta[name] = (changed, current[changed].clone())
    return delta


def difference(delta: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
               theta0: Mapping[str, torch.Tensor]) -> Delta:
    """theta - theta0 at the stored indices (for analysis; not needed to apply a delta)."""
    return {n: (idx, vals - theta0[n].reshape(-1)[idx].to(vals.dtype))
            for n, (idx, vals) in delta.items()}


@torch.no_grad()
def apply_delta(model: nn.Module, delta: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                source: str = "delta") -> None:
    """Write the delta's fine-tuned values into ``model`` (the base model) in place.

    ``source`` (usually the file path) names the delta in error messages.
    """
    params = dict(model.named_parameters())
    for name, (indices, values) in delta.items():
        if name not in params:
            raise FileFormatError(f"{source}: parameter {name} is not in the model; the delta "
                                  "was made for another model or task")
        param = params[name]
        if indices.dim() != 1 or indices.shape != values.shape:
            raise FileFormatError(f"{source}: {name} has {tuple(indices.shape)} indices but "
                                  f"{tuple(values.shape)} values; the file is corrupt")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= param.numel()):
            raise FileFormatError(f"{source}: {name} has indices outside its {param.numel()} "
                                  "scalars; the delta was made for another model shape")
        flat = param.data.view(-1)
        flat.index_copy_(0, indices.to(flat.device, torch.long), values.to(flat.device, flat.dtype))

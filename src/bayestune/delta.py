"""The deliverable of a sparse fine-tuning run: which scalars changed, and to what.

A delta holds, per changed tensor, the FINE-TUNED VALUES of its changed scalars (not
theta - theta0): in floating point theta0 + (theta - theta0) is not always theta, while writing
the stored values back gives the fine-tuned model bit for bit. Each entry is either sparse,
``(flat indices, values)``, or dense, ``(None, every value of the tensor)``, whichever takes
fewer bytes on disk; a fully fine-tuned tensor is therefore stored once, without indices.
``difference`` recovers theta - theta0 for anyone who wants it. Files are written and read by
``bayestune.files.save_delta`` / ``load_delta``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from bayestune.files import FileFormatError, delta_is_dense

# name -> (int64 flat indices, values), or (None, all values flattened) for a dense entry
Delta = dict[str, tuple[torch.Tensor | None, torch.Tensor]]
DELTA_META = {"values": "finetuned"}  # record the convention in every delta file


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """theta0: a CPU copy of every parameter, taken before fine-tuning."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


@torch.no_grad()
def make_delta(model: nn.Module, theta0: Mapping[str, torch.Tensor]) -> Delta:
    """Fine-tuned values of the changed scalars, sparse or dense per tensor (smaller wins).

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
        if not changed.numel():
            continue
        if delta_is_dense(current.numel(), changed.numel(), current.element_size()):
            delta[name] = (None, current.clone())
        else:
            delta[name] = (changed, current[changed].clone())
    return delta


def difference(delta: Mapping[str, tuple[torch.Tensor | None, torch.Tensor]],
               theta0: Mapping[str, torch.Tensor]) -> Delta:
    """theta - theta0 at the stored scalars (for analysis; not needed to apply a delta)."""
    result: Delta = {}
    for name, (indices, values) in delta.items():
        base = theta0[name].reshape(-1)
        base = base if indices is None else base[indices]
        result[name] = (indices, values - base.to(values.dtype))
    return result


@torch.no_grad()
def apply_delta(model: nn.Module, delta: Mapping[str, tuple[torch.Tensor | None, torch.Tensor]],
                source: str = "delta") -> None:
    """Write the delta's fine-tuned values into ``model`` (the base model) in place.

    ``source`` (usually the file path) names the delta in error messages.
    """
    params = dict(model.named_parameters())
    for name, (indices, values) in delta.items():
        if name not in params:
            raise FileFormatError(f"{source}: parameter {name} is not in the model; the delta "
                                  "was made for another model or task")
        flat = params[name].data.view(-1)
        if indices is None:
            if values.numel() != flat.numel():
                raise FileFormatError(f"{source}: {name} has {values.numel()} dense values for "
                                      f"{flat.numel()} scalars; the delta was made for another "
                                      "model shape")
            flat.copy_(values.reshape(-1).to(flat.device, flat.dtype))
            continue
        if indices.dim() != 1 or indices.shape != values.shape:
            raise FileFormatError(f"{source}: {name} has {tuple(indices.shape)} indices but "
                                  f"{tuple(values.shape)} values; the file is corrupt")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= flat.numel()):
            raise FileFormatError(f"{source}: {name} has indices outside its {flat.numel()} "
                                  "scalars; the delta was made for another model shape")
        flat.index_copy_(0, indices.to(flat.device, torch.long), values.to(flat.device, flat.dtype))

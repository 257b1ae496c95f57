"""How much two masks agree: Jaccard overlap of every pair (the mask-overlap figure)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import pandas as pd
import torch
from torch import Tensor

from bayestune.errors import ConfigError


def mask_overlap(masks: Mapping[str, Mapping[str, Tensor]]) -> pd.DataFrame:
    """Jaccard overlap |A & B| / |A | B| of every pair of masks (rows, columns: their keys).

    Two empty masks count as identical (1.0). Masks must cover the same tensors and shapes.
    """
    labels = list(masks)
    if not labels:
        raise ConfigError("mask_overlap needs at least one mask")
    ref = {n: tuple(t.shape) for n, t in masks[labels[0]].items()}
    for label in labels[1:]:
        shapes = {n: tuple(t.shape) for n, t in masks[label].items()}
        if shapes != ref:
            raise ConfigError(f"masks {labels[0]!r} and {label!r} cover different tensors or "
                              "shapes; compare masks made for the same model and task")
    flat = {label: torch.cat([masks[label][n].reshape(-1).bool() for n in ref]) for label in labels}
    table = pd.DataFrame(1.0, index=labels, columns=labels)
    for a, b in itertools.combinations(labels, 2):
        union = int((flat[a] | flat[b]).sum())
        inter = int((flat[a] & flat[b]).sum())
        table.loc[a, b] = table.loc[b, a] = inter / union if union else 1.0
    return table

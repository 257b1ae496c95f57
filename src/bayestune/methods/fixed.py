"""full and bitfit: masks fixed by the architecture; the budget does not choose them.

Each budget gets the same mask, so these methods line up with the budgeted ones in the tables
(under the budget label "-", with their real trainable fraction recorded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from bayestune.masks import check_budget
from bayestune.methods.common import check_no_scores
from bayestune.methods.config import Batches, LossFn, Mask, Masks, MethodConfig
from bayestune.methods.registry import MethodError
from bayestune.models.base import is_head


def _same_for_every_budget(mask: Mask, budgets: Sequence[float]) -> Masks:
    if not budgets:
        raise MethodError("no budgets given; pass at least one fraction in (0, 1]")
    return Masks({check_budget(b): mask for b in budgets})


def full_masks(model: nn.Module, batches: Batches | None, loss_fn: LossFn,
               budgets: Sequence[float], seed: int, config: MethodConfig, *,
               scores: Mapping[str, Tensor] | None = None) -> Masks:
    """Every scalar trainable (the workflow runs full fine-tuning without a mask file)."""
    check_no_scores("full", scores)
    mask = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    return _same_for_every_budget(mask, budgets)


def bitfit_masks(model: nn.Module, batches: Batches | None, loss_fn: LossFn,
                 budgets: Sequence[float], seed: int, config: MethodConfig, *,
                 scores: Mapping[str, Tensor] | None = None) -> Masks:
    """Every bias (names ending in ``.bias``) and the whole head.

    LayerNorm biases count as biases, as in the BitFit paper's list of bias terms. The fraction
    is fixed by the architecture and the head (biases alone: 0.08% of RoBERTa-base): read it with
    :func:`bayestune.masks.mask_fraction` and record it, as every budget gets this same mask.
    """
    check_no_scores("bitfit", scores)
    mask = {n: torch.full(p.shape, n.endswith(".bias") or is_head(n), dtype=torch.bool)
            for n, p in model.named_parameters()}
    return _same_for_every_budget(mask, budgets)

"""sam (the SAM repo's ``bsearch``): summed batch gradients at theta0, no update.

On each training step the batch gradient is computed in training mode and clipped to global
norm 1 (``clip_grad_norm_`` over every parameter) BEFORE it is added to a running sum; the step
then returns before the optimiser and the scheduler, so the weights stay at theta0 and the
schedule has not moved. Steps 1 to ``sam_steps - 1`` (499) add their gradients; step
``sam_steps`` ranks |sum| within each encoder tensor (top int(p * size)) and is the first
training step, with the head always trainable. Stage 2 therefore starts from theta0 with a
fresh optimiser, as the repo does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from bayestune.methods.common import (
    backward_passes,
    device_of,
    named,
    ranked_masks,
    seeded,
    working_copy,
)
from bayestune.methods.config import Batches, LossFn, Masks, MethodConfig


def sam_scores(model: nn.Module, batches: Batches | None, loss_fn: LossFn, seed: int,
               config: MethodConfig) -> dict[str, Tensor]:
    """|sum of clipped batch gradients| over the first ``sam_steps - 1`` batches at theta0.

    Gradients of opposite sign cancel, so a scalar the data pushes back and forth ranks low.
    """
    work = working_copy(model)
    params = list(work.parameters())
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    with seeded(seed, device_of(work)):
        for _ in backward_passes(work, batches, loss_fn, config.sam_steps - 1,
                                 "sam: accumulated gradients", grad_clip=config.grad_clip):
            for acc, param in zip(total, params, strict=True):
                if param.grad is not None:  # an unused parameter (a pooler) adds nothing
                    acc.add_(param.grad.float())
    return named(work, (t.abs() for t in total))


def sam_masks(model: nn.Module, batches: Batches | None, loss_fn: LossFn,
              budgets: Sequence[float], seed: int, config: MethodConfig, *,
              scores: Mapping[str, Tensor] | None = None) -> Masks:
    return ranked_masks("sam", sam_scores, model, batches, loss_fn, budgets, seed, config,
                        scores)

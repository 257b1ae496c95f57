"""Gradient scores at theta0, no update: fisher (FISH mask) and sam (the SAM repo's bsearch).

fisher, as FISH defines it: the sum over ``fisher_examples`` (1024) training examples of each
example's squared gradient, taken one example at a time (batch size 1) with the true label, in
evaluation mode (no dropout: a model fresh from ``from_pretrained``), over at most one pass of
the shuffled training split. Then the global top-k over all scalars, with the classifier always
trainable and inside the budget (k = floor(p * D) - head size of the rest).

sam, as the SAM repo's ``bsearch`` runs it: on each training step the batch gradient is
computed in training mode and clipped to global norm 1 (``clip_grad_norm_`` over every
parameter) BEFORE it is added to a running sum; the step then returns before the optimiser and
the scheduler, so the weights stay at theta0 and the schedule has not moved. Steps 1 to
``sam_steps - 1`` (499) add their gradients; step ``sam_steps`` ranks |sum| within each encoder
tensor (top int(p * size)) and is the first training step, with the head always trainable.
Stage 2 therefore starts from theta0 with a fresh optimiser, as the repo does.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from bayestune.masks import masks_from_scores
from bayestune.methods.common import (
    check_scores_fit,
    device_of,
    gradients,
    named,
    seeded,
    take,
    working_copy,
)
from bayestune.methods.config import Batches, LossFn, Masks, MethodConfig, ranking_options
from bayestune.methods.registry import MethodError
from bayestune.models.base import move_batch


def single_examples(batch: dict) -> Iterator[dict]:
    """The examples of a batch one at a time, each a batch of one (every tensor is sliced on
    its first dimension, so COPA's choice dimension and WSC's span masks come along)."""
    sizes = {v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0}
    if len(sizes) != 1:
        raise MethodError(f"cannot split a batch whose tensors disagree on the batch size "
                          f"({sorted(sizes)}); per-example gradients need one batch dimension")
    for i in range(sizes.pop()):
        yield {k: v[i:i + 1] if torch.is_tensor(v) and v.dim() > 0 else v
               for k, v in batch.items()}


def fisher_scores(model: nn.Module, batches: Batches | None, loss_fn: LossFn, seed: int,
                  config: MethodConfig) -> dict[str, Tensor]:
    """Sum over training examples of the squared per-example gradient at theta0."""
    if batches is None:
        raise MethodError("fisher: needs training batches; pass --data DIR (the prepared task)")
    work = working_copy(model, train=False)
    total = [torch.zeros_like(p, dtype=torch.float32) for p in work.parameters()]
    examples = (one for batch in batches(0) for one in single_examples(batch))
    seen = 0
    with seeded(seed, device_of(work)):
        for example in itertools.islice(examples, config.fisher_examples):
            for acc, grad in zip(total, gradients(work, loss_fn, example), strict=True):
                acc.add_(grad.float().square())
            seen += 1
    if seen == 0:
        raise MethodError("fisher: the training split yielded no example")
    return named(work, total)


def sam_scores(model: nn.Module, batches: Batches | None, loss_fn: LossFn, seed: int,
               config: MethodConfig) -> dict[str, Tensor]:
    """|sum of clipped batch gradients| over the first ``sam_steps - 1`` batches at theta0.

    Gradients of opposite sign cancel, so a scalar the data pushes back and forth ranks low.
    """
    work = working_copy(model)
    params = list(work.parameters())
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    device = device_of(work)
    with seeded(seed, device):
        for batch in take(batches, config.sam_steps - 1, "sam: accumulated gradients"):
            work.zero_grad(set_to_none=True)
            loss_fn(work, move_batch(batch, device)).backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            for acc, param in zip(total, params, strict=True):
                if param.grad is not None:  # an unused parameter (a pooler) adds nothing
                    acc.add_(param.grad.float())
    return named(work, (t.abs() for t in total))


def fisher_masks(model: nn.Module, batches: Batches | None, loss_fn: LossFn,
                 budgets: Sequence[float], seed: int, config: MethodConfig, *,
                 scores: Mapping[str, Tensor] | None = None) -> Masks:
    # Precomputed scores (a saved score file) replace computing them again.
    if scores is None:
        scores = fisher_scores(model, batches, loss_fn, seed, config)
    check_scores_fit("fisher", model, scores)
    return Masks(masks_from_scores(scores, budgets, **ranking_options("fisher", config)))


def sam_masks(model: nn.Module, batches: Batches | None, loss_fn: LossFn,
              budgets: Sequence[float], seed: int, config: MethodConfig, *,
              scores: Mapping[str, Tensor] | None = None) -> Masks:
    if scores is None:
        scores = sam_scores(model, batches, loss_fn, seed, config)
    check_scores_fit("sam", model, scores)
    return Masks(masks_from_scores(scores, budgets, **ranking_options("sam", config)))

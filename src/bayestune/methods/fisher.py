"""fisher (FISH mask): gradient scores at theta0, no update.

As FISH defines it: the sum over ``fisher_examples`` (1024) training examples of each example's
squared gradient, taken one example at a time (batch size 1) with the true label, in evaluation
mode (no dropout: a model fresh from ``from_pretrained``), over at most one pass of the
shuffled training split. Then the global top-k over all scalars, with the classifier always
trainable and inside the budget (k = floor(p * D) - head size of the rest).

Stage 1's chain diagnostics compare the posterior mean with these scores too, so this module
stands alone: the sampler's jobs run it and nothing of the other methods.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from bayestune.methods.common import (
    device_of,
    gradients,
    named,
    ranked_masks,
    seeded,
    working_copy,
)
from bayestune.methods.config import Batches, LossFn, Masks, MethodConfig
from bayestune.methods.registry import MethodError


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


def fisher_masks(model: nn.Module, batches: Batches | None, loss_fn: LossFn,
                 budgets: Sequence[float], seed: int, config: MethodConfig, *,
                 scores: Mapping[str, Tensor] | None = None) -> Masks:
    return ranked_masks("fisher", fisher_scores, model, batches, loss_fn, budgets, seed, config,
                        scores)

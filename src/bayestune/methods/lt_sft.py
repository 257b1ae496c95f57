"""lt-sft (LT-SFT, composable-sft): full fine-tuning for a while, keep the global top-k of
|theta - theta0|, then restart from theta0 and train only those scalars.

Here the full phase is ``lt_sft_steps`` AdamW steps at ``lt_sft_lr`` without weight decay:
decoupled decay moves every scalar in proportion to its own size, which would rank by |theta0|
instead of by how far the data pulled each scalar. Stage 2 restarts from theta0 (no start).
The head is treated as composable-sft treats it: not in the maskable set, trained fully in
stage 2, and k = floor(p x the maskable count), ranked globally over the encoder (pooler
included: composable-sft's maskable set is every ``base_model_prefix`` parameter).
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


def lt_sft_scores(model: nn.Module, batches: Batches | None, loss_fn: LossFn, seed: int,
                  config: MethodConfig) -> dict[str, Tensor]:
    """|theta - theta0| after the full fine-tuning phase."""
    work = working_copy(model)
    theta0 = [p.detach().clone() for p in work.parameters()]
    optimizer = torch.optim.AdamW(work.parameters(), lr=config.lt_sft_lr, weight_decay=0.0)
    with seeded(seed, device_of(work)):
        for _ in backward_passes(work, batches, loss_fn, config.lt_sft_steps,
                                 "lt-sft: full fine-tuning"):
            optimizer.step()
    moved = [(p.detach() - p0).abs() for p, p0 in zip(work.parameters(), theta0, strict=True)]
    return named(work, moved)


def lt_sft_masks(model: nn.Module, batches: Batches | None, loss_fn: LossFn,
                 budgets: Sequence[float], seed: int, config: MethodConfig, *,
                 scores: Mapping[str, Tensor] | None = None) -> Masks:
    return ranked_masks("lt-sft", lt_sft_scores, model, batches, loss_fn, budgets, seed, config,
                        scores)

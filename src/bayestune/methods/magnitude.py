"""magnitude (MagPruning): full fine-tuning, then the top p of |theta| within each encoder
tensor, and training goes on from there; the head always trains.

The SAM repo's ``magprun`` mode, step for step: every step trains the whole model (AdamW, weight
decay 0.01 except biases and LayerNorm weights, gradient norm clipped to 1, jiant's linear
warm-up over 10% of 10000 epochs) until its step counter reaches the burn-in (500); on that
step it ranks |theta| (the weights after 499 updates, NOT |theta - theta0|) per tensor and from
then on zeroes the gradient of every unselected encoder scalar. There is no restart: the final
model differs from theta0 in every scalar the full phase moved. Here the mask stage runs those
``magnitude_steps - 1`` updates and hands the weights to stage 2 as its start
(``Masks.start``, a start file that ``finetune --start`` reads); stage 2 then trains the
mask from there. At jiant's warm-up the rate is still a small fraction of its peak after 499
steps, so the ranking is mostly that of |theta0|: that is the published method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from bayestune.masks import masks_from_scores
from bayestune.methods.common import (
    backward_passes,
    device_of,
    seeded,
    steps_per_epoch,
    working_copy,
)
from bayestune.methods.config import Batches, LossFn, Masks, MethodConfig, ranking_options
from bayestune.methods.registry import MethodError
from bayestune.optim import linear_schedule_with_warmup

# jiant's optimiser groups (SAM repo, model_setup.create_optimizer): no decay where the name
# contains one of these.
NO_DECAY = ("bias", "LayerNorm.weight")
WEIGHT_DECAY = 0.01


def decay_groups(model: nn.Module, weight_decay: float = WEIGHT_DECAY) -> list[dict]:
    decay, plain = [], []
    for name, param in model.named_parameters():
        (plain if any(key in name for key in NO_DECAY) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": plain, "weight_decay": 0.0}]


def magnitude_start(model: nn.Module, batches: Batches | None, loss_fn: LossFn, seed: int,
                    config: MethodConfig) -> dict[str, Tensor]:
    """The weights after the full fine-tuning that precedes the mask (CPU copies)."""
    work = working_copy(model)
    optimizer = torch.optim.AdamW(decay_groups(work), lr=config.magnitude_lr, eps=1e-8)
    warmup = 0
    if config.magnitude_warmup_epochs > 0 and batches is not None:
        warmup = max(round(config.magnitude_warmup_epochs * steps_per_epoch(batches)), 1)
    # jiant steps the schedule after each update, from 0: the first update has rate 0.
    schedule = linear_schedule_with_warmup(optimizer, warmup, 10 * warmup) if warmup else None
    with seeded(seed, device_of(work)):
        for _ in backward_passes(work, batches, loss_fn, config.magnitude_steps - 1,
                                 "magnitude: full fine-tuning", grad_clip=config.grad_clip):
            optimizer.step()
            if schedule is not None:
                schedule.step()
    return {n: p.detach().cpu().clone() for n, p in work.named_parameters()}


def magnitude_scores(model: nn.Module, batches: Batches | None, loss_fn: LossFn, seed: int,
                     config: MethodConfig) -> dict[str, Tensor]:
    """|theta| after the full fine-tuning phase."""
    return {n: t.float().abs() for n, t in
            magnitude_start(model, batches, loss_fn, seed, config).items()}


def magnitude_masks(model: nn.Module, batches: Batches | None, loss_fn: LossFn,
                    budgets: Sequence[float], seed: int, config: MethodConfig, *,
                    scores: Mapping[str, Tensor] | None = None) -> Masks:
    if scores is not None:
        raise MethodError("method 'magnitude' trains the model before ranking and stage 2 goes "
                          "on from those weights, so it takes no scores; drop --scores")
    start = magnitude_start(model, batches, loss_fn, seed, config)
    ranked = {n: t.float().abs() for n, t in start.items()}
    masks = masks_from_scores(ranked, budgets, **ranking_options("magnitude", config))
    return Masks(masks, start=start)

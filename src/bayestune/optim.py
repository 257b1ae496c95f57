"""Training mechanics of the authors' code (jiant on transformers 3/4), shared by both stages.

* :class:`TransformersAdamW`: the AdamW that transformers shipped until version 4, which differs
  from ``torch.optim.AdamW`` in where eps and the decoupled decay enter.
* :func:`jiant_schedule`: jiant's learning-rate ramp, linear warm-up over a fraction of
  ``epochs x steps_per_epoch`` steps, then linear decay to 0 at that many steps.
* :func:`no_decay_names`: the parameters jiant exempts from weight decay (biases, LayerNorm).
* :class:`LengthRule`: jiant's early stopping with the authors' minimum number of steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from bayestune.errors import DataError


class TransformersAdamW(torch.optim.Optimizer):
    """AdamW as ``transformers.AdamW`` computed it (removed in transformers 5).

    Per parameter with a gradient, at step t with rate lr::

        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        p <- p - lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
        p <- p - lr wd p                      (decay after the Adam step, on the new p)

    torch's AdamW instead decays first and adds eps after dividing sqrt(v) by sqrt(1 - b2^t),
    so its eps is effectively eps * sqrt(1 - b2^t) here; early in a run, and for scalars whose
    gradients are tiny, the two take visibly different steps. A parameter without a gradient
    is skipped entirely: no decay and no step count.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"bad AdamW settings: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("TransformersAdamW.step takes no closure")
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, step_sizes = [], [], [], [], []
            (beta1, beta2), lr = group["betas"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                step_sizes.append(-lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t))
            if not params:
                continue
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_add_(denom, group["eps"])
            torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)
            if group["weight_decay"] > 0:
                torch._foreach_add_(params, params, alpha=-lr * group["weight_decay"])


def linear_schedule_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int,
                                total_steps: int) -> LambdaLR:
    """transformers' ``get_linear_schedule_with_warmup``: the rate rises linearly from 0 to its
    value over ``warmup_steps``, then falls linearly to 0 at ``total_steps``.

    Written here because importing it from transformers loads its trainer (about 5 s per
    process, paid by every job); tests/test_optim.py checks it against the original.
    """
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return LambdaLR(optimizer, factor)


def schedule_length(epochs: int, steps_per_epoch: int) -> int:
    """jiant's t_total: the step at which the ramp reaches 0."""
    return int(epochs * steps_per_epoch)


def jiant_schedule(optimizer: torch.optim.Optimizer, *, epochs: int, steps_per_epoch: int,
                   warmup_ratio: float) -> LambdaLR:
    """The authors' ramp: rate 0 at step 0, the full rate after int(warmup_ratio t_total) steps,
    then linear decay to 0 at t_total = epochs x steps_per_epoch (jiant's numbers)."""
    if steps_per_epoch < 1:
        raise DataError(f"steps_per_epoch={steps_per_epoch}: the jiant schedule needs the "
                        "number of batches in an epoch (is the training split empty?)")
    total = schedule_length(epochs, steps_per_epoch)
    return linear_schedule_with_warmup(optimizer, int(total * warmup_ratio), total)


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameters that get no weight decay in the authors' code: every name containing "bias"
    and the weights of LayerNorm (by name, as jiant matches it, or by module type, for models
    such as timm's ViT whose norms are not called LayerNorm)."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if "bias" in name or "LayerNorm" in name or isinstance(module, nn.LayerNorm):
                names.add(name)
    return names


def better(score: float, best: float | None) -> bool:
    """Higher is better; NaN (e.g. a correlation of constant predictions) never wins."""
    if best is None:
        return True
    if math.isnan(score):
        return False
    return math.isnan(best) or score > best


@dataclass
class LengthRule:
    """jiant's early stopping as the authors' metarunner runs it.

    After ``steps`` optimiser steps, an evaluation is due when ``steps + 1`` is a multiple of
    ``eval_every`` (jiant's test). Every evaluation that does not beat the best so far counts
    one more towards ``patience``; a better one resets the count. The run stops after the first
    step past ``min_steps`` at which the count has reached ``patience``.
    """

    min_steps: int
    patience: int
    eval_every: int
    best: float | None = None
    best_step: int = 0
    since_best: int = 0

    def due(self, steps: int) -> bool:
        return (steps + 1) % self.eval_every == 0

    def record(self, score: float, steps: int) -> bool:
        """Count one evaluation towards patience; True when it is the best so far."""
        if better(score, self.best):
            self.best, self.best_step, self.since_best = score, steps, 0
            return True
        self.since_best += 1
        return False

    def should_stop(self, steps: int) -> bool:
        return self.since_best >= self.patience and steps > self.min_steps

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

"""Is a stage-1 result usable at all? Catch chains that ran to the end but degenerated.

A posterior-mean lambda is a Laplace scale of theta - theta0: how far the prior lets a scalar
move from its pretrained value. Fine-tuning moves a scalar by a small part of the weights' own
size, so no sensible chain puts a scale far above the largest pretrained weight magnitude. Even
the paper's noise-dominated chain stays well under it: Adam turns the noise into steps of
about lr_lambda, a random walk of lr_lambda * sqrt(steps) ~ 1 over its 10k SGLD steps, and a
few times that at the extreme of 125M scalars. A bound of :data:`PLAUSIBLE_FACTOR` times the
largest weight (at least 1) leaves that an order of magnitude of room, and is still far below
what a runaway step size gives (lr_lambda 1e6: scales near 1e6).

The other degenerate end: every scale equal (all at the floor, or none moved), so that the
top-k "ranking" would pick scalars by their position in the model, not by anything learned.

Only degeneracy is checked here; whether the ranking follows the data or the noise is a
question for diagnostics, not a reason to fail the job.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from bayestune.errors import RunFailedError

PLAUSIBLE_FACTOR = 100.0


class DegenerateScalesError(RunFailedError):
    """Stage 1 finished, but its scales cannot rank the scalars (see :func:`scale_problems`)."""


def weight_scale(model: torch.nn.Module) -> float:
    """The largest |theta0| over the model's parameters (call it before sampling moves them)."""
    return max((float(p.detach().abs().max()) for p in model.parameters() if p.numel()),
               default=0.0)


def scale_problems(scales: Mapping[str, torch.Tensor], *, floor: float, largest_weight: float,
                   lr_lambda: float) -> list[str]:
    """What is degenerate about these posterior-mean scales, each with its likely fix; empty
    when they are usable."""
    filled = {name: t.detach().float() for name, t in scales.items() if t.numel()}
    if not filled:
        return ["the scale file would hold no scalar; the model has no trainable parameter"]
    bad = sorted(name for name, t in filled.items() if not torch.isfinite(t).all())
    if bad:
        return [f"{len(bad)} tensors hold NaN or infinite scales (first: {bad[0]}); lower "
                f"lr_lambda ({lr_lambda:g}) or lr_theta"]
    top_name, top = max(((name, float(t.max())) for name, t in filled.items()),
                        key=lambda item: item[1])
    bottom = min(float(t.min()) for t in filled.values())
    bound = PLAUSIBLE_FACTOR * max(largest_weight, 1.0)
    if top > bound:
        return [f"scales reach {top:.3g} (in {top_name}), more than {PLAUSIBLE_FACTOR:g} times "
                f"the largest pretrained weight magnitude ({largest_weight:.3g}), so they measure "
                f"no fine-tuning: lambda's step size lr_lambda={lr_lambda:g} is most likely far "
                "too large (the paper uses 1e-2); lower it"]
    if top <= floor * (1 + 1e-6):
        return [f"every scale sits at the floor lambda_floor={floor:g}, so a mask would pick "
                "scalars by their position in the model: lambda was driven down everywhere; "
                f"lower lr_lambda ({lr_lambda:g}), or let warm-up move theta (warmup_steps, "
                "lr_theta)"]
    if top == bottom:
        return [f"every scale equals {top:g}, so a mask would pick scalars by their position "
                "in the model: lambda never moved apart; check lr_lambda and that the "
                "sampling phase (steps after burnin_steps) was reached"]
    return []


def check_scale_file(scales: Mapping[str, torch.Tensor], meta: Mapping[str, object],
                     path: object, largest_weight: float) -> list[str]:
    """The checks of :func:`scale_problems` on a scale file being read (by `mask`): a file that
    fails them and does not record them as accepted (``sample --allow-degenerate-scales``) is
    refused, since its ranking would be noise or position. Returns the accepted problems."""
    floor = meta.get("lambda_floor")
    rate = meta.get("lr_lambda")
    problems = scale_problems(scales, floor=float(floor) if floor is not None else 0.0,
                              largest_weight=largest_weight,
                              lr_lambda=float(rate) if rate is not None else float("nan"))
    if problems and not meta.get("accepted_problems"):
        raise DegenerateScalesError(
            f"{path}: this scale file cannot rank scalars: {'; '.join(problems)}. Rerun stage 1 "
            "for it (or, to use it anyway, write it with `sample --allow-degenerate-scales`)")
    return problems

"""random: each encoder scalar trains with probability p; the head always trains.

The SAM repo's ``randmask`` mode: per encoder tensor, ``torch.rand_like(param) > p`` marks the
scalars whose gradient is zeroed, so each one is kept with probability p, independently; the
head (not under ``encoder``) is never masked. The count is therefore binomial around p times
the encoder's size, not exactly floor(p * D).

One uniform draw per scalar serves every budget (kept where u < p), so a smaller budget's mask
lies inside a larger one's, as the top-k methods' masks do. Ranking globally or per tensor is
the same thing here (every scalar is drawn on its own); the head options do change the mask:
without ``keep_head`` the head is drawn like the rest, and with a kept head that counts toward
the budget the rest is drawn with the probability that leaves p * D scalars in expectation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from bayestune.masks import check_budget
from bayestune.methods.common import check_no_scores
from bayestune.methods.config import Batches, LossFn, Masks, MethodConfig, ranking_options
from bayestune.methods.registry import MethodError
from bayestune.models.base import is_head


def uniform_draws(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """One uniform number per scalar, drawn tensor by tensor from the seed."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}


def random_scores(model: nn.Module, batches: Batches | None, loss_fn: LossFn, seed: int,
                  config: MethodConfig) -> dict[str, Tensor]:
    """1 - u: the scalars a random mask keeps first score highest (for comparing rankings)."""
    return {n: 1.0 - u for n, u in uniform_draws(model, seed).items()}


def keep_probability(budget: float, n_total: int, n_head: int, keep_head: bool,
                     head_counts_toward_budget: bool) -> float:
    """The probability each drawn scalar is kept with, so the budget holds in expectation."""
    if not (keep_head and head_counts_toward_budget):
        return budget
    drawn = n_total - n_head
    return max(budget * n_total - n_head, 0.0) / drawn if drawn else 0.0


def random_masks(model: nn.Module, batches: Batches | None, loss_fn: LossFn,
                 budgets: Sequence[float], seed: int, config: MethodConfig, *,
                 scores: Mapping[str, Tensor] | None = None) -> Masks:
    check_no_scores("random", scores)
    if not budgets:
        raise MethodError("no budgets given; pass at least one fraction in (0, 1]")
    options = ranking_options("random", config)
    keep_head = options["keep_head"]
    draws = uniform_draws(model, seed)
    n_total = sum(u.numel() for u in draws.values())
    n_head = sum(u.numel() for n, u in draws.items() if is_head(n))
    masks = {}
    for budget in budgets:
        p = keep_probability(check_budget(budget), n_total, n_head, keep_head,
                             options["head_counts_toward_budget"])
        masks[budget] = {n: torch.ones_like(u, dtype=torch.bool) if keep_head and is_head(n)
                         else u < p for n, u in draws.items()}
    return Masks(masks)

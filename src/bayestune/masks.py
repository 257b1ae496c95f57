"""Boolean masks (True = trainable) from per-scalar scores, for several budgets at once.

All budgets are cut from ONE ranking, so a smaller budget's mask is a subset of a larger one's
(the tables compare budgets, and nestedness makes that comparison about the budget alone).
Ranking order is (-score, flat index), where the flat index runs over the tensors in sorted
name order: the same scores give the same masks whether they came from a model (module order)
or from a safetensors file (file order). The selection uses ``kthvalue`` on one flat vector and
sorts only the selected candidates, so RoBERTa-base's 125M scalars take seconds, not minutes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

import torch

from bayestune.errors import ConfigError, DataError
from bayestune.models.base import is_head

Mask = dict[str, torch.Tensor]


def check_budget(p: float) -> float:
    """Return ``p`` as a float if it is a valid budget (fraction of scalars), else raise."""
    try:
        value = float(p)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"budget {p!r} is not a number; give a fraction in (0, 1], "
                          "e.g. 0.005 for 0.5%") from err
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ConfigError(f"budget {p!r} is outside the valid range (0, 1]; give a fraction "
                          "of all scalars, e.g. 0.005 for 0.5%")
    return value


def budget_count(p: float, n: int) -> int:
    """floor(p * n), computed on the budget's decimal form.

    In binary floating point 0.29 * 100 == 28.999..., which would silently drop one scalar;
    budgets come from decimal strings (config, CLI), so their shortest repr is what was meant.
    """
    return math.floor(Fraction(repr(check_budget(p))) * n)


def mask_fraction(mask: Mapping[str, torch.Tensor]) -> float:
    """Fraction of all scalars the mask makes trainable."""
    total = sum(m.numel() for m in mask.values())
    if total == 0:
        return 0.0
    return sum(int(m.count_nonzero()) for m in mask.values()) / total


def _ranking_prefix(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k best scalars, best first, ties broken by the lower index."""
    n = flat.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=flat.device)
    if k >= n:
        candidates = torch.arange(n, device=flat.device)
    else:
        # The k-th largest value is the (n - k + 1)-th smallest. Strictly greater values are all
        # in; of the values equal to it, the lowest indices fill the remaining places.
        threshold = torch.kthvalue(flat, n - k + 1).values
        above = torch.nonzero(flat > threshold).squeeze(1)
        equal = torch.nonzero(flat == threshold).squeeze(1)[: k - above.numel()]
        candidates = torch.sort(torch.cat([above, equal])).values
    # candidates are in ascending index order; a stable sort keeps that order among ties
    order = torch.sort(flat[candidates], descending=True, stable=True).indices
    return candidates[order]


def _flat_scores(scores: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    dtype = torch.float32
    for name in names:
        dtype = torch.promote_types(dtype, scores[name].dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64
    if not names:
        return torch.empty(0, dtype=dtype)
    flat = torch.cat([scores[n].detach().reshape(-1).to(dtype) for n in names])
    if torch.isnan(flat).any():
        bad = next(n for n in names if torch.isnan(scores[n]).any())
        raise DataError(f"scores contain NaN (first tensor: {bad}); the score file is broken, "
                        "regenerate it")
    return flat


def _unflatten(chosen: torch.Tensor, scores: Mapping[str, torch.Tensor],
               names: Sequence[str]) -> Mask:
    total = sum(scores[n].numel() for n in names)
    flat = torch.zeros(total, dtype=torch.bool, device=chosen.device)
    flat[chosen] = True
    out, offset = {}, 0
    for name in names:
        n = scores[name].numel()
        out[name] = flat[offset:offset + n].reshape(scores[name].shape).cpu()
        offset += n
    return out


def _global_masks(scores: Mapping[str, torch.Tensor], budgets: Sequence[float], keep_head: bool,
                  head_counts_toward_budget: bool) -> dict[float, Mask]:
    names = sorted(scores)
    total = sum(scores[n].numel() for n in names)
    ranked = [n for n in names if not (keep_head and is_head(n))]
    heads = [n for n in names if keep_head and is_head(n)]
    n_head = sum(scores[n].numel() for n in heads)
    # With the head kept, it either spends part of k = floor(p D) or stands outside the budget,
    # which is then p of the ranked scalars (composable-sft's k: p x the maskable count).
    if head_counts_toward_budget:
        ranked_k = {p: max(budget_count(p, total) - n_head, 0) for p in budgets}
    else:
        ranked_k = {p: budget_count(p, total - n_head) for p in budgets}
    order = _ranking_prefix(_flat_scores(scores, ranked), max(ranked_k.values(), default=0))
    masks = {}
    for p in budgets:
        mask = _unflatten(order[: ranked_k[p]], scores, ranked) if ranked else {}
        mask.update({n: torch.ones(scores[n].shape, dtype=torch.bool) for n in heads})
        masks[p] = {n: mask[n] for n in names}
    return masks


def _per_tensor_masks(scores: Mapping[str, torch.Tensor], budgets: Sequence[float],
                      keep_head: bool) -> dict[float, Mask]:
    masks: dict[float, Mask] = {p: {} for p in budgets}
    for name in sorted(scores):
        shape = scores[name].shape
        if keep_head and is_head(name):
            for p in budgets:
                masks[p][name] = torch.ones(shape, dtype=torch.bool)
            continue
        n = scores[name].numel()
        ks = {p: budget_count(p, n) for p in budgets}
        order = _ranking_prefix(_flat_scores(scores, [name]), max(ks.values()))
        for p in budgets:
            masks[p][name] = _unflatten(order[: ks[p]], scores, [name])[name]
    return masks


def masks_from_scores(
    scores: Mapping[str, torch.Tensor],
    budgets: Sequence[float],
    *,
    per_tensor: bool = False,
    keep_head: bool = False,
    head_counts_toward_budget: bool = True,
) -> dict[float, dict[str, torch.Tensor]]:
    """Nested top-k masks, one per budget, keyed by the budget as given.

    Global (default): the k = floor(p * D) highest-scoring scalars over all D scalars.
    ``per_tensor``: the top floor(p * n_t) of each tensor (n_t its size).
    ``keep_head``: every ``head.*`` scalar is trainable and not ranked. In global mode with
    ``head_counts_toward_budget`` the head uses up part of k (k - n_head ranked scalars join it,
    so the total stays k unless the head alone is larger); without it, the head is outside the
    budget: floor(p * (D - n_head)) ranked scalars come on top of it (LT-SFT's k, p times the
    maskable count; the SAM repo's random mask keeps p of the encoder in expectation). In
    per-tensor mode every tensor has its own quota, so the head never takes another tensor's
    places and ``head_counts_toward_budget`` has no effect.
    """
    budgets = [check_budget(p) for p in budgets]
    if not budgets:
        raise ConfigError("no budgets given; pass at least one fraction in (0, 1]")
    if not scores:
        raise DataError("no score tensors given; the score file is empty")
    if per_tensor:
        return _per_tensor_masks(scores, budgets, keep_head)
    return _global_masks(scores, budgets, keep_head, head_counts_toward_budget)


def check_selects_some(mask: Mapping[str, torch.Tensor], budget: float, *,
                       per_tensor: bool = False) -> None:
    """Raise if the budget's mask selects no scalar: fine-tuning would have nothing to train."""
    if any(bool(m.any()) for m in mask.values()):
        return
    sizes = [m.numel() for m in mask.values()]
    n = max(sizes, default=0) if per_tensor else sum(sizes)
    where = f"in any tensor (largest: {n} scalars)" if per_tensor else f"of the model's {n}"
    least = f"at least {1 / n:.3g}, " if n else ""
    raise ConfigError(f"budget {budget:g} selects no scalar {where}: floor(budget x {n}) = 0; "
                      f"raise it to {least}or keep the head trainable (--keep-head)")


def mask_file_name(budget: float) -> str:
    """The file of one budget's mask in a method's mask folder: 0.005 -> p0.005.safetensors."""
    return f"p{format(budget, 'g')}.safetensors"


# Beside the masks of a method that trains before it ranks (magnitude): the weights stage 2
# starts from (a model-state file), the same for every budget.
START_FILE_NAME = "start.safetensors"


def mask_metadata(
    mask: Mapping[str, torch.Tensor],
    budget: float,
    *,
    method: str,
    per_tensor: bool = False,
    keep_head: bool = False,
    head_counts_toward_budget: bool = True,
    **extra: object,
) -> dict:
    """The run information stored with a mask file (``files.save_mask(path, mask, meta)``)."""
    n_total = sum(m.numel() for m in mask.values())
    n_head = sum(m.numel() for n, m in mask.items() if keep_head and is_head(n))
    if per_tensor:
        k = sum(budget_count(budget, m.numel()) for n, m in mask.items()
                if not (keep_head and is_head(n)))
    elif keep_head and not head_counts_toward_budget:
        k = budget_count(budget, n_total - n_head)  # the ranked scalars; the head comes on top
    else:
        k = budget_count(budget, n_total)
    n_selected = sum(int(m.count_nonzero()) for m in mask.values())
    return {
        "method": method,
        "budget": float(budget),
        "k": k,
        "n_total": n_total,
        "n_selected": n_selected,
        "fraction": n_selected / n_total if n_total else 0.0,
        "per_tensor": bool(per_tensor),
        "keep_head": bool(keep_head),
        "head_counts_toward_budget": bool(head_counts_toward_budget) and not per_tensor,
        **extra,
    }

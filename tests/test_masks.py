"""Top-k masks from scores: counts, nesting, ties, head handling, budget checks."""

from __future__ import annotations

import math

import pytest
import torch

from bayestune.masks import (
    budget_count,
    check_budget,
    mask_fraction,
    mask_metadata,
    masks_from_scores,
)

BUDGETS = [0.01, 0.05, 0.2, 0.5]


def _scores(seed: int = 0, ties: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"encoder.a.weight": (20, 30), "encoder.a.bias": (30,), "encoder.b.weight": (17, 9),
              "head.out.weight": (3, 30), "head.out.bias": (3,)}
    out = {}
    for name, shape in shapes.items():
        t = torch.rand(shape, generator=gen)
        out[name] = torch.round(t * 4) / 4 if ties else t  # only 5 distinct values with ties
    return out


def _count(mask: dict[str, torch.Tensor]) -> int:
    return sum(int(m.sum()) for m in mask.values())


def _flat_reference(scores: dict[str, torch.Tensor], k: int) -> set[int]:
    """Brute force: full stable sort on (-score, index) over sorted names."""
    flat = torch.cat([scores[n].reshape(-1) for n in sorted(scores)])
    order = torch.sort(flat, descending=True, stable=True).indices
    return set(order[:k].tolist())


def _flat_selected(mask: dict[str, torch.Tensor]) -> set[int]:
    flat = torch.cat([mask[n].reshape(-1) for n in sorted(mask)])
    return set(torch.nonzero(flat).squeeze(1).tolist())


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_masks_are_nested_across_budgets(per_tensor: bool, ties: bool) -> None:
    masks = masks_from_scores(_scores(ties=ties), BUDGETS, per_tensor=per_tensor)
    assert list(masks) == BUDGETS
    for small, large in zip(BUDGETS, BUDGETS[1:], strict=False):
        for name, m in masks[small].items():
            assert not (m & ~masks[large][name]).any(), f"{small} not inside {large} at {name}"
        assert _count(masks[small]) < _count(masks[large])


def test_global_count_and_selection_match_full_sort() -> None:
    scores = _scores(ties=True)
    total = sum(t.numel() for t in scores.values())
    masks = masks_from_scores(scores, BUDGETS)
    for p in BUDGETS:
        k = math.floor(p * total)
        assert _count(masks[p]) == k
        assert _flat_selected(masks[p]) == _flat_reference(scores, k)
        assert all(masks[p][n].dtype == torch.bool and masks[p][n].shape == scores[n].shape
                   for n in scores)


def test_per_tensor_counts_each_tensor() -> None:
    scores = _scores()
    masks = masks_from_scores(scores, BUDGETS, per_tensor=True)
    for p in BUDGETS:
        for name, t in scores.items():
            assert int(masks[p][name].sum()) == math.floor(p * t.numel())
            # the chosen ones are that tensor's best
            chosen, rest = t[masks[p][name]], t[~masks[p][name]]
            if chosen.numel() and rest.numel():
                assert chosen.min() >= rest.max()


def test_global_and_per_tensor_differ_when_scales_differ() -> None:
    scores = _scores()
    scores["encoder.b.weight"] = scores["encoder.b.weight"] + 10.0  # one tensor dominates
    glob = masks_from_scores(scores, [0.1])[0.1]
    per = masks_from_scores(scores, [0.1], per_tensor=True)[0.1]
    k = math.floor(0.1 * sum(t.numel() for t in scores.values()))
    assert int(glob["encoder.b.weight"].sum()) == min(k, 17 * 9)
    assert int(per["encoder.b.weight"].sum()) == math.floor(0.1 * 17 * 9)


def test_ties_are_broken_by_index_whatever_the_dict_order() -> None:
    flat = {"encoder.x": torch.ones(10), "encoder.y": torch.ones(10)}
    mask = masks_from_scores(flat, [0.25])[0.25]
    # sorted names: encoder.x comes first, its first 5 scalars win
    assert mask["encoder.x"].tolist() == [True] * 5 + [False] * 5
    assert not mask["encoder.y"].any()
    scores = _scores(ties=True)
    reversed_order = dict(reversed(list(scores.items())))
    a, b = masks_from_scores(scores, BUDGETS), masks_from_scores(reversed_order, BUDGETS)
    for p in BUDGETS:
        assert all(torch.equal(a[p][n], b[p][n]) for n in scores)


def test_keep_head_counts_toward_budget() -> None:
    scores = _scores()
    scores["head.out.weight"] = torch.full((3, 30), -1.0)  # would never be chosen by rank
    total = sum(t.numel() for t in scores.values())
    n_head = 3 * 30 + 3
    masks = masks_from_scores(scores, [0.2, 0.5], keep_head=True)
    for p, mask in masks.items():
        assert mask["head.out.weight"].all() and mask["head.out.bias"].all()
        assert _count(mask) == math.floor(p * total)
        encoder = {n: m for n, m in mask.items() if n.startswith("encoder.")}
        assert _count(encoder) == math.floor(p * total) - n_head


def test_keep_head_on_top_of_budget() -> None:
    """composable-sft's rule: the head is not maskable and trains fully, and k is p times the
    maskable (ranked) count, not p times every scalar."""
    scores = _scores()
    n_head = 3 * 30 + 3
    maskable = sum(t.numel() for t in scores.values()) - n_head
    masks = masks_from_scores(scores, [0.01, 0.2], keep_head=True, head_counts_toward_budget=False)
    for p, mask in masks.items():
        assert mask["head.out.weight"].all()
        assert _count(mask) == math.floor(p * maskable) + n_head
    meta = mask_metadata(masks[0.2], 0.2, method="test", keep_head=True,
                         head_counts_toward_budget=False)
    assert meta["k"] == math.floor(0.2 * maskable)
    assert meta["n_selected"] == _count(masks[0.2])
    assert meta["keep_head"] and not meta["head_counts_toward_budget"]


def test_keep_head_larger_than_budget_keeps_only_head() -> None:
    mask = masks_from_scores(_scores(), [0.01], keep_head=True)[0.01]
    assert _count(mask) == 3 * 30 + 3
    assert mask["head.out.bias"].all() and not mask["encoder.a.weight"].any()


def test_per_tensor_keep_head() -> None:
    scores = _scores()
    mask = masks_from_scores(scores, [0.1], per_tensor=True, keep_head=True)[0.1]
    assert mask["head.out.weight"].all()
    assert int(mask["encoder.a.weight"].sum()) == 60
    meta = mask_metadata(mask, 0.1, method="sam", per_tensor=True, keep_head=True)
    assert meta["k"] == 60 + 3 + 15 and meta["n_selected"] == 60 + 3 + 15 + 93
    assert meta["head_counts_toward_budget"] is False


@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.1, float("nan"), float("inf"), "x"])
def test_bad_budgets_are_rejected(bad) -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_budget(bad)
    with pytest.raises(ValueError, match=r"budget"):
        masks_from_scores(_scores(), [0.1, bad])


def test_budget_one_selects_everything() -> None:
    scores = _scores()
    mask = masks_from_scores(scores, [1.0])[1.0]
    assert all(m.all() for m in mask.values())
    assert mask_fraction(mask) == 1.0


def test_budget_count_uses_decimal_budget() -> None:
    assert 0.29 * 100 < 29  # the float pitfall the helper avoids
    assert budget_count(0.29, 100) == 29
    assert budget_count(0.005, 1999) == 9


def test_nan_scores_rejected() -> None:
    scores = _scores()
    scores["encoder.a.bias"][3] = float("nan")
    with pytest.raises(ValueError, match="encoder.a.bias"):
        masks_from_scores(scores, [0.1])


def test_integer_and_mixed_dtype_scores() -> None:
    scores = {"encoder.a": torch.arange(10), "encoder.b": torch.arange(10, dtype=torch.float64)}
    mask = masks_from_scores(scores, [0.1])[0.1]
    assert mask["encoder.a"][9] and mask["encoder.b"][9] and _count(mask) == 2


def test_mask_fraction() -> None:
    mask = {"a": torch.tensor([True, False, False, False]), "b": torch.zeros(4, dtype=torch.bool)}
    assert mask_fraction(mask) == 1 / 8

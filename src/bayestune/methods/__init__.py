"""Every way of choosing which scalars to fine-tune, behind one signature; LoRA through peft.

A mask method is ``method(model, batches, loss_fn, budgets, seed, config, *, scores=None) ->
{budget: mask}`` (a :class:`Masks`, which also carries the start weights of a method that
trains before it ranks) with ``batches(epoch)`` yielding training batches
(``TaskData.train_epoch``), ``loss_fn`` the task loss and ``mask`` a bool tensor per parameter
(True = trainable). Top-k ranking (nested masks, ties, budget checks) lives in
:func:`bayestune.masks.masks_from_scores`, so every ranked method cuts the same way.

One module per method family: ``random_mask`` (random), ``magnitude`` (MagPruning), ``lt_sft``,
``gradient`` (fisher, sam), ``fixed`` (full, bitfit), ``scales`` (bayestune), ``lora``. The
names, kinds and defaults of all of them are in ``registry``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn

from bayestune.methods.config import (
    Batches,
    LossFn,
    Mask,
    MaskMethod,
    Masks,
    MethodConfig,
    method_settings,
    ranking_options,
)
from bayestune.methods.fixed import bitfit_masks, full_masks
from bayestune.methods.gradient import fisher_masks, fisher_scores, sam_masks, sam_scores
from bayestune.methods.lora import (
    LORA_PRESETS,
    LoraSettings,
    lora_trainable_fraction,
    merge_lora,
    wrap_lora,
)
from bayestune.methods.lt_sft import lt_sft_masks, lt_sft_scores
from bayestune.methods.magnitude import magnitude_masks, magnitude_scores
from bayestune.methods.overlap import mask_overlap
from bayestune.methods.random_mask import random_masks, random_scores
from bayestune.methods.registry import (
    REGISTRY,
    UNMASKED,
    MethodError,
    MethodSpec,
    get_spec,
    method_names,
    published_differences,
    published_label,
)
from bayestune.methods.scales import bayestune_masks

__all__ = [
    "LORA_PRESETS", "METHODS", "REGISTRY", "SCORERS", "Batches", "LoraSettings", "LossFn", "Mask",
    "MaskMethod", "Masks", "MethodConfig", "MethodError", "MethodSpec", "get_spec",
    "lora_trainable_fraction", "mask_overlap", "merge_lora", "method_names", "method_scores",
    "method_settings", "published_differences", "published_label", "ranking_options",
    "select_masks", "wrap_lora",
]

_FUNCTIONS: dict[str, MaskMethod] = {
    "full": full_masks,
    "bitfit": bitfit_masks,
    "random": random_masks,
    "magnitude": magnitude_masks,
    "lt-sft": lt_sft_masks,
    "fisher": fisher_masks,
    "sam": sam_masks,
    "bayestune": bayestune_masks,
}
# Every registered method except the adapters has a mask function (full's is all ones), in
# the registry's order.
METHODS: dict[str, MaskMethod] = {name: _FUNCTIONS[name] for name in REGISTRY
                                  if name in _FUNCTIONS}
assert set(METHODS) == set(_FUNCTIONS) == {n for n in REGISTRY if n != "lora"}, \
    "the registry and the mask functions must name the same methods"

ScoreFn = Callable[[nn.Module, Batches | None, LossFn, int, MethodConfig], dict[str, Tensor]]
# The per-scalar score each ranked method computes (higher = trained first).
SCORERS: dict[str, ScoreFn] = {
    "random": random_scores,
    "magnitude": magnitude_scores,
    "lt-sft": lt_sft_scores,
    "fisher": fisher_scores,
    "sam": sam_scores,
}


def method_scores(name: str, model: nn.Module, batches: Batches | None, loss_fn: LossFn,
                  seed: int, config: MethodConfig) -> dict[str, Tensor]:
    """The per-scalar score a method ranks (for figures and diagnostics comparing rankings)."""
    if name not in SCORERS:
        raise MethodError(f"method {name!r} has no computed score; score-based methods: "
                          f"{', '.join(SCORERS)} (bayestune reads its scale file)")
    return SCORERS[name](model, batches, loss_fn, seed, config)


def select_masks(name: str, model: nn.Module, batches: Batches | None, loss_fn: LossFn,
                 budgets: Sequence[float], seed: int, config: MethodConfig | None = None,
                 scores: Mapping[str, Tensor] | None = None) -> Masks:
    """Run mask method ``name``; ``scores`` are bayestune's scales (or precomputed scores)."""
    if name not in METHODS:
        spec = REGISTRY.get(name)
        hint = " (an adapter, not a mask: use wrap_lora)" if spec and spec.kind == UNMASKED else ""
        raise MethodError(f"unknown mask method {name!r}{hint}; mask methods: "
                          f"{', '.join(METHODS)}")
    return METHODS[name](model, batches, loss_fn, budgets, seed, config or MethodConfig(),
                         scores=scores)


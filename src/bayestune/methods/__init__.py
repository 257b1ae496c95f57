"""Every way of choosing which scalars to fine-tune, behind one signature; LoRA through peft.

A mask method is ``method(model, batches, loss_fn, budgets, seed, config, *, scores=None) ->
{budget: mask}`` (a :class:`Masks`, which also carries the start weights of a method that
trains before it ranks) with ``batches(epoch)`` yielding training batches
(``TaskData.train_epoch``), ``loss_fn`` the task loss and ``mask`` a bool tensor per parameter
(True = trainable). Top-k ranking (nested masks, ties, budget checks) lives in
:func:`bayestune.masks.masks_from_scores`, so every ranked method cuts the same way.

One module per method family (:data:`METHOD_MODULES`): ``random_mask`` (random), ``magnitude``
(MagPruning), ``lt_sft``, ``fisher``, ``sam``, ``fixed`` (full, bitfit), ``scales`` (bayestune),
``lora``; what they share in ``common``, their settings in ``config``. The names, kinds and
defaults of all of them are in ``registry``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from torch import Tensor, nn

    from bayestune.methods.config import Batches, LossFn, MaskMethod, Masks, MethodConfig

__all__ = [
    "ADAPTERS", "LORA_PRESETS", "METHODS", "METHOD_MODULES", "REGISTRY", "SCORED", "SCORERS",
    "Batches", "LoraSettings", "LossFn", "Mask",
    "MaskMethod", "Masks", "MethodConfig", "MethodError", "MethodSpec", "get_spec",
    "lora_trainable_fraction", "mask_overlap", "merge_lora", "method_names", "method_scores",
    "method_settings", "published_differences", "published_label", "ranking_options",
    "select_masks", "wrap_lora",
]

# The module each method runs in. A job loads only its method's module (its mask function,
# or LoRA's adapter), not all of them: importing every method costs seconds per process, and
# bayestune.provenance reads this table (a literal, by its name) so that a job's rerun key
# covers the code of its own method and of no other.
METHOD_MODULES = {
    "full": "fixed", "lora": "lora", "bitfit": "fixed", "random": "random_mask",
    "magnitude": "magnitude", "lt-sft": "lt_sft", "fisher": "fisher", "sam": "sam",
    "bayestune": "scales",
}
ADAPTERS = ("lora",)  # wrap the model in stage 2 instead of masking it: no mask function
SCORED = ("random", "magnitude", "lt-sft", "fisher", "sam")  # rank a score they compute
assert list(METHOD_MODULES) == list(REGISTRY), "the registry and the module table must agree"

# Names exported from the method modules, imported on first use (see above).
_EXPORTS = {
    **dict.fromkeys(("Batches", "LORA_PRESETS", "LoraSettings", "LossFn", "Mask", "MaskMethod",
                     "Masks", "MethodConfig", "method_settings", "ranking_options"), "config"),
    **dict.fromkeys(("lora_trainable_fraction", "merge_lora", "wrap_lora"), "lora"),
    "mask_overlap": "overlap",
}


def _function(name: str, suffix: str) -> tuple[str, str]:
    """(module, function) of a method's function: ``lt-sft`` -> lt_sft.lt_sft_masks."""
    return METHOD_MODULES[name], name.replace("-", "_") + suffix


# Every registered method except the adapters has a mask function (full's is all ones), and
# the ranked ones the per-scalar score they compute (higher = trained first).
_MASK_FUNCTIONS = {name: _function(name, "_masks") for name in METHOD_MODULES
                   if name not in ADAPTERS}
_SCORE_FUNCTIONS = {name: _function(name, "_scores") for name in SCORED}


def _load(module: str, name: str) -> Any:
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


class _LazyFunctions(Mapping):
    """Method name -> function, in the registry's order; a function's module is imported
    when the function is first looked up, not when the names are listed."""

    def __init__(self, where: Mapping[str, tuple[str, str]]) -> None:
        self._where = {name: where[name] for name in REGISTRY if name in where}

    def __getitem__(self, name: str) -> Callable:
        return _load(*self._where[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


METHODS: Mapping[str, MaskMethod] = _LazyFunctions(_MASK_FUNCTIONS)
SCORERS: Mapping[str, Callable] = _LazyFunctions(_SCORE_FUNCTIONS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return _load(_EXPORTS[name], name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    if config is None:
        config = _load("config", "MethodConfig")()
    return METHODS[name](model, batches, loss_fn, budgets, seed, config, scores=scores)

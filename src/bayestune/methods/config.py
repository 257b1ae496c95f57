"""The settings of every mask method (one dataclass: its fields are config keys and CLI flags),
the mask-method signature, how a method's ranking default meets the config's overrides, and
LoRA's settings with its named presets (:mod:`bayestune.methods.lora` runs them)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Protocol

from torch import Tensor, nn

from bayestune.errors import ConfigError
from bayestune.methods.registry import BUDGETED, MethodError, Ranking, get_spec

Batches = Callable[[int], Iterable[dict]]
LossFn = Callable[[nn.Module, dict], Tensor]
Mask = dict[str, Tensor]


class Masks(dict):
    """Masks by budget (True = trainable), plus ``start``: the weights stage 2 starts from when
    the method trained the model before ranking and goes on from there (magnitude), else None
    (stage 2 starts from theta0)."""

    def __init__(self, masks: Mapping[float, Mask], start: dict[str, Tensor] | None = None):
        super().__init__(masks)
        self.start = start


@dataclass
class MethodConfig:
    magnitude_steps: int = field(default=500, metadata={
        "help": "magnitude (MagPruning): the step at which the SAM repo makes the mask; the "
                "full fine-tuning before it is this many steps minus one"})
    magnitude_lr: float = field(default=1e-4, metadata={
        "help": "magnitude: peak AdamW learning rate of that full fine-tuning (the SAM repo's "
                "--learning_rate)"})
    magnitude_warmup_epochs: float = field(default=1000.0, metadata={
        "help": "magnitude: the rate rises linearly over this many epochs, as jiant's schedule "
                "does (10%% of 10000 epochs), so it is still small at the mask; 0 = constant"})
    lt_sft_steps: int = field(default=200, metadata={
        "help": "lt-sft: full fine-tuning steps before ranking |theta - theta0| (our default; "
                "LT-SFT trains its full phase for longer)"})
    lt_sft_lr: float = field(default=2e-5, metadata={
        "help": "lt-sft: AdamW learning rate of that full fine-tuning"})
    fisher_examples: int = field(default=1024, metadata={
        "help": "fisher (FISH mask): training examples whose squared gradients are summed "
                "(FISH: 1024; at most one epoch)"})
    sam_steps: int = field(default=500, metadata={
        "help": "sam: the SAM repo's burn-in: the gradients of the first sam_steps - 1 "
                "training batches are summed at theta0, and the step that reaches it ranks"})
    grad_clip: float = field(default=1.0, metadata={
        "help": "magnitude and sam: clip each batch gradient to this global norm, as the SAM "
                "repo's training step does (0 disables)"})
    per_tensor: bool | None = field(default=None, metadata={
        "type": bool, "help": "rank within each tensor instead of globally (unset: the "
                              "method's own default)"})
    keep_head: bool | None = field(default=None, metadata={
        "type": bool, "help": "always train the task head (unset: the method's own default)"})
    head_counts_toward_budget: bool | None = field(default=None, metadata={
        "type": bool, "help": "a kept head spends part of the budget in a global ranking; "
                              "false: it stands outside, k = p x the ranked scalars (unset: "
                              "the method's own default)"})

    def __post_init__(self) -> None:
        low = [f"{n}={getattr(self, n)}" for n in ("magnitude_steps", "sam_steps")
               if getattr(self, n) < 2]
        if low:
            raise ConfigError(f"{', '.join(low)}: these count the ranking step too; give at "
                              "least 2")
        low = [f"{n}={getattr(self, n)}" for n in ("lt_sft_steps", "fisher_examples")
               if getattr(self, n) < 1]
        if low:
            raise ConfigError(f"{', '.join(low)} must be at least 1")
        if self.magnitude_warmup_epochs < 0 or self.grad_clip < 0:
            raise ConfigError("magnitude_warmup_epochs and grad_clip must be >= 0 (0 disables)")
        # The schema's bounds, for the command line too (a NaN passes the comparisons above).
        from bayestune.guards import check_nonnegative, check_positive

        problems = [*(check_positive(n, getattr(self, n)) for n in ("magnitude_lr", "lt_sft_lr")),
                    *(check_nonnegative(n, getattr(self, n))
                      for n in ("magnitude_warmup_epochs", "grad_clip"))]
        if any(problems):
            raise ConfigError("; ".join(p for p in problems if p))


RANKING_KEYS = ("per_tensor", "keep_head", "head_counts_toward_budget")


def ranking_options(name: str, config: MethodConfig) -> dict[str, bool]:
    """The ranking method ``name`` uses: its registry default, with the config's set keys on
    top. Fixed and unmasked methods rank nothing, so their (descriptive) default stands."""
    spec = get_spec(name)
    default = asdict(spec.ranking or Ranking(False, False, True))
    if spec.kind != BUDGETED:
        return default
    overrides = {k: getattr(config, k) for k in RANKING_KEYS if getattr(config, k) is not None}
    return {**default, **overrides}


def method_settings(config: MethodConfig) -> dict[str, object]:
    """The config's fields other than the ranking options (recorded in mask files)."""
    return {k: v for k, v in asdict(config).items() if k not in RANKING_KEYS}


class MaskMethod(Protocol):
    def __call__(self, model: nn.Module, batches: Batches | None, loss_fn: LossFn,
                 budgets: Sequence[float], seed: int, config: MethodConfig, *,
                 scores: Mapping[str, Tensor] | None = None) -> Masks: ...


# --- LoRA ------------------------------------------------------------------------------------
LORA_PRESETS: dict[str, dict[str, object]] = {
    "default": {"rank": 8, "alpha": 16.0, "dropout": 0.1, "target_modules": "query,value",
                "init": "zero", "train_head": True},
    "sam": {"rank": 4, "alpha": 1.0, "dropout": 0.0,
            "target_modules": "query,key,value,output.dense,intermediate.dense",
            "init": "random", "train_head": False},
}
LORA_INITS = ("zero", "random")


@dataclass
class LoraSettings:
    preset: str = field(default="default", metadata={
        "help": f"named LoRA settings: {', '.join(LORA_PRESETS)} (sam: the SAM repo's, whose "
                "runs give the published LoRA row); the fields below override it"})
    rank: int | None = field(default=None, metadata={"type": int, "help": "LoRA rank r"})
    alpha: float | None = field(default=None, metadata={
        "type": float, "help": "LoRA scaling alpha (update = alpha/r BA)"})
    dropout: float | None = field(default=None, metadata={
        "type": float, "help": "dropout on the LoRA input"})
    target_modules: str | None = field(default=None, metadata={
        "type": str, "help": "comma-separated names (or name suffixes) of the linear layers to "
                             "adapt: RoBERTa/BERT call the attention projections query,key,value; "
                             "timm ViTs use qkv; or all-linear"})
    init: str | None = field(default=None, metadata={
        "type": str, "help": "zero: B = 0, the adapter starts as a no-op (peft's default); "
                             "random: A and B both Kaiming-uniform (the SAM repo)"})
    train_head: bool | None = field(default=None, metadata={
        "type": bool, "help": "train the task head beside the adapters"})

    def __post_init__(self) -> None:
        if self.preset not in LORA_PRESETS:
            raise MethodError(f"unknown LoRA preset {self.preset!r}; known: "
                              f"{', '.join(LORA_PRESETS)}")
        if self.init is not None and self.init not in LORA_INITS:
            raise MethodError(f"unknown LoRA init {self.init!r}; choose {' or '.join(LORA_INITS)}")
        # The schema's bounds, for the command line too.
        if self.rank is not None and self.rank < 1:
            raise MethodError(f"LoRA rank {self.rank} must be at least 1")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise MethodError(f"LoRA alpha {self.alpha} must be a finite number > 0")
        if self.dropout is not None and not 0 <= self.dropout <= 1:
            raise MethodError(f"LoRA dropout {self.dropout} must be in [0, 1]")

    def resolved(self) -> dict[str, object]:
        """The preset's values with the explicitly set fields on top."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "preset"}
        return {**LORA_PRESETS[self.preset], **{k: v for k, v in own.items() if v is not None}}

    def effective_preset(self) -> str:
        """The preset's name if no field changed it, else ``custom``."""
        return self.preset if self.resolved() == LORA_PRESETS[self.preset] else "custom"

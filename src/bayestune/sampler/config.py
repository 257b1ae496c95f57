"""Stage 1's settings: the named presets and :class:`SamplerConfig`, its checks and its phase
arithmetic (which step is warm-up, burn-in or a sample). Only the prior is imported: the
workflow's config check reads this module."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bayestune.errors import ConfigError, RunFailedError
from bayestune.prior import FLOOR_GRADIENTS, LaplaceGammaPrior
from bayestune.settings import section_values

VARIANTS = ("adamw", "hf-adamw", "sgld")
SCHEDULES = ("constant", "jiant")
SAMPLE_RULES = ("after-update", "authors")
NO_GRAD_RULES = ("prior", "skip")
CHECKPOINT_PRECISIONS = ("fp32", "bf16")

# What each preset changes from the dataclass defaults (which are ``exact``). ``reference``
# spells out every value of the authors' MRPC command, so that it does not move when a default
# does. Explicit settings win over a preset's values.
PRESETS: dict[str, dict[str, Any]] = {
    "exact": {},
    "cold": {"noise_discount": 0.0, "lr_lambda": 1e-4},
    "reference": {
        "steps": 0, "min_steps": 20000, "patience": 40, "eval_every": 500, "val_subset": 500,
        "warmup_steps": 10000, "burnin_steps": 12000, "thinning": 100,
        "sample_rule": "authors", "temperature": 1e12, "alpha": 0.01, "beta": 100.0,
        "lambda_init": 1e-4, "lambda_floor": 1e-8, "floor_gradient": "clamped",
        "lr_theta": 1e-4, "schedule": "jiant", "schedule_epochs": 10000,
        "schedule_warmup": 0.1, "lr_lambda": 1e-2, "weight_decay": 0.01,
        "variant": "hf-adamw", "no_grad_params": "skip", "noise_discount": 1.0,
        "grad_clip": 1.0,
    },
}
# The authors' chain with lambda's prior gradient and noise at the true N (the training split's
# size) while theta keeps N = 1e12: lambda then samples its conditional posterior at the scale
# the model states, instead of a noise about 1e5 times its gradient (docs/ALGORITHM.md).
PRESETS["reference-true-n"] = {**PRESETS["reference"], "lambda_temperature": "train-size"}
# The same, and lambda's other two departures from its own scale undone: the exact gradient at
# the floor (the authors' clamped formula kicks a lambda that reaches the floor by |d|/floor^2,
# and the kick's Adam moment freezes it near 0.07) and Adam's rate at lambda's size (its start
# and prior mean are 1e-4; the authors' 1e-2 moves it 100 times that per step).
PRESETS["reference-lambda-scaled"] = {**PRESETS["reference-true-n"], "floor_gradient": "zero",
                                      "lr_lambda": 1e-4}
LAMBDA_TEMPERATURES = ("same", "train-size")


class SamplerConfigError(ConfigError):
    """A sampler setting that cannot work (bad range, no samples, unknown variant)."""


class SamplingDivergedError(RunFailedError):
    """The loss or lambda became NaN or infinite; carries the step and the parameter name."""

    def __init__(self, message: str, *, step: int, name: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.name = name


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


@dataclass
class SamplerConfig:
    preset: str = field(default="exact", metadata={
        "help": "named settings: exact (the maths, constant rates), cold (exact without noise, "
                "lambda's rate 1e-4: short chains), reference (the authors' code step for "
                "step); other options override the preset's values",
        **_choices(*PRESETS)})
    steps: int = field(default=20000, metadata={
        "help": "optimiser steps in all; with patience > 0 the most (0: no limit but the "
                "schedule's end)"})
    min_steps: int = field(default=0, metadata={
        "help": "length rule: never stop before this many steps (with patience > 0)"})
    patience: int = field(default=0, metadata={
        "help": "length rule: stop once this many validation scores in a row did not beat the "
                "best (0: run exactly `steps` steps)"})
    eval_every: int = field(default=500, metadata={
        "help": "length rule: validate after every this many steps (when steps + 1 is a "
                "multiple, as jiant counts)"})
    val_subset: int = field(default=500, metadata={
        "help": "length rule: validate on the first this many validation examples (0: all)"})
    warmup_steps: int = field(default=10000, metadata={
        "help": "W: steps of plain fine-tuning (no prior, no noise, lambda fixed) before SGLD"})
    burnin_steps: int = field(default=12000, metadata={
        "help": "B: first step whose lambda enters the posterior mean (W <= B < steps)"})
    thinning: int = field(default=100, metadata={
        "help": "T: after step B, one lambda sample every T steps"})
    sample_rule: str = field(default="after-update", metadata={
        "help": "after-update: steps count from 0, a sample after the update at B, B+T, ...; "
                "authors: steps count from 1, lambda is averaged in before its update at B and "
                "at every multiple of T from B on (B twice when T divides it)",
        **_choices(*SAMPLE_RULES)})
    temperature: float = field(default=1e12, metadata={
        "help": "N: effective data size dividing the prior and setting the noise scale"})
    lambda_temperature: str = field(default="same", metadata={
        "help": "N in lambda's prior gradient and noise alone: same (temperature, as the paper "
                "and its code), train-size (the number of training examples, the true N; "
                "theta keeps temperature) or a number"})
    alpha: float = field(default=0.01, metadata={"help": "Gamma shape of the prior on lambda"})
    beta: float = field(default=100.0, metadata={"help": "Gamma rate of the prior on lambda"})
    lambda_init: float = field(default=1e-4, metadata={"help": "initial value of every lambda"})
    lambda_floor: float = field(default=1e-8, metadata={
        "help": "lambda is used as max(lambda, floor)"})
    floor_gradient: str = field(default="zero", metadata={
        "help": "lambda's prior gradient at or below the floor: zero (exact: the prior is flat "
                "there) or clamped (the formula at the floor, as the authors' code)",
        **_choices(*FLOOR_GRADIENTS)})
    lr_theta: float = field(default=1e-4, metadata={
        "help": "step size of theta (AdamW lr, or SGLD eta); also sets the theta noise"})
    schedule: str = field(default="constant", metadata={
        "help": "theta's rate: constant, or jiant (linear warm-up over schedule_warmup of "
                "schedule_epochs x steps per epoch, then linear decay; the noise follows it)",
        **_choices(*SCHEDULES)})
    schedule_epochs: int = field(default=10000, metadata={
        "help": "jiant schedule: its length in epochs of the training split"})
    schedule_warmup: float = field(default=0.1, metadata={
        "help": "jiant schedule: fraction of its length spent warming up"})
    lr_lambda: float = field(default=1e-2, metadata={
        "help": "step size of lambda (Adam lr, or SGLD eta); also sets the lambda noise"})
    weight_decay: float = field(default=0.0, metadata={
        "help": "decoupled weight decay of theta: on every parameter (adamw), on all but "
                "biases and LayerNorm weights (hf-adamw)"})
    variant: str = field(default="adamw", metadata={
        "help": "adamw: noisy gradients handed to torch's AdamW (theta) and Adam (lambda); "
                "hf-adamw: theta by the AdamW of transformers 3/4 as the authors' code; "
                "sgld: plain x <- x - eta*grad + sqrt(2 eta/N) xi",
        **_choices(*VARIANTS)})
    no_grad_params: str = field(default="prior", metadata={
        "help": "a parameter the loss does not reach: prior (it still feels prior and noise, "
                "as the maths says) or skip (theta stays put, as the authors' code; its lambda "
                "moves either way)",
        **_choices(*NO_GRAD_RULES)})
    noise_discount: float = field(default=1.0, metadata={
        "help": "factor on every noise term (1 = exact SGLD, 0 = no noise)"})
    grad_clip: float = field(default=1.0, metadata={
        "help": "max norm of the data-loss gradient, clipped before prior and noise (0 = off)"})
    checkpoint_every: int = field(default=200, metadata={
        "help": "steps between checkpoints when a checkpoint path is given (0 = only at the end)"})
    checkpoint_precision: str = field(default="fp32", metadata={
        "help": "fp32: a resumed run is bit-identical to an uninterrupted one (checkpoint up to "
                "7x the model, 8x with `variance`); bf16: theta's change from theta0, lambda, "
                "the optimiser moments and the running mean rounded to bf16 (up to 3.5x the "
                "model, 4x with `variance`; the resumed chain differs by that rounding)",
        **_choices(*CHECKPOINT_PRECISIONS)})
    variance: bool = field(default=False, metadata={
        "help": "also keep lambda's running M2 for the posterior variance (one more "
                "model-sized buffer in the statistics and the checkpoint; the scale file "
                "stores only the mean)"})
    autocast: bool = field(default=False, metadata={
        "help": "bf16 autocast of the forward pass on CUDA (ignored on the CPU)"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        problems = []
        for name, allowed in (("preset", tuple(PRESETS)), ("variant", VARIANTS),
                              ("schedule", SCHEDULES), ("sample_rule", SAMPLE_RULES),
                              ("no_grad_params", NO_GRAD_RULES),
                              ("floor_gradient", FLOOR_GRADIENTS),
                              ("checkpoint_precision", CHECKPOINT_PRECISIONS)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r} is not one of "
                                f"{', '.join(allowed)}")
        if self.steps < 0 or (self.steps == 0 and self.patience == 0):
            problems.append(f"steps={self.steps} must be >= 1 (0 only with patience > 0, where "
                            "the length rule ends the run)")
        for name in ("min_steps", "patience", "val_subset"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("eval_every", "schedule_epochs", "thinning"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.warmup_steps <= self.burnin_steps:
            problems.append(f"need 0 <= warmup_steps <= burnin_steps, got warmup_steps="
                            f"{self.warmup_steps}, burnin_steps={self.burnin_steps}")
        shortest = self.shortest_run
        if self.thinning >= 1 and shortest >= 0 and self.samples_in(shortest) == 0:
            problems.append(f"burnin_steps={self.burnin_steps} leaves no lambda sample in a run "
                            f"of {shortest} steps; raise steps (or min_steps) or lower "
                            "burnin_steps")
        for name in ("temperature", "alpha", "beta", "lambda_init", "lambda_floor",
                     "lr_theta", "lr_lambda"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name}={value} must be a finite number > 0")
        for name in ("weight_decay", "noise_discount", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                problems.append(f"{name}={value} must be a finite number >= 0")
        if not self._lambda_temperature_ok():
            problems.append(f"lambda_temperature={self.lambda_temperature!r} must be same, "
                            "train-size or a finite number > 0")
        if not 0 <= self.schedule_warmup < 1:
            problems.append(f"schedule_warmup={self.schedule_warmup} must be in [0, 1)")
        if self.checkpoint_every < 0:
            problems.append(f"checkpoint_every={self.checkpoint_every} must be >= 0")
        if self.variant == "sgld" and self.weight_decay > 0:
            problems.append("weight_decay applies to variants adamw and hf-adamw only; set it "
                            "to 0 for sgld")
        if self.variant == "sgld" and self.schedule != "constant":
            problems.append("schedule jiant drives an optimiser's rate; use variant adamw or "
                            "hf-adamw with it")
        if problems:
            raise SamplerConfigError("bad sampler config: " + "; ".join(problems))

    # --- phases and samples ------------------------------------------------------------------
    @property
    def shortest_run(self) -> int:
        """Steps of the shortest run these settings allow (the length rule stops after the
        first step past min_steps at the earliest)."""
        if self.patience == 0:
            return self.steps
        return min(self.steps, self.min_steps + 1) if self.steps else self.min_steps + 1

    def in_sgld(self, step: int) -> bool:
        """Whether 0-based step ``step`` is an SGLD step (the authors count from 1)."""
        counter = step + 1 if self.sample_rule == "authors" else step
        return counter >= self.warmup_steps

    def samples_at(self, step: int) -> int:
        """How many times step ``step`` adds lambda to the running moments (0, 1 or 2)."""
        b, t = self.burnin_steps, self.thinning
        if self.sample_rule == "authors":
            counter = step + 1
            return int(counter == b) + int(counter >= b and counter % t == 0)
        return int(step >= b and (step - b) % t == 0)

    def samples_in(self, steps: int) -> int:
        """Samples a run of ``steps`` steps averages."""
        b, t = self.burnin_steps, self.thinning
        if self.sample_rule == "authors":
            return 0 if steps < b else 1 + steps // t - (b - 1) // t
        return len(range(b, steps, t))

    @property
    def n_samples(self) -> int:
        """Samples a run of ``steps`` steps averages (the length rule may end it elsewhere)."""
        return self.samples_in(self.steps)

    def phase(self, step: int) -> str:
        if not self.in_sgld(step):
            return "warm-up"
        return "sampling" if self.samples_in(step + 1) > 0 else "burn-in"

    @property
    def fused_step(self) -> bool:
        """Whether the fused step offers every setting (else the per-tensor step runs)."""
        return (self.variant in ("adamw", "sgld") and self.schedule == "constant"
                and self.sample_rule == "after-update" and self.no_grad_params == "prior")

    def _lambda_temperature_ok(self) -> bool:
        if str(self.lambda_temperature) in LAMBDA_TEMPERATURES:
            return True
        try:
            value = float(self.lambda_temperature)
        except ValueError:
            return False
        return math.isfinite(value) and value > 0

    def lambda_n(self, train_size: int | None = None) -> float:
        """The N of lambda's prior gradient and noise (``lambda_temperature`` resolved)."""
        chosen = str(self.lambda_temperature)
        if chosen == "same":
            return self.temperature
        if chosen == "train-size":
            if not train_size:
                raise SamplerConfigError("lambda_temperature=train-size needs the number of "
                                         "training examples (train_size); pass it to the "
                                         "sampler or give lambda_temperature as a number")
            return float(train_size)
        return float(chosen)

    def prior(self, train_size: int | None = None) -> LaplaceGammaPrior:
        return LaplaceGammaPrior(alpha=self.alpha, beta=self.beta,
                                 temperature=self.temperature, floor=self.lambda_floor,
                                 floor_gradient=self.floor_gradient,
                                 lambda_temperature=self.lambda_n(train_size))


def sampler_config(preset: str = "exact", **settings: Any) -> SamplerConfig:
    """The preset's values with ``settings`` on top (explicit settings win)."""
    if preset not in PRESETS:
        raise SamplerConfigError(f"unknown sampler preset {preset!r}; one of "
                                 f"{', '.join(PRESETS)}")
    known = {f.name for f in dataclasses.fields(SamplerConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise SamplerConfigError(f"unknown sampler setting(s) {', '.join(unknown)}; see "
                                 "`bayestune sample --help`")
    return SamplerConfig(**{**PRESETS[preset], **settings, "preset": preset})


def sampler_config_from_section(section: Mapping[str, Any]) -> SamplerConfig:
    """A config file's sampler section (other keys ignored), each value cast to its field's
    type as the command line does (YAML may write 0 for 0.0), preset resolved."""
    return sampler_config(**section_values(SamplerConfig, section))


def preset_overrides(config: SamplerConfig) -> list[str]:
    """Fields whose value differs from the config's preset."""
    base = dataclasses.asdict(sampler_config(config.preset))
    return sorted(k for k, v in dataclasses.asdict(config).items() if v != base[k])


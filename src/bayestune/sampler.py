"""Stage 1 of BayesTune: SGLD on (theta, lambda), posterior mean of the scales lambda.

Phases, in optimiser steps s = 0, 1, ... (docs/ALGORITHM.md):

* ``s < warmup_steps``: plain fine-tuning of theta; no prior, no noise, lambda fixed.
* ``s >= warmup_steps``: SGLD on (theta, lambda). The noisy gradient of
  U = L + U_prior is ``grad + sqrt(2 / (N eta)) * xi``; ``variant="adamw"`` hands it to AdamW
  (theta) and Adam (lambda), ``"hf-adamw"`` to the authors' transformers AdamW instead,
  ``"sgld"`` takes a plain step ``x <- x - eta * grad``.
* ``s >= burnin_steps`` and ``(s - burnin_steps) % thinning == 0``: after the update,
  max(lambda, floor) enters a running mean (and M2 with ``variance``; Welford, each sample
  once; off the GPU they live in a scratch file, see :class:`RunningStats`).
  ``sample_rule="authors"`` counts as the authors' code does instead (see
  :class:`SamplerConfig`).

Named presets (:data:`PRESETS`, :func:`sampler_config`) bundle the settings: ``exact`` (the
maths above with constant rates), ``cold`` (no noise, for short chains) and ``reference`` (the
authors' code step for step, with its schedule and its early-stopping length rule).

Two implementations of a step. The fused one (``exact``, ``cold``) works on whole lists of
tensors (``torch._foreach_*``, fused optimisers): theta0 and lambda are flat buffers cut into
pieces (``prior.FlatLayout``), the parameters and their gradients are cut the same way, and the
noise comes from one generator; no step loops over parameters in Python. The per-tensor one
(anything the fused step does not offer: the authors' optimiser, schedule or bookkeeping) goes
parameter by parameter as the authors' code does, and draws its noise through a replaceable
function, so that a test can feed the same draws to a transcription of their equations. The
sampler knows nothing of tasks: it sees a model, a batch stream, a loss function and, for the
length rule, a validation callback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from bayestune import files
from bayestune.errors import ConfigError, DataError, RunFailedError
from bayestune.guards import describe_changes
from bayestune.models.base import move_batch, resolve_device
from bayestune.noise import BlockNoise
from bayestune.optim import (
    LengthRule,
    TransformersAdamW,
    jiant_schedule,
    no_decay_names,
    schedule_length,
)
from bayestune.prior import FLOOR_GRADIENTS, FlatLayout, LaplaceGammaPrior
from bayestune.running_stats import STORED_DTYPES, RunningStats

log = logging.getLogger(__name__)

VARIANTS = ("adamw", "hf-adamw", "sgld")
SCHEDULES = ("constant", "jiant")
SAMPLE_RULES = ("after-update", "authors")
NO_GRAD_RULES = ("prior", "skip")
# On the CPU the update runs block by block over pieces of the parameters, so that a block's
# arrays stay in cache through all the ops; a GPU takes whole tensors, in blocks that bound the
# temporaries (noise, lambda's gradient) to a block's size instead of the model's.
CPU_PIECE, CPU_BLOCK = 1 << 16, 1 << 17
GPU_BLOCK = 1 << 25
# Entries of lambda the logged quantiles are read from (see Sampler.lambda_summary).
LOG_QUANTILE_ENTRIES = 1 << 20
# 4: theta0 by fingerprint, not by value; lambda only once it moved; M2 only with variance;
# optionally bf16 state. 5: what the chain was made from (the prepared data's fingerprint, the
# batch size, ...: Sampler.inputs) and the chain diagnostics so far.
CHECKPOINT_VERSION = 5
CHECKPOINT_PRECISIONS = ("fp32", "bf16")
# Fields that do not change the samples: a checkpoint may be resumed with other values.
_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "checkpoint_precision")

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

    def prior(self) -> LaplaceGammaPrior:
        return LaplaceGammaPrior(alpha=self.alpha, beta=self.beta,
                                 temperature=self.temperature, floor=self.lambda_floor,
                                 floor_gradient=self.floor_gradient)


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
    values = {f.name: type(f.default)(section[f.name])
              for f in dataclasses.fields(SamplerConfig) if f.name in section}
    return sampler_config(**values)


def preset_overrides(config: SamplerConfig) -> list[str]:
    """Fields whose value differs from the config's preset."""
    base = dataclasses.asdict(sampler_config(config.preset))
    return sorted(k for k, v in dataclasses.asdict(config).items() if v != base[k])


@dataclass
class ScaleResult:
    mean: dict[str, Tensor]   # posterior mean of max(lambda, floor), per parameter tensor
    var: dict[str, Tensor] | None  # unbiased sample variance (zeros with a single sample);
    #                                 None unless the config asked for the variance
    n_samples: int
    steps: int
    steps_per_epoch: int | None = None   # the schedule's, when one was given
    best_val: float | None = None        # the length rule's best validation score

    def metadata(self, config: SamplerConfig, *, seed: int, model_id: str) -> dict[str, Any]:
        """What the scale file records besides the tensors (files.py adds the version): the
        preset, every resolved setting and which of them override the preset."""
        extra = {k: v for k, v in (("steps_per_epoch", self.steps_per_epoch),
                                   ("best_val", self.best_val)) if v is not None}
        return {**dataclasses.asdict(config), "overrides": preset_overrides(config),
                "model_id": model_id, "seed": seed, "n_samples": self.n_samples,
                "steps_limit": config.steps, "steps": self.steps, **extra}


def write_scale_file(path: str | Path, result: ScaleResult, config: SamplerConfig, *,
                     seed: int, model_id: str, provenance: dict | None = None,
                     accepted_problems: Sequence[str] = (),
                     extra: Mapping[str, Any] | None = None) -> None:
    """``accepted_problems``: what the scale checks found and the user accepted
    (--allow-degenerate-scales); readers of the file accept those, and refuse any other.
    ``extra`` adds what else identifies the model (its architecture)."""
    meta = {**result.metadata(config, seed=seed, model_id=model_id), **(extra or {})}
    if accepted_problems:
        meta["accepted_problems"] = list(accepted_problems)
    files.save_scales(path, result.mean, meta, provenance)


# --- the sampler's state and its step --------------------------------------------------------
NoiseFn = Callable[[str, int, Tensor], Tensor]


class ChainMonitor(Protocol):
    """What the sampler calls around each step (see bayestune.diagnostics)."""

    def attach(self, sampler: Sampler) -> None: ...

    def before_step(self, sampler: Sampler) -> None: ...

    def after_step(self, sampler: Sampler) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any] | None, *, resumed_at: int) -> None: ...


class Sampler:
    """The whole state of one stage-1 run; :meth:`advance` takes one step of the schedule.

    ``steps_per_epoch`` sets the length of the jiant schedule (needed with it). ``inputs``
    names what the chain is made from besides its config and seed (e.g. the prepared data's
    fingerprint and the batch size); a checkpoint records them and resumes only with the same
    values. ``noise_fn``
    replaces the per-tensor step's noise source: ``noise_fn(kind, index, like)`` returns
    standard normal draws shaped like ``like`` for ``kind`` "theta" or "lambda" of parameter
    number ``index`` (the fused step ignores it).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict], Tensor],
                 config: SamplerConfig, seed: int, device: torch.device, *,
                 scratch_dir: Path | None = None, steps_per_epoch: int | None = None,
                 noise_fn: NoiseFn | None = None,
                 inputs: Mapping[str, Any] | None = None) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters to sample")
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) > 1:
            raise ValueError(f"trainable parameters mix dtypes {sorted(map(str, dtypes))}; "
                             "the sampler keeps one flat buffer per quantity and needs one dtype")
        strided = [n for n, p in named if not p.is_contiguous()]
        if strided:
            raise ValueError(f"parameter {strided[0]} is not contiguous; the sampler views "
                             "parameters as flat pieces (make it contiguous when building)")
        if config.schedule == "jiant" and not steps_per_epoch:
            raise SamplerConfigError("schedule jiant needs the number of batches per epoch "
                                     "(steps_per_epoch) to set its length")
        self.model, self.loss_fn, self.config, self.device = model, loss_fn, config, device
        self.steps_per_epoch = steps_per_epoch
        # What shapes the chain besides the config, seed and theta0 (the data, the batch
        # size): a checkpoint resumes only with the same values.
        self.inputs = dict(inputs or {})
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [p.shape for p in self.params]
        on_cpu = device.type == "cpu"
        self.layout = FlatLayout(self.params, max_piece=CPU_PIECE if on_cpu else None)
        self.sizes = self.layout.sizes
        self.prior = config.prior()
        self.theta0_flat = self.layout.flatten(self.params)
        self.lam_flat = torch.full_like(self.theta0_flat, config.lambda_init)
        self.lams = self.layout.views(self.lam_flat)  # per parameter, for names in errors
        self.theta0s = self.layout.views(self.theta0_flat)  # views: no memory of their own
        self.fused = config.fused_step
        if self.fused:
            # The hot path works piece by piece; lambda's pieces are what its optimiser
            # updates, in place in lam_flat.
            self.theta_pieces = self.layout.pieces([p.detach() for p in self.params])
            self.theta0_pieces = self.layout.flat_pieces(self.theta0_flat)
            self.lam_params = [v.requires_grad_() for v in
                               self.layout.flat_pieces(self.lam_flat)]
            self.blocks = self.layout.groups(CPU_BLOCK if on_cpu else GPU_BLOCK)
        else:
            self.lam_params = [v.requires_grad_() for v in self.lams]
        self.opt_theta, self.opt_lams = self._optimisers()
        self.schedule = (jiant_schedule(self.opt_theta, epochs=config.schedule_epochs,
                                        steps_per_epoch=steps_per_epoch,
                                        warmup_ratio=config.schedule_warmup)
                         if config.schedule == "jiant" else None)
        self.noise = torch.Generator(device=device)
        self.noise.manual_seed(seed ^ 0x5EED5EED)  # a stream apart from dropout's
        self.noise_fn = noise_fn or self._standard_normal
        c = config.noise_discount
        self.noise_theta = c * math.sqrt(2.0 / (config.temperature * config.lr_theta))
        self.noise_lam = c * math.sqrt(2.0 / (config.temperature * config.lr_lambda))
        self.block_noise = (BlockNoise(self.noise, [sum(self.layout.piece_sizes[b])
                                                    for b in self.blocks],
                                       theta=self.noise_theta > 0, lam=self.noise_lam > 0,
                                       device=device, dtype=self.lam_flat.dtype)
                            if self.fused else None)
        self.use_autocast = config.autocast and device.type == "cuda"
        if config.autocast and not self.use_autocast:
            log.warning("autocast is for CUDA only; running in full precision on %s", device)
        self.step = self.epoch = self.position = 0
        self.length_rule = (LengthRule(config.min_steps, config.patience, config.eval_every)
                            if config.patience > 0 else None)
        self.stopped = False  # by the length rule
        self.scratch_dir = scratch_dir  # where the running statistics' scratch file goes
        self.stats: RunningStats | None = None  # made by the first sample
        self._theta0_fingerprint: str | None = None
        # Watches the chain (bayestune.diagnostics.ChainMonitor): reads the state before and
        # after each step, never changes it, so the samples are the same with or without it.
        self.chain_monitor: ChainMonitor | None = None

    @property
    def limit(self) -> int | None:
        """The most steps this run takes: ``steps``, else the schedule's end, else none."""
        if self.config.steps:
            return self.config.steps
        if self.schedule is not None:
            return schedule_length(self.config.schedule_epochs, self.steps_per_epoch)
        return None

    @property
    def finished(self) -> bool:
        return self.stopped or (self.limit is not None and self.step >= self.limit)

    @property
    def count(self) -> int:
        """Number of lambda samples recorded."""
        return self.stats.count if self.stats is not None else 0

    def _new_stats(self) -> RunningStats:
        return RunningStats(self.layout.numel, in_memory=self.device.type == "cuda",
                            directory=self.scratch_dir, variance=self.config.variance)

    def close(self) -> None:
        """Drop the scratch file of the running statistics (also done when collected) and the
        noise worker."""
        if self.stats is not None:
            self.stats.close()
        if self.block_noise is not None:
            self.block_noise.close()

    def _optimisers(self) -> tuple[torch.optim.Optimizer | None, list[torch.optim.Optimizer]]:
        """theta's optimiser and lambda's: one Adam per block in the fused step (each block's
        lambda is stepped as soon as its gradient is formed), one in all per tensor."""
        config = self.config
        if config.variant == "sgld":
            return None, []
        fast = ({"fused": True} if self.device.type in ("cpu", "cuda")
                else {"foreach": True})
        blocks = ([self.lam_params[block] for block in self.blocks] if self.fused
                  else [self.lam_params])
        lam = [torch.optim.Adam(block, lr=config.lr_lambda, **fast) for block in blocks]
        if config.variant == "adamw":
            theta = torch.optim.AdamW(self.params, lr=config.lr_theta,
                                      weight_decay=config.weight_decay, **fast)
            return theta, lam
        exempt = no_decay_names(self.model)
        groups = [{"params": [p for n, p in zip(self.names, self.params, strict=True)
                              if (n in exempt) == no_decay], "weight_decay": wd}
                  for no_decay, wd in ((False, config.weight_decay), (True, 0.0))]
        theta = TransformersAdamW([g for g in groups if g["params"]], lr=config.lr_theta,
                                  eps=1e-8)
        return theta, lam

    def _theta_rates(self) -> list[float]:
        """The current rate of each parameter's optimiser group (the scheduled rate)."""
        if self.opt_theta is None:
            return [self.config.lr_theta] * len(self.params)
        rate = {id(p): g["lr"] for g in self.opt_theta.param_groups for p in g["params"]}
        return [rate[id(p)] for p in self.params]

    def _standard_normal(self, kind: str, index: int, like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=self.noise, device=like.device,
                           dtype=like.dtype)

    # --- one optimiser step -------------------------------------------------------------------
    def advance(self, batch: dict) -> float:
        """One step of the schedule: update, check lambda, maybe record a sample; the loss."""
        step, config, monitor = self.step, self.config, self.chain_monitor
        if monitor is not None:  # the state this step's lambda gradient is computed from
            monitor.before_step(self)
        loss_value = self.train_step(batch) if self.fused else self.train_step_per_tensor(batch)
        self.check_lambda()
        if config.sample_rule == "after-update":
            for _ in range(config.samples_at(step)):
                self.record_sample()
        self.step, self.position = step + 1, self.position + 1
        if monitor is not None:
            monitor.after_step(self)
        return loss_value

    def _backward(self, batch: dict) -> float:
        ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if self.use_autocast
               else contextlib.nullcontext())
        with ctx:
            loss = self.loss_fn(self.model, batch)
        if not (torch.is_tensor(loss) and loss.dim() == 0):
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}; "
                            "does the batch carry labels?")
        loss.backward()
        loss_value = loss.item()
        self._check_loss(loss_value)
        return loss_value

    def train_step(self, batch: dict) -> float:
        """One fused optimiser step; returns the loss (checked before the update touches
        theta)."""
        sgld = self.config.in_sgld(self.step)
        loss_value = self._backward(batch)
        with torch.no_grad():
            grads = self._grads(fill_missing=sgld)
            if self.config.grad_clip > 0:  # the data gradient only, as the reference
                nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
            if sgld:
                # a spare core draws the noise one block ahead (same values either way)
                ahead = self.device.type == "cpu" and torch.get_num_threads() > 1
                with _one_thread_on_cpu(self.device):
                    self._posterior_terms(grads, ahead)
            self._update(grads)
        self._zero_grads()
        return loss_value

    def _zero_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def _grads(self, fill_missing: bool) -> list[Tensor]:
        # A parameter the loss does not reach has data gradient 0; under SGLD it still feels
        # the prior and the noise, so it needs a gradient tensor.
        if fill_missing:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params if p.grad is not None]

    def _posterior_terms(self, grads: list[Tensor], ahead: bool) -> None:
        """Add noise and prior to the theta gradients and step lambda, block by block.

        Per block: theta noise, prior, lambda noise, each draw one ``normal_`` of the block's
        size from the sampler's generator (so the stream depends on the blocks, fixed per
        device type; with ``ahead`` a worker thread makes the same draws one block early,
        :mod:`bayestune.noise`); then the block's lambda takes its step, so that lambda's
        gradient lives for one block only (and, on the CPU, while it is still in cache).
        Nothing else reads that block's lambda in this step, so stepping it before theta
        changes no value.
        """
        grad_pieces = self.layout.pieces(grads)
        draws = self.block_noise.blocks(ahead)
        for k, (block, noise) in enumerate(zip(self.blocks, draws, strict=True)):
            sizes = self.layout.piece_sizes[block]
            if self.noise_theta > 0:
                torch._foreach_add_(grad_pieces[block], list(torch.split(noise.theta(), sizes)),
                                    alpha=self.noise_theta)
            lam_grad = self.prior.add_grads_(self.theta_pieces[block], self.theta0_pieces[block],
                                             self.lam_params[block], grad_pieces[block])
            if self.noise_lam > 0:
                torch._foreach_add_(lam_grad, list(torch.split(noise.lam(), sizes)),
                                    alpha=self.noise_lam)
            self._step_lambda(self.lam_params[block], lam_grad,
                              self.opt_lams[k] if self.opt_lams else None)

    def _update(self, grads: list[Tensor]) -> None:
        if self.opt_theta is not None:
            self.opt_theta.step()
            return
        params = [p for p in self.params if p.grad is not None]
        torch._foreach_add_(params, grads, alpha=-self.config.lr_theta)

    def _step_lambda(self, lams: list[Tensor], lam_grads: list[Tensor],
                     optimiser: torch.optim.Optimizer | None) -> None:
        if optimiser is None:
            torch._foreach_add_(lams, lam_grads, alpha=-self.config.lr_lambda)
            return
        for lam, grad in zip(lams, lam_grads, strict=True):
            lam.grad = grad
        optimiser.step()
        for lam in lams:
            lam.grad = None

    # --- the per-tensor step: the authors' code, parameter by parameter -----------------------
    def train_step_per_tensor(self, batch: dict) -> float:
        """One step as the authors' code takes it: clip the data gradient; under SGLD add to
        each theta gradient the noise at its group's scheduled rate (where that rate is > 0)
        and the prior, form lambda's gradient and noise, record due samples (authors' rule),
        step lambda; then step theta and the schedule."""
        config = self.config
        sgld = config.in_sgld(self.step)
        loss_value = self._backward(batch)
        with torch.no_grad():
            if sgld and config.no_grad_params == "prior":
                self._grads(fill_missing=True)
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.params, config.grad_clip)
            if sgld:
                lam_grads = self._posterior_terms_per_tensor()
                if config.sample_rule == "authors":
                    for _ in range(config.samples_at(self.step)):
                        self.record_sample()
                self._step_lambda(self.lam_params, lam_grads,
                                  self.opt_lams[0] if self.opt_lams else None)
            self._update(self._grads(fill_missing=False))
            if self.schedule is not None:
                self.schedule.step()
        self._zero_grads()
        return loss_value

    def _posterior_terms_per_tensor(self) -> list[Tensor]:
        config, prior = self.config, self.prior
        n, c = config.temperature, config.noise_discount
        rates = self._theta_rates()
        lam_grads = []
        for i, (p, theta0, lam) in enumerate(zip(self.params, self.theta0s, self.lam_params,
                                                 strict=True)):
            if p.grad is not None:
                if c > 0 and rates[i] > 0:
                    p.grad.add_(self.noise_fn("theta", i, p),
                                alpha=c * math.sqrt(2.0 / (n * rates[i])))
                p.grad.add_(prior.grad_theta(p, theta0, lam))
            lam_grads.append(prior.grad_lambda(p, theta0, lam))
        if self.noise_lam > 0:
            for i, (grad, lam) in enumerate(zip(lam_grads, self.lam_params, strict=True)):
                grad.add_(self.noise_fn("lambda", i, lam), alpha=self.noise_lam)
        return lam_grads

    # --- the length rule ----------------------------------------------------------------------
    def check_length(self, validate: Callable[[nn.Module], float] | None) -> float | None:
        """After a step: validate when the length rule wants a score, and stop when it says;
        the score when one was taken. The validation runs on a fork of the global RNG, so
        that it cannot shift the dropout masks of later steps."""
        rule = self.length_rule
        if rule is None:
            return None
        score = None
        if rule.due(self.step):
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                score = float(validate(self.model))
            self.model.train()
            rule.record(score, self.step)
        self.stopped = rule.should_stop(self.step)
        return score

    @torch.no_grad()
    def lambda_summary(self) -> dict[str, float]:
        """Median, 99th percentile and maximum of max(lambda, floor), and the fraction of
        lambda at or below the floor. The quantiles are read from an evenly strided subset of
        at most ``LOG_QUANTILE_ENTRIES`` entries (all of them in a small model): a sort of the
        whole buffer would cost seconds per log line at RoBERTa's size. Max and fraction are
        exact."""
        lam = self.lam_flat.detach()
        stride = -(-lam.numel() // LOG_QUANTILE_ENTRIES)
        subset = self.prior.scale(lam[::stride]).float()
        median, p99 = torch.quantile(subset, torch.tensor([0.5, 0.99], device=lam.device))
        at_floor = int((lam <= self.prior.floor).sum()) / lam.numel()
        return {"median": float(median), "p99": float(p99),
                "max": float(self.prior.scale(lam.max())), "at_floor": at_floor}


    # --- samples and checks -------------------------------------------------------------------
    @torch.no_grad()
    def record_sample(self) -> None:
        """Welford update of the running mean (and M2) with max(lambda, floor), block by block
        so that no full-size temporary is made."""
        if self.stats is None:
            self.stats = self._new_stats()
        lam = self.lam_flat.detach()
        self.stats.add(lambda start, stop: self.prior.scale(lam[start:stop]).to(
            "cpu", torch.float32))

    def _check_loss(self, loss: float) -> None:
        if math.isfinite(loss):
            return
        self._zero_grads()
        name = _first_nonfinite(self.names, self.params)
        where = (f"parameter {name} is non-finite" if name else
                 "every parameter is finite, so check the batch and the loss function")
        raise SamplingDivergedError(f"step {self.step}: the loss is {loss} ({where}); lower "
                                    "lr_theta or check the data", step=self.step, name=name)

    def check_lambda(self) -> None:
        """Raise if lambda went NaN or infinite (one reduction over the flat buffer)."""
        if not self.config.in_sgld(self.step) or torch.isfinite(self.lam_flat.sum()):
            return
        name = _first_nonfinite(self.names, self.lams)
        theta = "also" if name in _nonfinite_names(self.names, self.params) else "not"
        raise SamplingDivergedError(
            f"step {self.step}: lambda of parameter {name} is non-finite (theta {theta}); "
            "lower lr_lambda or lr_theta, or raise temperature", step=self.step, name=name)

    def result(self) -> ScaleResult:
        if self.stats is None:
            raise RuntimeError(f"step {self.step}: no lambda sample recorded yet (samples start "
                               f"at burnin_steps={self.config.burnin_steps})")
        mean = self._named(self.stats.region(0))
        var = None
        if self.config.variance:
            m2 = self.stats.region(1)
            var = self._named(m2.div_(self.count - 1) if self.count > 1 else m2.zero_())
        best = self.length_rule.best if self.length_rule is not None else None
        return ScaleResult(mean=mean, var=var, n_samples=self.count, steps=self.step,
                           steps_per_epoch=self.steps_per_epoch, best_val=best)

    def _named(self, flat: Tensor) -> dict[str, Tensor]:
        return {n: v.clone() for n, v in zip(self.names, self.layout.views(flat), strict=True)}

    # --- checkpoints ----------------------------------------------------------------------------
    # In model-sized buffers (fp32 / bf16): the model's weights (1 / 0.5, where bf16 stores
    # theta - theta0) and theta's two AdamW moments (2 / 1); once SGLD has moved lambda, lambda
    # and its two Adam moments (3 / 1.5); once samples are recorded, the running mean (1 / 0.5)
    # and, with `variance`, M2 (1 / 0.5). So at most 7x (fp32) or 3.5x (bf16) the model, 8x /
    # 4x with M2. theta0 is never stored: the resuming run rebuilds it from the model source
    # and checks it by its fingerprint. Bit-identical resuming needs every other fp32 value.
    def theta0_fingerprint(self) -> str:
        """A hash of theta0's bytes (computed once: theta0 never changes)."""
        if self._theta0_fingerprint is None:
            digest = hashlib.blake2b(digest_size=16)
            for chunk in torch.split(self.theta0_flat.detach(), 1 << 22):
                digest.update(chunk.cpu().contiguous().view(torch.uint8).numpy())
            self._theta0_fingerprint = digest.hexdigest()
        return self._theta0_fingerprint

    @property
    def lambda_moved(self) -> bool:
        """Whether an SGLD step has run (before that lambda is lambda_init everywhere)."""
        return self.step > 0 and self.config.in_sgld(self.step - 1)

    def state_dict(self, seed: int) -> dict[str, Any]:
        """Everything to resume from; "stats" names the attachments (see :meth:`attachments`)
        that hold the running statistics, none before the first sample."""
        bf16 = self.config.checkpoint_precision == "bf16"
        model, theta_delta = self._model_state(bf16)
        return {
            "version": CHECKPOINT_VERSION, "seed": seed, "config": _resume_key(self.config),
            "precision": self.config.checkpoint_precision,
            "names": self.names, "shapes": [list(s) for s in self.shapes],
            "pieces": self.layout.piece_sizes, "steps_per_epoch": self.steps_per_epoch,
            "step": self.step, "epoch": self.epoch, "position": self.position,
            "theta0": self.theta0_fingerprint(), "model": model, "theta_delta": theta_delta,
            "lam": _rounded(self.lam_flat.detach(), bf16) if self.lambda_moved else None,
            "opt_theta": _optimiser_state(self.opt_theta, bf16),
            "opt_lam": [_optimiser_state(opt, bf16) for opt in self.opt_lams],
            "schedule": self.schedule.state_dict() if self.schedule else None,
            "length_rule": self.length_rule.state_dict() if self.length_rule else None,
            "stopped": self.stopped, "inputs": self.inputs,
            "monitor": self.chain_monitor.state_dict() if self.chain_monitor else None,
            "count": self.count, "stats": list(self.stats.regions) if self.stats else [],
            "noise_rng": self.noise.get_state(),
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }

    def _model_state(self, bf16: bool) -> tuple[dict[str, Tensor], list[Tensor] | None]:
        """The model's state dict; with bf16, its sampled parameters as bf16 changes from
        theta0 instead (rounding a change, not a weight, keeps the error to that of the
        change)."""
        state = self.model.state_dict()
        if not bf16:
            return state, None
        sampled = set(self.names)
        delta = [(p.detach() - t0).to(torch.bfloat16)
                 for p, t0 in zip(self.params, self.theta0s, strict=True)]
        return {k: v for k, v in state.items() if k not in sampled}, delta

    def attachments(self) -> dict[str, Callable[[BinaryIO], None]]:
        """Writers of the running statistics, streamed into the checkpoint file."""
        if self.stats is None:
            return {}
        dtype = STORED_DTYPES[self.config.checkpoint_precision]
        return {name: self.stats.writer(k, dtype) for k, name in enumerate(self.stats.regions)}

    def save_checkpoint(self, path: Path, seed: int) -> None:
        files.save_checkpoint(path, self.state_dict(seed), self.attachments())

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any], seed: int, path: Path) -> None:
        """Restore everything but torch's global RNG (see :func:`_restore_global_rng`); the
        running statistics come from the attachments of the checkpoint file at ``path``."""
        _check_resumable(state, self, seed, path)
        self._load_model(state, path)
        if state["lam"] is None:
            self.lam_flat.fill_(self.config.lambda_init)
        else:
            self.lam_flat.copy_(state["lam"])
        if self.opt_theta is not None:  # torch casts bf16 moments back to the parameters' dtype
            self.opt_theta.load_state_dict(state["opt_theta"])
        for opt, saved in zip(self.opt_lams, state["opt_lam"], strict=True):
            opt.load_state_dict(saved)
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
        if self.length_rule is not None:
            self.length_rule.load_state_dict(state["length_rule"])
        self.stopped = state["stopped"]
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.noise.set_state(state["noise_rng"])
        if self.chain_monitor is not None:
            self.chain_monitor.load_state_dict(state["monitor"], resumed_at=self.step)
        self.close()
        self.stats = None
        if state["count"] > 0:
            self.stats = self._new_stats()
            self.stats.count = state["count"]
            dtype = STORED_DTYPES[state["precision"]]
            for k, name in enumerate(state["stats"]):
                with files.open_checkpoint_attachment(path, name) as stream:
                    self.stats.load(k, stream, path, dtype)

    def _load_model(self, state: dict[str, Any], path: Path) -> None:
        if state["theta_delta"] is None:
            self.model.load_state_dict(state["model"])
            return
        missing = self.model.load_state_dict(state["model"], strict=False).missing_keys
        if not set(missing) <= set(self.names):
            raise files.FileFormatError(f"{path}: the checkpoint lacks {sorted(missing)[0]}; "
                                        "delete it to start over")
        for p, t0, delta in zip(self.params, self.theta0s,
                                state["theta_delta"], strict=True):
            p.copy_(t0 + delta.to(p.device, p.dtype))




def _rounded(t: Tensor, bf16: bool) -> Tensor:
    return t.to(torch.bfloat16) if bf16 else t


def _optimiser_state(opt: torch.optim.Optimizer | None, bf16: bool) -> dict[str, Any] | None:
    """The optimiser's state dict, its moments in bf16 if asked (steps stay exact)."""
    if opt is None:
        return None
    state = opt.state_dict()
    if bf16:
        state["state"] = {
            key: {name: _rounded(v, v.is_floating_point() and v.dim() > 0)
                  if torch.is_tensor(v) else v for name, v in per_param.items()}
            for key, per_param in state["state"].items()}
    return state


@contextlib.contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """On the CPU, run the block loop on one thread. Each block's op is a few tens of
    microseconds of cache-resident work, and the noise draw is serial anyway: a second thread
    saves little, while on a busy machine every one of the loop's thousands of parallel
    regions waits for a descheduled thread (seconds per step). Elementwise ops give the same
    bits on any number of threads."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _resume_key(config: SamplerConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in _RESUMABLE_CHANGES}


def _check_resumable(state: dict[str, Any], sampler: Sampler, seed: int, path: Path) -> None:
    fix = f"delete {path} to start over, or resume with the settings that wrote it"
    version = state.get("version")
    if isinstance(version, int) and version < CHECKPOINT_VERSION:
        raise files.FileFormatError(f"{path}: a sampler checkpoint of version {version}, written "
                                    "by an older bayestune; this one reads version "
                                    f"{CHECKPOINT_VERSION} (it records the data and batch size "
                                    "it was made from): delete it to start over")
    if version != CHECKPOINT_VERSION:
        raise files.FileFormatError(f"{path}: not a sampler checkpoint of this version; {fix}")
    changed = describe_changes(state["inputs"], sampler.inputs)
    if changed:
        raise SamplerConfigError(f"{path} was made from other inputs than this run's "
                                 f"({'; '.join(changed)}): resuming would go on with a chain of "
                                 "other data; delete it to start over with these inputs, or "
                                 "resume with the prepared data, batch size and task that "
                                 "wrote it")
    if state["seed"] != seed:
        raise SamplerConfigError(f"{path} was written with seed {state['seed']}, not {seed}; "
                                 f"{fix}")
    ours = _resume_key(sampler.config)
    changed = sorted(k for k in ours if state["config"].get(k) != ours[k])
    if changed:
        diffs = ", ".join(f"{k}: {state['config'].get(k)!r} -> {ours[k]!r}" for k in changed)
        raise SamplerConfigError(f"{path} was written with other sampler settings ({diffs}); "
                                 f"{fix}")
    if state["names"] != sampler.names or state["shapes"] != [list(s) for s in sampler.shapes]:
        raise files.FileFormatError(f"{path}: checkpoint of another model; {fix}")
    if state["theta0"] != sampler.theta0_fingerprint():
        raise files.FileFormatError(f"{path}: written from other starting weights theta0 "
                                    "(another model file or seed); resume with the --model and "
                                    f"--seed that wrote it, or {fix}")
    if (state["pieces"] != sampler.layout.piece_sizes  # lambda's optimiser state is by piece
            or len(state["opt_lam"]) != len(sampler.opt_lams)):  # and by block
        raise SamplerConfigError(f"{path} was written on another device type (cpu vs cuda); "
                                 f"resume it on the same kind of device, or {fix}")
    if sampler.schedule is not None and state["steps_per_epoch"] != sampler.steps_per_epoch:
        raise SamplerConfigError(f"{path} was written with {state['steps_per_epoch']} steps per "
                                 f"epoch, not {sampler.steps_per_epoch} (the schedule's length "
                                 f"depends on it); {fix}")
    if sampler.limit is not None and state["step"] > sampler.limit:
        raise SamplerConfigError(f"{path} is at step {state['step']}, past steps="
                                 f"{sampler.limit}; {fix}")


def _restore_global_rng(state: dict[str, Any]) -> None:
    # Done after re-reading the interrupted epoch's first batches, so that whatever the batch
    # stream draws from the global RNG cannot shift the dropout masks of later steps.
    torch.set_rng_state(state["cpu_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def _nonfinite_names(names: Sequence[str], tensors: Sequence[Tensor]) -> list[str]:
    return [n for n, t in zip(names, tensors, strict=True) if not torch.isfinite(t).all()]


def _first_nonfinite(names: Sequence[str], tensors: Sequence[Tensor]) -> str | None:
    bad = _nonfinite_names(names, tensors)
    return bad[0] if bad else None


# --- the loop ----------------------------------------------------------------------------------
def sample_scales(
    model: nn.Module,
    batches: Callable[[int], Iterable[dict]],
    loss_fn: Callable[[nn.Module, dict], Tensor],
    config: SamplerConfig,
    *,
    seed: int,
    device: str = "auto",
    checkpoint_path: Path | None = None,
    progress: bool = True,
    steps_per_epoch: int | None = None,
    validate: Callable[[nn.Module], float] | None = None,
    log_every: int = 0,
    chain_monitor: ChainMonitor | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> ScaleResult:
    """Run stage 1 and return the posterior mean (and variance) of the scales lambda.

    ``batches(epoch)`` must yield the same batches for the same epoch; epochs are cycled until
    ``config.steps`` optimiser steps are done, or until the length rule (``config.patience >
    0``) stops the run: it scores the model with ``validate(model)`` (higher is better) and
    needs that callback. ``steps_per_epoch`` (the number of batches per epoch) sets the length
    of the jiant schedule. With ``checkpoint_path``, the whole state is saved every
    ``config.checkpoint_every`` steps and at the end, and an existing checkpoint there is
    resumed from: a resumed run gives the same result as an uninterrupted one. The model is
    moved to ``device`` and left there, holding the last sample of theta. ``log_every`` > 0
    logs a line every this many steps, after each validation and at the end (see
    :func:`_log_line`). ``chain_monitor`` watches every step
    (bayestune.diagnostics); it does not change the samples, and a checkpoint carries what it
    saw so far. ``inputs``: see :class:`Sampler`.
    """
    config.validate()
    if config.patience > 0 and validate is None:
        raise SamplerConfigError(f"patience={config.patience}: the length rule needs a "
                                 "validation callback (validate=...); or set patience 0 and a "
                                 "fixed number of steps")
    dev = resolve_device(device)
    model.to(dev).train()
    scratch = Path(checkpoint_path).parent if checkpoint_path is not None else None
    sampler = Sampler(model, loss_fn, config, seed, dev, scratch_dir=scratch,
                      steps_per_epoch=steps_per_epoch, inputs=inputs)
    if chain_monitor is not None:
        chain_monitor.attach(sampler)
        sampler.chain_monitor = chain_monitor
    try:
        return _run(sampler, batches, checkpoint_path, seed, progress, validate, log_every)
    finally:
        sampler.close()


def _run(sampler: Sampler, batches: Callable[[int], Iterable[dict]],
         checkpoint_path: Path | None, seed: int, progress: bool,
         validate: Callable[[nn.Module], float] | None, log_every: int) -> ScaleResult:
    config, dev = sampler.config, sampler.device
    state = files.load_checkpoint(checkpoint_path) if checkpoint_path is not None else None
    if state is not None:
        sampler.load_state_dict(state, seed, Path(checkpoint_path))
        log.info("stage 1 resumed from step %d (checkpoint %s)", sampler.step, checkpoint_path)
    else:
        torch.manual_seed(seed)  # dropout
    losses: list[float] = []  # since the last log line
    with tqdm(total=sampler.limit, initial=sampler.step, disable=not progress,
              desc="stage 1", dynamic_ncols=True) as bar, _lines_above(bar):
        while not sampler.finished:
            epoch_batches = _epoch_iter(batches, sampler)
            if state is not None:
                _restore_global_rng(state)
                state = None
            for batch in epoch_batches:
                loss_value = sampler.advance(move_batch(batch, dev))
                score = sampler.check_length(validate)
                if log_every:  # the losses are kept only for the next log line
                    losses.append(loss_value)
                    if score is not None or sampler.step % log_every == 0 or sampler.finished:
                        log.info("%s", _log_line(sampler, losses, score))
                        losses = []
                bar.update(1)
                bar.set_postfix(phase=config.phase(sampler.step - 1), loss=f"{loss_value:.4g}",
                                refresh=False)
                _maybe_checkpoint(sampler, checkpoint_path, seed)
                if sampler.finished:
                    break
            else:
                sampler.epoch, sampler.position = sampler.epoch + 1, 0
    if sampler.stopped:
        log.info("stage 1 stopped by the length rule after %d steps (best validation %.4f at "
                 "step %d)", sampler.step, sampler.length_rule.best, sampler.length_rule.best_step)
    return sampler.result()


def _lines_above(bar: tqdm) -> contextlib.AbstractContextManager:
    """With a progress bar, log lines print above it instead of through it."""
    return contextlib.nullcontext() if bar.disable else logging_redirect_tqdm()


def _log_line(sampler: Sampler, losses: Sequence[float], score: float | None) -> str:
    """One line of a job log: step, phase, mean loss since the last line, lambda's spread and
    the validation score when the length rule just took one."""
    config, step = sampler.config, sampler.step
    total = f"/{sampler.limit}" if sampler.limit is not None else ""
    lam = sampler.lambda_summary()
    line = (f"stage 1 step {step}{total} ({config.phase(step - 1)}): loss "
            f"{sum(losses) / max(len(losses), 1):.4f}, lambda median {lam['median']:.3g} "
            f"p99 {lam['p99']:.3g} max {lam['max']:.3g}, at floor {lam['at_floor']:.1%}")
    if score is not None:
        rule = sampler.length_rule
        best = " (best)" if rule.best_step == step else ""
        line += f", validation {score:.4f}{best}, {rule.since_best} without improvement"
    return line


def _epoch_iter(batches: Callable[[int], Iterable[dict]], sampler: Sampler) -> Iterable[dict]:
    """The rest of the current epoch, skipping the batches a resumed run already used."""
    it = iter(batches(sampler.epoch))
    skipped = sum(1 for _ in itertools.islice(it, sampler.position))
    if skipped < sampler.position:
        raise DataError(f"epoch {sampler.epoch} has {skipped} batches but the checkpoint had "
                        f"used {sampler.position}; the training data changed since, so delete "
                        "the checkpoint")
    if sampler.position == 0:
        return _nonempty(it, sampler.epoch)
    return it


def _nonempty(it: Iterable[dict], epoch: int) -> Iterable[dict]:
    empty = True
    for batch in it:
        empty = False
        yield batch
    if empty:
        raise DataError(f"batches({epoch}) yielded no batches; is the training split empty?")


def _maybe_checkpoint(sampler: Sampler, path: Path | None, seed: int) -> None:
    every, step = sampler.config.checkpoint_every, sampler.step
    if path is None or not (sampler.finished or (every and step % every == 0)):
        return
    sampler.save_checkpoint(Path(path), seed)

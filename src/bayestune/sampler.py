"""Stage 1 of BayesTune: SGLD on (theta, lambda), posterior mean of the scales lambda.

Phases, in optimiser steps s = 0, 1, ... (as in the BayesTune paper):

* ``s < warmup_steps``: plain fine-tuning of theta; no prior, no noise, lambda fixed.
* ``s >= warmup_steps``: SGLD on (theta, lambda). The noisy gradient of
  U = L + U_prior is ``grad + sqrt(2 / (N eta)) * xi``; ``variant="adamw"`` (the reference)
  hands it to AdamW (theta) and Adam (lambda), ``variant="sgld"`` takes a plain step
  ``x <- x - eta * grad``.
* ``s >= burnin_steps`` and ``(s - burnin_steps) % thinning == 0``: after the update,
  max(lambda, floor) enters a running mean and variance (Welford, each sample once; off the
  GPU they live in a scratch file, see :class:`RunningStats`).

The hot path works on whole lists of tensors (``torch._foreach_*``, fused optimisers): theta0
and lambda are flat buffers cut into pieces (``prior.FlatLayout``), the parameters and their
gradients are cut the same way, and the noise comes from one generator. No step loops over
parameters in Python. The sampler knows nothing of tasks: it sees a model, a batch stream and
a loss function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bayestune import files
from bayestune.models.base import move_batch, resolve_device
from bayestune.prior import FlatLayout, LaplaceGammaPrior
from bayestune.running_stats import RunningStats

log = logging.getLogger(__name__)

VARIANTS = ("adamw", "sgld")
# On the CPU the update runs block by block over pieces of the parameters, so that a block's
# arrays stay in cache through all the ops; a GPU takes whole tensors in one multi-tensor op.
CPU_PIECE, CPU_BLOCK = 1 << 16, 1 << 17
CHECKPOINT_VERSION = 2  # 2: the running statistics are checkpoint attachments
# Fields that do not change the samples: a checkpoint may be resumed with other values.
_RESUMABLE_CHANGES = ("steps", "checkpoint_every")


class SamplerConfigError(ValueError):
    """A sampler setting that cannot work (bad range, no samples, unknown variant)."""


class SamplingDivergedError(RuntimeError):
    """The loss or lambda became NaN or infinite; carries the step and the parameter name."""

    def __init__(self, message: str, *, step: int, name: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.name = name


@dataclass
class SamplerConfig:
    steps: int = field(default=20000, metadata={"help": "optimiser steps in all (stage 1)"})
    warmup_steps: int = field(default=10000, metadata={
        "help": "W: steps of plain fine-tuning (no prior, no noise, lambda fixed) before SGLD"})
    burnin_steps: int = field(default=12000, metadata={
        "help": "B: first step whose lambda enters the posterior mean (W <= B < steps)"})
    thinning: int = field(default=100, metadata={
        "help": "T: after step B, one lambda sample every T steps"})
    temperature: float = field(default=1e12, metadata={
        "help": "N: effective data size dividing the prior and setting the noise scale"})
    alpha: float = field(default=0.01, metadata={"help": "Gamma shape of the prior on lambda"})
    beta: float = field(default=100.0, metadata={"help": "Gamma rate of the prior on lambda"})
    lambda_init: float = field(default=1e-4, metadata={"help": "initial value of every lambda"})
    lambda_floor: float = field(default=1e-8, metadata={
        "help": "lambda is used as max(lambda, floor)"})
    lr_theta: float = field(default=1e-4, metadata={
        "help": "step size of theta (AdamW lr, or SGLD eta); also sets the theta noise"})
    lr_lambda: float = field(default=1e-2, metadata={
        "help": "step size of lambda (Adam lr, or SGLD eta); also sets the lambda noise"})
    weight_decay: float = field(default=0.0, metadata={
        "help": "AdamW decoupled weight decay of theta (variant adamw only)"})
    variant: str = field(default="adamw", metadata={
        "help": "adamw: noisy gradients handed to AdamW (theta) and Adam (lambda), as the "
                "reference; sgld: plain x <- x - eta*grad + sqrt(2 eta/N) xi"})
    noise_discount: float = field(default=1.0, metadata={
        "help": "factor on every noise term (1 = exact SGLD, 0 = no noise)"})
    grad_clip: float = field(default=1.0, metadata={
        "help": "max norm of the data-loss gradient, clipped before prior and noise (0 = off)"})
    checkpoint_every: int = field(default=200, metadata={
        "help": "steps between checkpoints when a checkpoint path is given (0 = only at the end)"})
    autocast: bool = field(default=False, metadata={
        "help": "bf16 autocast of the forward pass on CUDA (ignored on the CPU)"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        problems = []
        if self.steps < 1:
            problems.append(f"steps={self.steps} must be >= 1")
        if not 0 <= self.warmup_steps <= self.burnin_steps:
            problems.append(f"need 0 <= warmup_steps <= burnin_steps, got warmup_steps="
                            f"{self.warmup_steps}, burnin_steps={self.burnin_steps}")
        if self.burnin_steps >= self.steps:
            problems.append(f"burnin_steps={self.burnin_steps} >= steps={self.steps} leaves no "
                            "lambda sample; raise steps or lower burnin_steps")
        if self.thinning < 1:
            problems.append(f"thinning={self.thinning} must be >= 1")
        for name in ("temperature", "alpha", "beta", "lambda_init", "lambda_floor",
                     "lr_theta", "lr_lambda"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name}={value} must be a finite number > 0")
        for name in ("weight_decay", "noise_discount", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                problems.append(f"{name}={value} must be a finite number >= 0")
        if self.checkpoint_every < 0:
            problems.append(f"checkpoint_every={self.checkpoint_every} must be >= 0")
        if self.variant == "sgld" and self.weight_decay > 0:
            problems.append("weight_decay applies to variant adamw only; set it to 0 for sgld")
        if self.variant not in VARIANTS:
            problems.append(f"variant={self.variant!r} is not one of {', '.join(VARIANTS)}")
        if problems:
            raise SamplerConfigError("bad sampler config: " + "; ".join(problems))

    @property
    def n_samples(self) -> int:
        """Number of lambda samples a complete run averages."""
        return len(range(self.burnin_steps, self.steps, self.thinning))

    def prior(self) -> LaplaceGammaPrior:
        return LaplaceGammaPrior(alpha=self.alpha, beta=self.beta,
                                 temperature=self.temperature, floor=self.lambda_floor)

    def phase(self, step: int) -> str:
        if step < self.warmup_steps:
            return "warm-up"
        return "burn-in" if step < self.burnin_steps else "sampling"


@dataclass
class ScaleResult:
    mean: dict[str, Tensor]   # posterior mean of max(lambda, floor), per parameter tensor
    var: dict[str, Tensor]    # unbiased sample variance (zeros with a single sample)
    n_samples: int
    steps: int

    def metadata(self, config: SamplerConfig, *, seed: int, model_id: str) -> dict[str, Any]:
        """What the scale file records besides the tensors (files.py adds the version)."""
        return {**dataclasses.asdict(config), "model_id": model_id, "seed": seed,
                "n_samples": self.n_samples, "steps": self.steps}


def write_scale_file(path: str | Path, result: ScaleResult, config: SamplerConfig, *,
                     seed: int, model_id: str, provenance: dict | None = None) -> None:
    files.save_scales(path, result.mean, result.metadata(config, seed=seed, model_id=model_id),
                      provenance)


# --- the sampler's state and its step --------------------------------------------------------
class Sampler:
    """The whole state of one stage-1 run; :meth:`advance` takes one step of the schedule."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict], Tensor],
                 config: SamplerConfig, seed: int, device: torch.device, *,
                 scratch_dir: Path | None = None) -> None:
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
        self.model, self.loss_fn, self.config, self.device = model, loss_fn, config, device
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
        # The hot path works piece by piece; lambda's pieces are what its optimiser updates,
        # in place in lam_flat.
        self.theta_pieces = self.layout.pieces([p.detach() for p in self.params])
        self.theta0_pieces = self.layout.flat_pieces(self.theta0_flat)
        self.lam_pieces = [v.requires_grad_() for v in self.layout.flat_pieces(self.lam_flat)]
        self.blocks = self.layout.groups(CPU_BLOCK if on_cpu else None)
        self.opt_theta, self.opt_lam = self._optimisers()
        self.noise = torch.Generator(device=device)
        self.noise.manual_seed(seed ^ 0x5EED5EED)  # a stream apart from dropout's
        c = config.noise_discount
        self.noise_theta = c * math.sqrt(2.0 / (config.temperature * config.lr_theta))
        self.noise_lam = c * math.sqrt(2.0 / (config.temperature * config.lr_lambda))
        self.use_autocast = config.autocast and device.type == "cuda"
        if config.autocast and not self.use_autocast:
            log.warning("autocast is for CUDA only; running in full precision on %s", device)
        self.step = self.epoch = self.position = 0
        self.scratch_dir = scratch_dir  # where the running statistics' scratch file goes
        self.stats: RunningStats | None = None  # made by the first sample

    @property
    def count(self) -> int:
        """Number of lambda samples recorded."""
        return self.stats.count if self.stats is not None else 0

    def _new_stats(self) -> RunningStats:
        return RunningStats(self.layout.numel, in_memory=self.device.type == "cuda",
                            directory=self.scratch_dir)

    def close(self) -> None:
        """Drop the scratch file of the running statistics (also done when collected)."""
        if self.stats is not None:
            self.stats.close()

    def _optimisers(self) -> tuple[torch.optim.Optimizer | None, torch.optim.Optimizer | None]:
        if self.config.variant == "sgld":
            return None, None
        fast = ({"fused": True} if self.device.type in ("cpu", "cuda")
                else {"foreach": True})
        theta = torch.optim.AdamW(self.params, lr=self.config.lr_theta,
                                  weight_decay=self.config.weight_decay, **fast)
        lam = torch.optim.Adam(self.lam_pieces, lr=self.config.lr_lambda, **fast)
        return theta, lam

    # --- one optimiser step -------------------------------------------------------------------
    def advance(self, batch: dict) -> float:
        """One step of the schedule: update, check lambda, maybe record a sample; the loss."""
        step, config = self.step, self.config
        loss_value = self.train_step(batch)
        self.check_lambda()
        if step >= config.burnin_steps and (step - config.burnin_steps) % config.thinning == 0:
            self.record_sample()
        self.step, self.position = step + 1, self.position + 1
        return loss_value

    def train_step(self, batch: dict) -> float:
        """One optimiser step; returns the loss (checked before the update touches theta)."""
        sgld = self.step >= self.config.warmup_steps
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
        with torch.no_grad():
            grads = self._grads(fill_missing=sgld)
            if self.config.grad_clip > 0:  # the data gradient only, as the reference
                nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
            lam_grads = self._posterior_terms(grads) if sgld else None
            self._update(grads, lam_grads)
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

    def _posterior_terms(self, grads: list[Tensor]) -> list[Tensor]:
        """Add noise and prior to the theta gradients; return lambda's gradient, by piece.

        Per block: theta noise, prior, lambda noise, each draw one ``normal_`` of the block's
        size from the sampler's generator (so the stream depends on the blocks, fixed per
        device type).
        """
        grad_pieces = self.layout.pieces(grads)
        lam_grads: list[Tensor] = []
        for block in self.blocks:
            sizes = self.layout.piece_sizes[block]
            noise = torch.empty(sum(sizes), device=self.device, dtype=self.lam_flat.dtype)
            noise_pieces = list(torch.split(noise, sizes))
            if self.noise_theta > 0:
                noise.normal_(generator=self.noise)
                torch._foreach_add_(grad_pieces[block], noise_pieces, alpha=self.noise_theta)
            lam_grad = self.prior.add_grads_(self.theta_pieces[block], self.theta0_pieces[block],
                                             self.lam_pieces[block], grad_pieces[block])
            if self.noise_lam > 0:
                noise.normal_(generator=self.noise)
                torch._foreach_add_(lam_grad, noise_pieces, alpha=self.noise_lam)
            lam_grads += lam_grad
        return lam_grads

    def _update(self, grads: list[Tensor], lam_grads: list[Tensor] | None) -> None:
        if self.opt_theta is not None:
            self.opt_theta.step()
            if lam_grads is not None:
                for piece, grad in zip(self.lam_pieces, lam_grads, strict=True):
                    piece.grad = grad
                self.opt_lam.step()
                for piece in self.lam_pieces:
                    piece.grad = None
            return
        params = [p for p in self.params if p.grad is not None]
        torch._foreach_add_(params, grads, alpha=-self.config.lr_theta)
        if lam_grads is not None:
            torch._foreach_add_(self.lam_pieces, lam_grads, alpha=-self.config.lr_lambda)

    # --- samples and checks -------------------------------------------------------------------
    @torch.no_grad()
    def record_sample(self) -> None:
        """Welford update of the running mean and M2 with max(lambda, floor), block by block
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
        if self.step < self.config.warmup_steps or torch.isfinite(self.lam_flat.sum()):
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
        var = self.stats.region(1)
        var = var.div_(self.count - 1) if self.count > 1 else var.zero_()
        return ScaleResult(mean=mean, var=self._named(var), n_samples=self.count,
                           steps=self.step)

    def _named(self, flat: Tensor) -> dict[str, Tensor]:
        return {n: v.clone() for n, v in zip(self.names, self.layout.views(flat), strict=True)}

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self, seed: int) -> dict[str, Any]:
        """Everything to resume from; "mean" and "m2" name the attachments (see
        :meth:`attachments`) that hold the running statistics, None before the first sample."""
        regions = RunningStats.REGIONS if self.stats is not None else (None, None)
        return {
            "version": CHECKPOINT_VERSION, "seed": seed, "config": _resume_key(self.config),
            "names": self.names, "shapes": [list(s) for s in self.shapes],
            "pieces": self.layout.piece_sizes,
            "step": self.step, "epoch": self.epoch, "position": self.position,
            "model": self.model.state_dict(),
            "theta0": self.theta0_flat, "lam": self.lam_flat,
            "opt_theta": self.opt_theta.state_dict() if self.opt_theta else None,
            "opt_lam": self.opt_lam.state_dict() if self.opt_lam else None,
            "count": self.count, "mean": regions[0], "m2": regions[1],
            "noise_rng": self.noise.get_state(),
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }

    def attachments(self) -> dict[str, Callable[[BinaryIO], None]]:
        """Writers of the running statistics, streamed into the checkpoint file."""
        if self.stats is None:
            return {}
        return {name: self.stats.writer(k) for k, name in enumerate(RunningStats.REGIONS)}

    def save_checkpoint(self, path: Path, seed: int) -> None:
        files.save_checkpoint(path, self.state_dict(seed), self.attachments())

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any], seed: int, path: Path) -> None:
        """Restore everything but torch's global RNG (see :func:`_restore_global_rng`); the
        running statistics come from the attachments of the checkpoint file at ``path``."""
        _check_resumable(state, self, seed, path)
        self.model.load_state_dict(state["model"])
        self.theta0_flat.copy_(state["theta0"])
        self.lam_flat.copy_(state["lam"])
        if self.opt_theta is not None:
            self.opt_theta.load_state_dict(state["opt_theta"])
            self.opt_lam.load_state_dict(state["opt_lam"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.noise.set_state(state["noise_rng"])
        self.close()
        self.stats = None
        if state["count"] > 0:
            self.stats = self._new_stats()
            self.stats.count = state["count"]
            for k, name in enumerate((state["mean"], state["m2"])):
                with files.open_checkpoint_attachment(path, name) as stream:
                    self.stats.load(k, stream, path)


def _resume_key(config: SamplerConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in _RESUMABLE_CHANGES}


def _check_resumable(state: dict[str, Any], sampler: Sampler, seed: int, path: Path) -> None:
    fix = f"delete {path} to start over, or resume with the settings that wrote it"
    if state.get("version") != CHECKPOINT_VERSION:
        raise files.FileFormatError(f"{path}: not a sampler checkpoint of this version; {fix}")
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
    if state["pieces"] != sampler.layout.piece_sizes:  # lambda's optimiser state is by piece
        raise SamplerConfigError(f"{path} was written on another device type (cpu vs cuda); "
                                 f"resume it on the same kind of device, or {fix}")
    if state["step"] > sampler.config.steps:
        raise SamplerConfigError(f"{path} is at step {state['step']}, past steps="
                                 f"{sampler.config.steps}; {fix}")


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
) -> ScaleResult:
    """Run stage 1 and return the posterior mean (and variance) of the scales lambda.

    ``batches(epoch)`` must yield the same batches for the same epoch; epochs are cycled until
    ``config.steps`` optimiser steps are done. With ``checkpoint_path``, the whole state is saved
    every ``config.checkpoint_every`` steps and at the end, and an existing checkpoint there is
    resumed from: a resumed run gives the same result as an uninterrupted one. The model is
    moved to ``device`` and left there, holding the last sample of theta.
    """
    config.validate()
    dev = resolve_device(device)
    model.to(dev).train()
    scratch = Path(checkpoint_path).parent if checkpoint_path is not None else None
    sampler = Sampler(model, loss_fn, config, seed, dev, scratch_dir=scratch)
    try:
        return _run(sampler, batches, checkpoint_path, seed, progress)
    finally:
        sampler.close()


def _run(sampler: Sampler, batches: Callable[[int], Iterable[dict]],
         checkpoint_path: Path | None, seed: int, progress: bool) -> ScaleResult:
    config, dev = sampler.config, sampler.device
    state = files.load_checkpoint(checkpoint_path) if checkpoint_path is not None else None
    if state is not None:
        sampler.load_state_dict(state, seed, Path(checkpoint_path))
        log.info("stage 1 resumed from step %d (checkpoint %s)", sampler.step, checkpoint_path)
    else:
        torch.manual_seed(seed)  # dropout
    with tqdm(total=config.steps, initial=sampler.step, disable=not progress,
              desc="stage 1", dynamic_ncols=True) as bar:
        while sampler.step < config.steps:
            epoch_batches = _epoch_iter(batches, sampler)
            if state is not None:
                _restore_global_rng(state)
                state = None
            for batch in epoch_batches:
                loss_value = sampler.advance(move_batch(batch, dev))
                bar.update(1)
                bar.set_postfix(phase=config.phase(sampler.step - 1), loss=f"{loss_value:.4g}",
                                refresh=False)
                _maybe_checkpoint(sampler, checkpoint_path, seed)
                if sampler.step >= config.steps:
                    break
            else:
                sampler.epoch, sampler.position = sampler.epoch + 1, 0
    return sampler.result()


def _epoch_iter(batches: Callable[[int], Iterable[dict]], sampler: Sampler) -> Iterable[dict]:
    """The rest of the current epoch, skipping the batches a resumed run already used."""
    it = iter(batches(sampler.epoch))
    skipped = sum(1 for _ in itertools.islice(it, sampler.position))
    if skipped < sampler.position:
        raise ValueError(f"epoch {sampler.epoch} has {skipped} batches but the checkpoint had "
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
        raise ValueError(f"batches({epoch}) yielded no batches; is the training split empty?")


def _maybe_checkpoint(sampler: Sampler, path: Path | None, seed: int) -> None:
    every, step = sampler.config.checkpoint_every, sampler.step
    if path is None or not (step == sampler.config.steps or (every and step % every == 0)):
        return
    sampler.save_checkpoint(Path(path), seed)

"""The whole state of one stage-1 chain and its step (:class:`Sampler`): the fused step over
flat pieces and the per-tensor step of the authors' code, the length rule, the samples and
the checks on the loss and lambda. Saving and resuming the state is in
:mod:`bayestune.sampler.checkpoint`, the loop around the steps in :mod:`bayestune.sampler.run`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from bayestune.noise import BlockNoise
from bayestune.optim import (
    LengthRule,
    TransformersAdamW,
    jiant_schedule,
    no_decay_names,
    schedule_length,
)
from bayestune.prior import FlatLayout
from bayestune.running_stats import RunningStats
from bayestune.sampler.checkpoint import SamplerCheckpoint
from bayestune.sampler.config import SamplerConfig, SamplerConfigError, SamplingDivergedError
from bayestune.sampler.result import ScaleResult

log = logging.getLogger("bayestune.sampler")

# On the CPU the update runs block by block over pieces of the parameters, so that a block's
# arrays stay in cache through all the ops; a GPU takes whole tensors, in blocks that bound the
# temporaries (noise, lambda's gradient) to a block's size instead of the model's.
CPU_PIECE, CPU_BLOCK = 1 << 16, 1 << 17
GPU_BLOCK = 1 << 25
# Entries of lambda the logged quantiles are read from (see Sampler.lambda_summary).
LOG_QUANTILE_ENTRIES = 1 << 20


# --- the sampler's state and its step --------------------------------------------------------
NoiseFn = Callable[[str, int, Tensor], Tensor]


class ChainMonitor(Protocol):
    """What the sampler calls around each step (see bayestune.diagnostics)."""

    def attach(self, sampler: Sampler) -> None: ...

    def before_step(self, sampler: Sampler) -> None: ...

    def after_step(self, sampler: Sampler) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any] | None, *, resumed_at: int) -> None: ...


class Sampler(SamplerCheckpoint):
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
                 inputs: Mapping[str, Any] | None = None,
                 train_size: int | None = None) -> None:
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
        self.prior = config.prior(train_size)  # train_size: lambda_temperature=train-size
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
        self.noise_lam = c * math.sqrt(2.0 / (self.prior.n_lambda * config.lr_lambda))
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


def _nonfinite_names(names: Sequence[str], tensors: Sequence[Tensor]) -> list[str]:
    return [n for n, t in zip(names, tensors, strict=True) if not torch.isfinite(t).all()]


def _first_nonfinite(names: Sequence[str], tensors: Sequence[Tensor]) -> str | None:
    bad = _nonfinite_names(names, tensors)
    return bad[0] if bad else None


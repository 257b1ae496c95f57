"""Stage 2: fine-tune only the masked scalars (or everything), pick the best step on val.

With a mask, the trainable scalars live in packed flat vectors that AdamW owns (one per weight
decay group), so optimiser state exists only for them and weight decay cannot touch a frozen
scalar (the authors' AdamW decays every scalar, which leaks past the mask). Each tensor's
gradient is gathered into the packed gradient by a post-accumulate hook and freed at once, so
at most one dense gradient is alive at a time; after the step the new values are scattered back
in place. Tensors without a selected scalar get ``requires_grad=False`` and cost no gradient at
all. Without a mask, every parameter with ``requires_grad`` is trained by plain AdamW (full
fine-tuning, or LoRA where peft has frozen the base).

Two schedules (``FinetuneConfig.schedule``):

* ``linear``: torch's AdamW with weight decay on every trainable scalar, linear warm-up over
  ``warmup_ratio`` of ``max_steps``, then linear decay to 0 at ``max_steps``; validation every
  ``eval_every`` steps and at the end, stop after ``patience`` evaluations without a better one.
* ``reference``: the authors' stage 2 (jiant): the AdamW of transformers 3/4 with no decay on
  biases and LayerNorm weights, jiant's ramp over ``epochs`` x steps per epoch, jiant's
  evaluation steps and early stopping with ``min_steps``, one more evaluation at the end.

Either way the best step is chosen on the first ``val_subset`` validation examples (0: all of
them), and the reported validation score is that step's score on the whole split.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from bayestune.errors import ConfigError, DataError
from bayestune.files import check_matches_model
from bayestune.models.base import TaskModel, move_batch, resolve_device
from bayestune.optim import (
    LengthRule,
    TransformersAdamW,
    jiant_schedule,
    linear_schedule_with_warmup,
    no_decay_names,
    schedule_length,
)
from bayestune.tasks.base import TaskData, TaskSpec, evaluate, val_scorer

SCHEDULES = ("linear", "reference")

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    schedule: str = field(default="linear", metadata={
        "help": "linear: warm-up over warmup_ratio of max_steps, decay to 0 at max_steps; "
                "reference: the authors' jiant ramp over epochs x steps per epoch, their "
                "AdamW (no decay on biases and LayerNorm weights) and their early stopping",
        "choices": SCHEDULES})
    lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.01, metadata={
        "help": "decoupled AdamW weight decay, applied to trainable scalars only (reference: "
                "not to biases and LayerNorm weights)"})
    max_steps: int = field(default=2000, metadata={
        "help": "number of optimiser steps at most (reference: 0 = until the schedule ends)"})
    min_steps: int = field(default=0, metadata={
        "help": "never stop early before this many steps"})
    eval_every: int = field(default=200, metadata={
        "help": "evaluate on the validation split every this many steps (and at the end)"})
    patience: int = field(default=5, metadata={
        "help": "stop after this many evaluations without a better validation score"})
    val_subset: int = field(default=0, metadata={
        "help": "choose the best step on the first this many validation examples (0: all)"})
    warmup_ratio: float = field(default=0.06, metadata={
        "help": "fraction of the schedule's length spent in linear warm-up (linear: of "
                "max_steps; reference: of epochs x steps per epoch)"})
    epochs: int = field(default=10000, metadata={
        "help": "reference schedule: its length in epochs of the training split"})
    grad_clip: float = field(default=1.0, metadata={
        "help": "clip the norm of the trainable gradient to this (0 disables)"})
    autocast: bool = field(default=False, metadata={
        "help": "run forward and backward under bfloat16 autocast"})

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        least_steps = 0 if self.schedule == "reference" else 1
        if self.max_steps < least_steps or self.eval_every < 1 or self.patience < 1:
            raise ConfigError(f"max_steps (>= {least_steps}), eval_every and patience must be "
                              "at least 1 (got "
                              f"{self.max_steps}, {self.eval_every}, {self.patience})")
        if self.min_steps < 0 or self.val_subset < 0 or self.epochs < 1:
            raise ConfigError(f"min_steps and val_subset must be >= 0 and epochs >= 1 (got "
                              f"{self.min_steps}, {self.val_subset}, {self.epochs})")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio {self.warmup_ratio} must be in [0, 1)")
        # The schema's bounds, for the command line too: lr 0 would train nothing and exit 0.
        from bayestune.guards import check_nonnegative, check_positive

        problems = [check_positive("lr", self.lr),
                    *(check_nonnegative(name, getattr(self, name))
                      for name in ("weight_decay", "grad_clip"))]
        if any(problems):
            raise ConfigError("; ".join(p for p in problems if p))


@dataclass
class FinetuneResult:
    val_score: float
    test_score: float
    best_step: int
    steps: int
    n_trainable: int
    n_total: int
    trainable_fraction: float
    wall_seconds: float
    history: list[tuple[int, float, float]] = field(default_factory=list)


def _decay_groups(named: list[tuple[str, torch.Tensor]], weight_decay: float,
                  exempt: set[str]) -> list[dict]:
    """AdamW groups: decay for the parameters not in ``exempt``, none for those in it."""
    groups = [{"params": [p for n, p in named if (n in exempt) == no_decay], "weight_decay": wd}
              for no_decay, wd in ((False, weight_decay), (True, 0.0))]
    return [g for g in groups if g["params"]]


def _adamw(groups: list[dict], lr: float, authors: bool) -> torch.optim.Optimizer:
    if authors:
        return TransformersAdamW(groups, lr=lr, eps=1e-8)
    return torch.optim.AdamW(groups, lr=lr)


class FullUpdater:
    """AdamW on every parameter that requires grad; ``exempt`` names get no weight decay and
    ``authors`` picks the authors' AdamW (see :class:`bayestune.optim.TransformersAdamW`)."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, *,
                 exempt: set[str] = frozenset(), authors: bool = False) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        if not self.params:
            raise ValueError("the model has no parameter with requires_grad; nothing to train")
        self.optimizer = _adamw(_decay_groups(named, weight_decay, exempt), lr, authors)
        self.n_trainable = sum(p.numel() for p in self.params)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def clip(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, max_norm)

    def step(self) -> None:
        self.optimizer.step()

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def restore(self, state: list[torch.Tensor]) -> None:
        for p, saved in zip(self.params, state, strict=True):
            p.copy_(saved)

    def close(self) -> None:
        pass


class MaskedUpdater:
    """AdamW on the masked scalars only, packed into one flat vector per weight-decay group
    (one vector unless ``exempt`` names parameters that get no decay)."""

    def __init__(self, model: nn.Module, mask: Mapping[str, torch.Tensor], lr: float,
                 weight_decay: float, *, exempt: set[str] = frozenset(),
                 authors: bool = False) -> None:
        named = dict(model.named_parameters())
        check_matches_model(mask, {n: p.shape for n, p in named.items()}, "mask", "mask")
        # slots[k]: (parameter, selected flat indices, pack number, start, end in that pack)
        self.slots: list[tuple[nn.Parameter, torch.Tensor, int, int, int]] = []
        sizes = [0, 0]  # scalars in the decayed pack and in the exempt one
        for name, param in named.items():
            idx = torch.nonzero(mask[name].reshape(-1).to(param.device)).squeeze(1)
            param.requires_grad_(idx.numel() > 0)
            if idx.numel() == 0:
                continue
            if not param.is_contiguous():
                raise ValueError(f"parameter {name} is not contiguous; masked updates need it")
            pack = int(name in exempt)
            self.slots.append((param, idx, pack, sizes[pack], sizes[pack] + idx.numel()))
            sizes[pack] += idx.numel()
        if sum(sizes) == 0:
            raise ConfigError("the mask selects no scalar; raise the budget or use --keep-head")
        with torch.no_grad():
            packs = [torch.cat([p.view(-1)[idx] for p, idx, k, _, _ in self.slots if k == pack])
                     .float() if sizes[pack] else None for pack in (0, 1)]
        self.packs: list[nn.Parameter | None] = [
            nn.Parameter(v) if v is not None else None for v in packs]
        groups = []
        for pack, wd in zip(self.packs, (weight_decay, 0.0), strict=True):
            if pack is not None:
                pack.grad = torch.zeros_like(pack)
                groups.append({"params": [pack], "weight_decay": wd})
        self.optimizer = _adamw(groups, lr, authors)
        self.n_trainable = sum(sizes)
        self._hooks = [param.register_post_accumulate_grad_hook(self._gather_hook(idx, k, s, e))
                       for param, idx, k, s, e in self.slots]

    @property
    def packed(self) -> nn.Parameter:
        """The packed trainable scalars when they share one decay group (no exempt names)."""
        live = [p for p in self.packs if p is not None]
        if len(live) != 1:
            raise AttributeError("the trainable scalars are packed by decay group: use .packs")
        return live[0]

    def _live(self) -> list[nn.Parameter]:
        return [p for p in self.packs if p is not None]

    def _gather_hook(self, idx: torch.Tensor, pack: int, start: int, end: int):
        def hook(param: torch.Tensor) -> None:
            # Keep only the masked entries and free the dense gradient straight away.
            self.packs[pack].grad[start:end] += param.grad.view(-1)[idx].float()
            param.grad = None
        return hook

    def zero_grad(self) -> None:
        for pack in self._live():
            pack.grad.zero_()

    def clip(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self._live(), max_norm)

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        self._scatter(self.packs)

    def _scatter(self, values: list[torch.Tensor | None]) -> None:
        for param, idx, pack, start, end in self.slots:
            param.view(-1).index_copy_(0, idx, values[pack][start:end].to(param.dtype))

    def snapshot(self) -> list[torch.Tensor | None]:
        return [p.detach().clone() if p is not None else None for p in self.packs]

    @torch.no_grad()
    def restore(self, state: list[torch.Tensor | None]) -> None:
        for pack, saved in zip(self.packs, state, strict=True):
            if pack is not None:
                pack.copy_(saved)
        self._scatter(self.packs)

    def close(self) -> None:
        """Detach the gradient hooks, so later backward passes leave the model alone."""
        for handle in self._hooks:
            handle.remove()


def make_updater(model: nn.Module, mask: Mapping[str, torch.Tensor] | None,
                 config: FinetuneConfig) -> FullUpdater | MaskedUpdater:
    authors = config.schedule == "reference"
    options = {"exempt": no_decay_names(model) if authors else frozenset(), "authors": authors}
    if mask is None:
        return FullUpdater(model, config.lr, config.weight_decay, **options)
    return MaskedUpdater(model, mask, config.lr, config.weight_decay, **options)


def train_step(model: nn.Module, batch: dict, updater: FullUpdater | MaskedUpdater,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None, config: FinetuneConfig,
               device: torch.device) -> float:
    """One optimiser step on one batch; returns the batch loss."""
    updater.zero_grad()
    cast = (torch.autocast(device.type, dtype=torch.bfloat16) if config.autocast
            else nullcontext())
    with cast:
        loss = model(move_batch(batch, device)).loss
    loss.backward()
    if config.grad_clip > 0:
        updater.clip(config.grad_clip)
    updater.step()
    if scheduler is not None:
        scheduler.step()
    return float(loss.detach())


def _train_batches(data: TaskData) -> Iterable[dict]:
    epoch = 0
    while True:
        empty = True
        for batch in data.train_epoch(epoch):
            empty = False
            yield batch
        if empty:
            raise DataError("the training loader yields no batch; check the prepared train split")
        epoch += 1


def _schedule(updater: FullUpdater | MaskedUpdater, config: FinetuneConfig,
              data: TaskData) -> tuple[torch.optim.lr_scheduler.LRScheduler, int]:
    """The learning-rate schedule and the most steps the run may take."""
    if config.schedule == "linear":
        return linear_schedule_with_warmup(
            updater.optimizer, int(config.warmup_ratio * config.max_steps),
            config.max_steps), config.max_steps
    steps_per_epoch = len(data.train)
    scheduler = jiant_schedule(updater.optimizer, epochs=config.epochs,
                               steps_per_epoch=steps_per_epoch, warmup_ratio=config.warmup_ratio)
    total = schedule_length(config.epochs, steps_per_epoch)
    return scheduler, min(config.max_steps, total) if config.max_steps else total


def finetune(
    model: TaskModel,
    data: TaskData,
    spec: TaskSpec,
    config: FinetuneConfig,
    *,
    mask: Mapping[str, torch.Tensor] | None,
    seed: int,
    device: str = "auto",
    progress: bool = True,
    score_test: bool = True,
    log_every: int = 0,
) -> FinetuneResult:
    """Train, keep the best validation step, restore it and score it on test.

    The model is left holding the best parameters; frozen scalars are never written. Without
    ``score_test`` the test split is not touched (``test_score`` is NaN): a candidate that
    selection may not choose must not see it. ``log_every`` > 0 logs a line (step, mean loss
    since the last line, learning rate, the validation score when one was taken) every this
    many steps, after each validation and at the end.
    """
    torch.manual_seed(seed)  # dropout masks
    start = time.perf_counter()
    dev = resolve_device(device)
    model.to(dev).train()
    updater = make_updater(model, mask, config)
    scheduler, limit = _schedule(updater, config, data)
    score = val_scorer(data, spec, config.val_subset, dev)
    reference = config.schedule == "reference"
    rule = LengthRule(config.min_steps, config.patience, config.eval_every)
    history: list[tuple[int, float, float]] = []
    best_state, step, losses = None, 0, []
    logged: list[float] = []  # losses since the last log line

    def validate() -> float:
        nonlocal best_state, losses
        val = score(model)
        history.append((step, sum(losses) / max(len(losses), 1), val))
        bar.set_postfix(loss=f"{history[-1][1]:.4f}", val=f"{val:.4f}")
        losses = []
        if rule.record(val, step):
            best_state = updater.snapshot()
        return val

    def log_line(val: float | None) -> None:
        nonlocal logged
        lr = updater.optimizer.param_groups[0]["lr"]
        line = (f"finetune {spec.name} step {step}/{limit}: loss "
                f"{sum(logged) / max(len(logged), 1):.4f}, lr {lr:.3g}")
        if val is not None:
            best = " (best)" if rule.best_step == step else ""
            line += f", validation {val:.4f}{best}"
        log.info("%s", line)
        logged = []

    bar = tqdm(total=limit, desc=f"finetune {spec.name}", disable=not progress)
    lines_above = logging_redirect_tqdm() if progress else nullcontext()
    with lines_above:
        for batch in _train_batches(data):
            loss = train_step(model, batch, updater, scheduler, config, dev)
            losses.append(loss)
            logged.append(loss)
            step += 1
            bar.update(1)
            # jiant validates when step + 1 is a multiple of eval_every, and once more at the end
            due = rule.due(step) if reference else (step % config.eval_every == 0
                                                    or step == limit)
            val = validate() if due else None
            if log_every and (val is not None or step % log_every == 0):
                log_line(val)
            if step >= limit or rule.should_stop(step):
                break
        final = (validate() if reference and (not history or history[-1][0] != step)
                 else None)
        if log_every and (logged or final is not None):  # the steps since the last line
            log_line(final)
    bar.close()
    updater.restore(best_state)
    updater.close()
    val_score = float(rule.best)
    if config.val_subset:
        val_score = evaluate(model, data.val, spec, dev)  # the chosen step on the whole split
    test = evaluate(model, data.test, spec, dev) if score_test else float("nan")
    n_total = sum(p.numel() for p in model.parameters())
    return FinetuneResult(
        val_score=val_score, test_score=test, best_step=rule.best_step, steps=step,
        n_trainable=updater.n_trainable, n_total=n_total,
        trainable_fraction=updater.n_trainable / n_total,
        wall_seconds=time.perf_counter() - start, history=history)

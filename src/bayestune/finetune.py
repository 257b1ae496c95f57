"""Stage 2: fine-tune only the masked scalars (or everything), pick the best step on val.

With a mask, the trainable scalars live in ONE packed flat vector that AdamW owns, so optimiser
state exists only for them and weight decay cannot touch a frozen scalar (the reference's AdamW
decays every scalar, which leaks past the mask). Each tensor's gradient is gathered into the
packed gradient by a post-accumulate hook and freed at once, so at most one dense gradient is
alive at a time; after the step the new values are scattered back in place. Tensors without a
selected scalar get ``requires_grad=False`` and cost no gradient at all. Without a mask, every
parameter with ``requires_grad`` is trained by plain AdamW (full fine-tuning, or LoRA where peft
has frozen the base).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from bayestune.errors import ConfigError, DataError
from bayestune.files import check_matches_model
from bayestune.models.base import TaskModel, move_batch, resolve_device
from bayestune.tasks.base import TaskData, TaskSpec, evaluate


@dataclass
class FinetuneConfig:
    lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.01, metadata={
        "help": "decoupled AdamW weight decay, applied to trainable scalars only"})
    max_steps: int = field(default=2000, metadata={"help": "number of optimiser steps at most"})
    eval_every: int = field(default=200, metadata={
        "help": "evaluate on the validation split every this many steps (and at the end)"})
    patience: int = field(default=5, metadata={
        "help": "stop after this many evaluations without a better validation score"})
    warmup_ratio: float = field(default=0.06, metadata={
        "help": "fraction of max_steps of linear learning-rate warm-up, then linear decay to 0"})
    grad_clip: float = field(default=1.0, metadata={
        "help": "clip the norm of the trainable gradient to this (0 disables)"})
    autocast: bool = field(default=False, metadata={
        "help": "run forward and backward under bfloat16 autocast"})

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.eval_every < 1 or self.patience < 1:
            raise ConfigError("max_steps, eval_every and patience must be at least 1 "
                              f"(got {self.max_steps}, {self.eval_every}, {self.patience})")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio {self.warmup_ratio} must be in [0, 1)")


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


class FullUpdater:
    """Plain AdamW on every parameter that requires grad."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no parameter with requires_grad; nothing to train")
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
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
    """AdamW on the masked scalars only, packed into one flat vector."""

    def __init__(self, model: nn.Module, mask: Mapping[str, torch.Tensor], lr: float,
                 weight_decay: float) -> None:
        named = dict(model.named_parameters())
        check_matches_model(mask, {n: p.shape for n, p in named.items()}, "mask", "mask")
        self.slots: list[tuple[nn.Parameter, torch.Tensor, int, int]] = []
        offset = 0
        for name, param in named.items():
            idx = torch.nonzero(mask[name].reshape(-1).to(param.device)).squeeze(1)
            param.requires_grad_(idx.numel() > 0)
            if idx.numel() == 0:
                continue
            if not param.is_contiguous():
                raise ValueError(f"parameter {name} is not contiguous; masked updates need it")
            self.slots.append((param, idx, offset, offset + idx.numel()))
            offset += idx.numel()
        if offset == 0:
            raise ConfigError("the mask selects no scalar; raise the budget or use --keep-head")
        with torch.no_grad():
            packed = torch.cat([p.view(-1)[idx] for p, idx, _, _ in self.slots]).float()
        self.packed = nn.Parameter(packed)
        self.packed.grad = torch.zeros_like(packed)
        self.optimizer = torch.optim.AdamW([self.packed], lr=lr, weight_decay=weight_decay)
        self.n_trainable = offset
        self._hooks = [param.register_post_accumulate_grad_hook(self._gather_hook(idx, s, e))
                       for param, idx, s, e in self.slots]

    def _gather_hook(self, idx: torch.Tensor, start: int, end: int):
        def hook(param: torch.Tensor) -> None:
            # Keep only the masked entries and free the dense gradient straight away.
            self.packed.grad[start:end] += param.grad.view(-1)[idx].float()
            param.grad = None
        return hook

    def zero_grad(self) -> None:
        self.packed.grad.zero_()

    def clip(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_([self.packed], max_norm)

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        self._scatter(self.packed)

    def _scatter(self, values: torch.Tensor) -> None:
        for param, idx, start, end in self.slots:
            param.view(-1).index_copy_(0, idx, values[start:end].to(param.dtype))

    def snapshot(self) -> torch.Tensor:
        return self.packed.detach().clone()

    @torch.no_grad()
    def restore(self, state: torch.Tensor) -> None:
        self.packed.copy_(state)
        self._scatter(self.packed)

    def close(self) -> None:
        """Detach the gradient hooks, so later backward passes leave the model alone."""
        for handle in self._hooks:
            handle.remove()


def make_updater(model: nn.Module, mask: Mapping[str, torch.Tensor] | None,
                 config: FinetuneConfig) -> FullUpdater | MaskedUpdater:
    if mask is None:
        return FullUpdater(model, config.lr, config.weight_decay)
    return MaskedUpdater(model, mask, config.lr, config.weight_decay)


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


def _better(score: float, best: float | None) -> bool:
    """Higher is better; NaN (e.g. a correlation of constant predictions) never wins."""
    if best is None:
        return True
    if math.isnan(score):
        return False
    return math.isnan(best) or score > best


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
) -> FinetuneResult:
    """Train, keep the best validation step, restore it and score it on test.

    The model is left holding the best parameters; frozen scalars are never written.
    """
    torch.manual_seed(seed)  # dropout masks
    start = time.perf_counter()
    dev = resolve_device(device)
    model.to(dev).train()
    updater = make_updater(model, mask, config)
    scheduler = get_linear_schedule_with_warmup(
        updater.optimizer, int(config.warmup_ratio * config.max_steps), config.max_steps)
    history: list[tuple[int, float, float]] = []
    best_score: float | None = None
    best_state, best_step, stale, step, losses = None, 0, 0, 0, []
    bar = tqdm(total=config.max_steps, desc=f"finetune {spec.name}", disable=not progress)
    for batch in _train_batches(data):
        losses.append(train_step(model, batch, updater, scheduler, config, dev))
        step += 1
        bar.update(1)
        if step % config.eval_every == 0 or step == config.max_steps:
            val = evaluate(model, data.val, spec, dev)
            history.append((step, sum(losses) / len(losses), val))
            bar.set_postfix(loss=f"{history[-1][1]:.4f}", val=f"{val:.4f}")
            losses = []
            if _better(val, best_score):
                best_score, best_state, best_step, stale = val, updater.snapshot(), step, 0
            else:
                stale += 1
            if stale >= config.patience:
                break
        if step >= config.max_steps:
            break
    bar.close()
    updater.restore(best_state)
    updater.close()
    test = evaluate(model, data.test, spec, dev)
    n_total = sum(p.numel() for p in model.parameters())
    return FinetuneResult(
        val_score=float(best_score), test_score=test, best_step=best_step, steps=step,
        n_trainable=updater.n_trainable, n_total=n_total,
        trainable_fraction=updater.n_trainable / n_total,
        wall_seconds=time.perf_counter() - start, history=history)

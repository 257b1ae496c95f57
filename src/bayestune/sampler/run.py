"""The stage-1 loop: :func:`sample_scales` runs a :class:`Sampler` over the batch stream,
resuming from and writing checkpoints, validating for the length rule and logging."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from bayestune import files
from bayestune.errors import DataError
from bayestune.models.base import move_batch, resolve_device
from bayestune.sampler.chain import ChainMonitor, Sampler
from bayestune.sampler.checkpoint import _restore_global_rng
from bayestune.sampler.config import SamplerConfig, SamplerConfigError
from bayestune.sampler.result import ScaleResult

log = logging.getLogger("bayestune.sampler")


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
    train_size: int | None = None,
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
    saw so far. ``inputs``: see :class:`Sampler`. ``train_size``: the number of training
    examples (needed by ``lambda_temperature=train-size``).
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
                      steps_per_epoch=steps_per_epoch, inputs=inputs, train_size=train_size)
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

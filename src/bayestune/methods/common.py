"""What the data-driven methods share: a working copy of the model, seeded randomness, the
first n training batches and the forward-backward passes over them, gradients, the checks on
what a method is given, and the cut of a method's scores into masks.

No method changes the model it is given: gradients and training happen on a deep copy, because
stage 2 restarts from exactly these weights (theta0) unless the method hands it a start.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bayestune.files import check_matches_model
from bayestune.masks import masks_from_scores
from bayestune.methods.config import Batches, LossFn, Masks, MethodConfig, ranking_options
from bayestune.methods.registry import MethodError
from bayestune.models.base import move_batch


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed dropout and friends for one method without disturbing the caller's RNG state."""
    devices = []
    if device.type == "cuda":
        devices = [torch.cuda.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def take(batches: Batches | None, n: int, desc: str) -> Iterator[dict]:
    """The first ``n`` training batches, running into later epochs when one epoch is short."""
    if batches is None:
        raise MethodError(f"{desc}: needs training batches; pass --data DIR (the prepared task)")
    if n < 1:
        raise MethodError(f"{desc}: needs at least one batch, got {n}; raise the step count")
    bar = tqdm(total=n, desc=desc, leave=False, disable=None)
    taken = 0
    for epoch in itertools.count():
        before = taken
        for batch in batches(epoch):
            yield batch
            taken += 1
            bar.update()
            if taken == n:
                bar.close()
                return
        if taken == before:
            raise MethodError(f"{desc}: batches({epoch}) yielded no batches; the training split "
                              "is empty or the loader drops every batch")


def backward_passes(work: nn.Module, batches: Batches | None, loss_fn: LossFn, n: int, desc: str,
                    *, grad_clip: float = 0.0) -> Iterator[None]:
    """One forward-backward pass per batch over the first ``n`` training batches, the
    gradients cleared before each and clipped to global norm ``grad_clip`` after it (0: not
    clipped); yields after each pass, so that the caller steps its optimiser or adds the
    gradients up. The caller seeds (:func:`seeded`)."""
    params = list(work.parameters())
    device = device_of(work)
    for batch in take(batches, n, desc):
        work.zero_grad(set_to_none=True)
        loss_fn(work, move_batch(batch, device)).backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        yield


def steps_per_epoch(batches: Batches) -> int:
    epoch = batches(0)
    return len(epoch) if hasattr(epoch, "__len__") else sum(1 for _ in epoch)


def working_copy(model: nn.Module, *, train: bool = True) -> nn.Module:
    """A deep copy with every parameter trainable, in training mode (dropout as in
    fine-tuning) unless ``train`` is False."""
    work = copy.deepcopy(model)
    work.requires_grad_(True)
    return work.train(train)


def gradients(work: nn.Module, loss_fn: LossFn, batch: dict) -> list[Tensor]:
    """Gradient of the batch loss per parameter; unused parameters (a pooler) get zeros."""
    params = list(work.parameters())
    loss = loss_fn(work, move_batch(batch, device_of(work)))
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def named(work: nn.Module, tensors: Iterable[Tensor]) -> dict[str, Tensor]:
    names = [n for n, _ in work.named_parameters()]
    return {n: t.detach().float().cpu() for n, t in zip(names, tensors, strict=True)}


def check_scores_fit(name: str, model: nn.Module, scores: Mapping[str, Tensor]) -> None:
    shapes = {n: p.shape for n, p in model.named_parameters()}
    check_matches_model(scores, shapes, f"scores given to {name}", "score")


def check_no_scores(name: str, scores: Mapping[str, Tensor] | None) -> None:
    if scores is not None:
        raise MethodError(f"method {name!r} computes its own ranking and takes no scores; drop "
                          "--scores (only bayestune reads a scale file)")


Scorer = Callable[[nn.Module, Batches | None, LossFn, int, MethodConfig], dict[str, Tensor]]


def ranked_masks(name: str, scorer: Scorer, model: nn.Module, batches: Batches | None,
                 loss_fn: LossFn, budgets: Sequence[float], seed: int, config: MethodConfig,
                 scores: Mapping[str, Tensor] | None) -> Masks:
    """The masks of a method that ranks a score it computes: its scores (or precomputed ones,
    a saved score file, which replace computing them again), checked against the model and
    cut at every budget with the method's ranking options."""
    if scores is None:
        scores = scorer(model, batches, loss_fn, seed, config)
    check_scores_fit(name, model, scores)
    return Masks(masks_from_scores(scores, budgets, **ranking_options(name, config)))

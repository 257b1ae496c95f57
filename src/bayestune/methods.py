"""Every way of choosing which scalars to fine-tune, behind one signature; LoRA through peft.

A mask method is ``method(model, batches, loss_fn, budgets, seed, config) -> {budget: mask}``
with ``batches(epoch)`` yielding training batches (``TaskData.train_epoch``), ``loss_fn`` the
task loss and ``mask`` a bool tensor per parameter (True = trainable). The score-based
methods only differ in the score they rank; the ranking itself (nested top-k, ties, budget
checks) lives in :func:`bayestune.masks.masks_from_scores`, so every method cuts the same way.

No method changes the model it is given: gradients and training happen on a deep copy,
because stage 2 restarts from exactly these weights (theta0).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bayestune.files import check_matches_model
from bayestune.masks import check_budget, masks_from_scores
from bayestune.models.base import TaskModel, is_head, move_batch

Batches = Callable[[int], Iterable[dict]]
LossFn = Callable[[nn.Module, dict], Tensor]
Mask = dict[str, Tensor]


@dataclass
class MethodConfig:
    magnitude_steps: int = field(default=200, metadata={
        "help": "magnitude (LT-SFT style): full fine-tuning steps before ranking |theta - theta0| "
                "(our default; LT-SFT trains its full phase for longer)"})
    magnitude_lr: float = field(default=2e-5, metadata={
        "help": "magnitude: AdamW learning rate of that full fine-tuning (the usual full "
                "fine-tuning rate for RoBERTa-base)"})
    fisher_batches: int = field(default=32, metadata={
        "help": "fisher (FISH mask): batches of squared gradients summed at theta0 (the FISH "
                "paper uses 1024 examples: 32 batches of 32)"})
    sam_steps: int = field(default=32, metadata={
        "help": "sam: batches whose gradients are accumulated at theta0 without updates (our "
                "default, the same data as fisher)"})
    per_tensor: bool = field(default=False, metadata={
        "help": "rank within each tensor instead of globally (bayestune, random, magnitude, "
                "fisher; sam always ranks per tensor)"})
    keep_head: bool = field(default=False, metadata={
        "help": "always train the task head (bayestune, random, magnitude, fisher; sam always "
                "keeps it)"})
    head_counts_toward_budget: bool = field(default=True, metadata={
        "help": "with a kept head, its scalars use up part of the budget"})


MaskMethod = Callable[
    [nn.Module, Batches, LossFn, Sequence[float], int, MethodConfig], dict[float, Mask]
]


# --- helpers -------------------------------------------------------------------------------
def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed dropout and friends for one method without disturbing the caller's RNG state."""
    devices = []
    if device.type == "cuda":
        devices = [torch.cuda.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _take(batches: Batches | None, n: int, desc: str) -> Iterator[dict]:
    """The first ``n`` training batches, running into later epochs when one epoch is short."""
    if batches is None:
        raise ValueError(f"{desc}: needs training batches; pass --data DIR (the prepared task)")
    if n < 1:
        raise ValueError(f"{desc}: needs at least one batch, got {n}; raise the step count")
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
            raise ValueError(f"{desc}: batches({epoch}) yielded no batches; the training split "
                             "is empty or the loader drops every batch")


def _trainable_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every parameter trainable, in training mode (dropout as in fine-tuning)."""
    work = copy.deepcopy(model)
    work.requires_grad_(True)
    return work.train()


def _gradients(work: nn.Module, loss_fn: LossFn, batch: dict) -> list[Tensor]:
    """Gradient of the batch loss per parameter; unused parameters (a pooler) get zeros."""
    params = list(work.parameters())
    loss = loss_fn(work, move_batch(batch, _device(work)))
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _named(work: nn.Module, tensors: Iterable[Tensor]) -> dict[str, Tensor]:
    names = [n for n, _ in work.named_parameters()]
    return {n: t.detach().float().cpu() for n, t in zip(names, tensors, strict=True)}


def _check_scores_fit(name: str, model: nn.Module, scores: Mapping[str, Tensor]) -> None:
    shapes = {n: p.shape for n, p in model.named_parameters()}
    check_matches_model(scores, shapes, f"scores given to {name}", "score")


def _check_no_scores(name: str, scores: Mapping[str, Tensor] | None) -> None:
    if scores is not None:
        raise ValueError(f"method {name!r} takes no scores; drop --scores or pick a score-based "
                         f"method ({', '.join(sorted(SCORERS))}, bayestune)")


# --- scores of the score-based methods ------------------------------------------------------
def random_scores(model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int,
                  config: MethodConfig) -> dict[str, Tensor]:
    """Uniform random scores: one random ranking, so every budget's mask nests in the next."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}


def magnitude_scores(model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int,
                     config: MethodConfig) -> dict[str, Tensor]:
    """|theta - theta0| after a short full fine-tuning (LT-SFT's first phase).

    No weight decay: decoupled decay moves every scalar in proportion to its own size, which
    would rank by |theta0| instead of by how far the data pulled each scalar.
    """
    work = _trainable_copy(model)
    theta0 = [p.detach().clone() for p in work.parameters()]
    optimizer = torch.optim.AdamW(work.parameters(), lr=config.magnitude_lr, weight_decay=0.0)
    with _seeded(seed, _device(work)):
        for batch in _take(batches, config.magnitude_steps, "magnitude: full fine-tuning"):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(work, move_batch(batch, _device(work))).backward()
            optimizer.step()
    moved = [(p.detach() - p0).abs() for p, p0 in zip(work.parameters(), theta0, strict=True)]
    return _named(work, moved)


def fisher_scores(model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int,
                  config: MethodConfig) -> dict[str, Tensor]:
    """Empirical Fisher diagonal at theta0: sum over batches of the squared batch gradient.

    The FISH paper squares per-example gradients; squaring the mini-batch gradient costs one
    backward pass per batch instead of one per example and ranks the same scalars high when
    the batch gradient is dominated by consistent per-example gradients.
    """
    work = _trainable_copy(model)
    total = [torch.zeros_like(p, dtype=torch.float32) for p in work.parameters()]
    with _seeded(seed, _device(work)):
        for batch in _take(batches, config.fisher_batches, "fisher: squared gradients"):
            for acc, grad in zip(total, _gradients(work, loss_fn, batch), strict=True):
                acc.add_(grad.float().square())
    return _named(work, total)


def sam_scores(model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int,
               config: MethodConfig) -> dict[str, Tensor]:
    """|sum of gradients| over ``sam_steps`` batches at theta0 (accumulation, no update).

    Unlike fisher, gradients of opposite sign cancel, so a scalar the data pushes back and
    forth ranks low.
    """
    work = _trainable_copy(model)
    total = [torch.zeros_like(p, dtype=torch.float32) for p in work.parameters()]
    with _seeded(seed, _device(work)):
        for batch in _take(batches, config.sam_steps, "sam: accumulated gradients"):
            for acc, grad in zip(total, _gradients(work, loss_fn, batch), strict=True):
                acc.add_(grad.float())
    return _named(work, (t.abs() for t in total))


ScoreFn = Callable[[nn.Module, Batches, LossFn, int, MethodConfig], dict[str, Tensor]]
SCORERS: dict[str, ScoreFn] = {
    "random": random_scores,
    "magnitude": magnitude_scores,
    "fisher": fisher_scores,
    "sam": sam_scores,
}


def method_scores(name: str, model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int,
                  config: MethodConfig) -> dict[str, Tensor]:
    """The per-scalar score a score-based method ranks (for figures comparing rankings)."""
    if name not in SCORERS:
        raise ValueError(f"method {name!r} has no computed score; score-based methods: "
                         f"{', '.join(sorted(SCORERS))} (bayestune reads its scale file)")
    return SCORERS[name](model, batches, loss_fn, seed, config)


# --- the mask methods -----------------------------------------------------------------------
# The SAM paper ranks within each encoder tensor and always trains the head.
_FIXED_RANKING: dict[str, dict[str, bool]] = {"sam": {"per_tensor": True, "keep_head": True}}


def ranking_options(name: str, config: MethodConfig) -> dict[str, bool]:
    """How method ``name`` turns scores into masks: the config's options unless it fixes them."""
    options = {"per_tensor": config.per_tensor, "keep_head": config.keep_head,
               "head_counts_toward_budget": config.head_counts_toward_budget}
    return {**options, **_FIXED_RANKING.get(name, {})}


def _rank(name: str, scores: Mapping[str, Tensor], budgets: Sequence[float],
          config: MethodConfig) -> dict[float, Mask]:
    return masks_from_scores(scores, budgets, **ranking_options(name, config))


def _score_method(name: str) -> MaskMethod:
    def method(model: nn.Module, batches: Batches, loss_fn: LossFn, budgets: Sequence[float],
               seed: int, config: MethodConfig, *,
               scores: Mapping[str, Tensor] | None = None) -> dict[float, Mask]:
        # Precomputed scores (e.g. a saved score file) replace computing them again.
        if scores is None:
            scores = SCORERS[name](model, batches, loss_fn, seed, config)
        _check_scores_fit(name, model, scores)
        return _rank(name, scores, budgets, config)

    method.__name__ = f"{name}_masks"
    method.__doc__ = f"Top-k of the {name} score ({SCORERS[name].__doc__.splitlines()[0]})"
    return method


def bayestune_masks(model: nn.Module, batches: Batches, loss_fn: LossFn,
                    budgets: Sequence[float], seed: int, config: MethodConfig, *,
                    scores: Mapping[str, Tensor] | None = None) -> dict[float, Mask]:
    """Top-k of the posterior-mean lambda of a stage-1 scale file, passed as ``scores``."""
    if scores is None:
        raise ValueError("method 'bayestune' ranks the posterior-mean scales of stage 1; pass "
                         "them as scores (--scores results/.../scales/.../seed<S>.safetensors)")
    _check_scores_fit("bayestune", model, scores)
    return _rank("bayestune", scores, budgets, config)


def _same_for_every_budget(mask: Mask, budgets: Sequence[float]) -> dict[float, Mask]:
    if not budgets:
        raise ValueError("no budgets given; pass at least one fraction in (0, 1]")
    return {check_budget(b): mask for b in budgets}


def full_masks(model: nn.Module, batches: Batches, loss_fn: LossFn, budgets: Sequence[float],
               seed: int, config: MethodConfig, *,
               scores: Mapping[str, Tensor] | None = None) -> dict[float, Mask]:
    """Every scalar trainable. The budget does not apply: each budget gets the same full mask,
    so ``full`` lines up with the other methods in the tables (at fraction 1.0)."""
    _check_no_scores("full", scores)
    mask = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    return _same_for_every_budget(mask, budgets)


def bitfit_masks(model: nn.Module, batches: Batches, loss_fn: LossFn, budgets: Sequence[float],
                 seed: int, config: MethodConfig, *,
                 scores: Mapping[str, Tensor] | None = None) -> dict[float, Mask]:
    """Every bias (names ending in ``.bias``) and the whole head; the budget does not apply.

    LayerNorm biases count as biases, as in the BitFit paper's list of bias terms. The fraction
    is fixed by the architecture and the head (biases alone: 0.08% of RoBERTa-base): read it with
    :func:`bayestune.masks.mask_fraction` and record it, as every budget gets this same mask.
    """
    _check_no_scores("bitfit", scores)
    mask = {n: torch.full(p.shape, n.endswith(".bias") or is_head(n), dtype=torch.bool)
            for n, p in model.named_parameters()}
    return _same_for_every_budget(mask, budgets)


METHODS: dict[str, MaskMethod] = {
    "bayestune": bayestune_masks,
    "full": full_masks,
    "random": _score_method("random"),
    "bitfit": bitfit_masks,
    "magnitude": _score_method("magnitude"),
    "fisher": _score_method("fisher"),
    "sam": _score_method("sam"),
}


def select_masks(name: str, model: nn.Module, batches: Batches, loss_fn: LossFn,
                 budgets: Sequence[float], seed: int, config: MethodConfig | None = None,
                 scores: Mapping[str, Tensor] | None = None) -> dict[float, Mask]:
    """Run mask method ``name``; ``scores`` are bayestune's scales (or precomputed scores)."""
    if name not in METHODS:
        raise ValueError(f"unknown mask method {name!r}; known methods: "
                         f"{', '.join(sorted(METHODS))} (lora is not a mask: use wrap_lora)")
    return METHODS[name](model, batches, loss_fn, budgets, seed, config or MethodConfig(),
                         scores=scores)


def mask_overlap(masks: Mapping[str, Mapping[str, Tensor]]) -> pd.DataFrame:
    """Jaccard overlap |A & B| / |A | B| of every pair of masks (rows, columns: their keys).

    Two empty masks count as identical (1.0). Masks must cover the same tensors and shapes.
    """
    labels = list(masks)
    if not labels:
        raise ValueError("mask_overlap needs at least one mask")
    ref = {n: tuple(t.shape) for n, t in masks[labels[0]].items()}
    for label in labels[1:]:
        shapes = {n: tuple(t.shape) for n, t in masks[label].items()}
        if shapes != ref:
            raise ValueError(f"masks {labels[0]!r} and {label!r} cover different tensors or "
                             "shapes; compare masks made for the same model and task")
    flat = {label: torch.cat([masks[label][n].reshape(-1).bool() for n in ref]) for label in labels}
    table = pd.DataFrame(1.0, index=labels, columns=labels)
    for a, b in itertools.combinations(labels, 2):
        union = int((flat[a] | flat[b]).sum())
        inter = int((flat[a] & flat[b]).sum())
        table.loc[a, b] = table.loc[b, a] = inter / union if union else 1.0
    return table


# --- LoRA through peft ----------------------------------------------------------------------
@dataclass
class LoraSettings:
    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16, metadata={"help": "LoRA scaling alpha (update = alpha/r BA)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the LoRA input"})
    target_modules: str = field(default="query,value", metadata={
        "help": "comma-separated names of the linear layers to adapt: RoBERTa/BERT call the "
                "attention projections query,key,value; timm ViTs use qkv; or all-linear"})


def _lora_config(settings: LoraSettings):
    from peft import LoraConfig

    targets = settings.target_modules.strip()
    # peft reads a plain string as a regular expression; a list means module-name suffixes.
    modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                      lora_dropout=settings.dropout, target_modules=modules, bias="none")


def wrap_lora(model: TaskModel, settings: LoraSettings) -> TaskModel:
    """A copy of ``model`` with LoRA on ``model.encoder``; only LoRA and head params train.

    The copy keeps the TaskModel class, so it is still called as ``model(batch)``; the given
    model is untouched (it stays theta0).
    """
    from peft import get_peft_model

    wrapped = copy.deepcopy(model)
    try:
        with warnings.catch_warnings():  # transformers' deprecation notice, raised inside peft
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            wrapped.encoder = get_peft_model(wrapped.encoder, _lora_config(settings))
    except ValueError as err:
        raise ValueError(f"LoRA could not adapt {settings.target_modules!r} ({err}); set "
                         "target_modules to linear layer names of this encoder") from err
    for name, param in wrapped.named_parameters():
        param.requires_grad_("lora_" in name or is_head(name))
    return wrapped


def merge_lora(model: TaskModel) -> TaskModel:
    """A plain TaskModel with the LoRA updates merged in and the original parameter names."""
    from peft import PeftModel

    if not isinstance(getattr(model, "encoder", None), PeftModel):
        raise ValueError("merge_lora expects a model made by wrap_lora (its encoder is a "
                         "peft model)")
    merged = copy.deepcopy(model)
    merged.encoder = merged.encoder.merge_and_unload()
    return merged.requires_grad_(True)


def lora_trainable_fraction(model: nn.Module, base_total: int) -> float:
    """Trainable LoRA + head scalars over D, the scalar count of the model before wrapping."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / base_total

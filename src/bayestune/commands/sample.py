"""``bayestune sample``: stage 1, SGLD sampling of the scales lambda, with the chain
diagnostics beside the scale file."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bayestune.cli.flags import add_config_flags, from_args, given_flags
from bayestune.commands.common import (
    RunSettings,
    made_with,
    model_and_data,
    run_flags,
    stage_provenance,
)
from bayestune.guards import nonnegative_int
from bayestune.sampler.config import SamplerConfig, sampler_config

if TYPE_CHECKING:
    from torch import Tensor

HELP = "stage 1: SGLD sampling of the scales lambda"
log = logging.getLogger("bayestune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    run_flags(parser)
    parser.add_argument("--out", type=Path, required=True,
                        help="scale file to write (.safetensors)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="resumable state; an existing one is resumed from")
    parser.add_argument("--allow-degenerate-scales", action="store_true",
                        help="write the scale file even when the scales are degenerate (NaN, far "
                             "above any plausible size, or all equal), which otherwise fails the "
                             "job")
    parser.add_argument("--diagnostics-fisher-examples", type=nonnegative_int, default=32,
                        metavar="N",
                        help="chain diagnostics: training examples of the Fisher score the "
                             "posterior mean is compared with (0: no Fisher comparison)")
    add_config_flags(parser, SamplerConfig, given_only=True)


@dataclass(frozen=True, kw_only=True)
class Settings(RunSettings):
    out: Path
    checkpoint: Path | None
    allow_degenerate_scales: bool
    diagnostics_fisher_examples: int
    sampler: SamplerConfig


def sampler_config_from_args(args: argparse.Namespace) -> SamplerConfig:
    """The preset (``--preset``, default exact) with the sampler flags given on top."""
    return sampler_config(**given_flags(args, SamplerConfig))


def settings(args: argparse.Namespace) -> Settings:
    return from_args(Settings, args, sampler=sampler_config_from_args(args))


def run(settings: Settings) -> None:
    from bayestune import files
    from bayestune.diagnostics import ChainMonitor, rank_agreement, write_chain_diagnostics
    from bayestune.guards import check_distinct, prepared_fingerprint
    from bayestune.liveness import exclusive_lock
    from bayestune.models.base import resolve_device, task_loss
    from bayestune.sampler.result import write_scale_file
    from bayestune.sampler.run import sample_scales
    from bayestune.scale_checks import weight_scale
    from bayestune.tasks.base import val_scorer

    config, checkpoint = settings.sampler, settings.checkpoint
    outputs = dict(zip(("--out", "its diagnostics", "its traces"),
                       (settings.out, *files.diagnostics_paths(settings.out)), strict=True))
    check_distinct(outputs, {"--checkpoint": checkpoint, "--data": settings.data})
    with (exclusive_lock(checkpoint, "checkpoint") if checkpoint is not None
          else contextlib.nullcontext()):
        spec, model, data = model_and_data(settings)
        largest_weight = weight_scale(model)  # before sampling moves theta away from theta0
        fisher = _fisher_at_start(settings, model, data)
        monitor = ChainMonitor()
        # What the task gives the sampler: the epoch's length (jiant schedule) and a validation
        # score on the first val_subset examples (the length rule).
        validate = (val_scorer(data, spec, config.val_subset, resolve_device(settings.device))
                    if config.patience > 0 else None)
        inputs = {"task": settings.task, "data": prepared_fingerprint(settings.data),
                  "batch_size": settings.batch_size, "steps_per_epoch": len(data.train)}
        result = sample_scales(model, data.train_epoch, task_loss, config, seed=settings.seed,
                               device=settings.device, checkpoint_path=checkpoint,
                               progress=not settings.quiet, steps_per_epoch=len(data.train),
                               validate=validate, log_every=settings.log_every,
                               chain_monitor=monitor, inputs=inputs,
                               train_size=len(data.train.dataset))
        accepted = _check_scales(settings, result.mean, largest_weight)
        made_by = stage_provenance(settings, {"sampler": config,
                                              "batch_size": settings.batch_size})
        agreement = rank_agreement(monitor.final_scores(model, result.mean, fisher))
        # The scale file is written last, after the old diagnostics are gone: a run killed
        # between the writes never leaves new scales beside an older run's diagnostics.
        for path in outputs.values():
            files.remove_output(path)
        fisher_examples = settings.diagnostics_fisher_examples if fisher is not None else 0
        write_chain_diagnostics(settings.out, monitor, agreement, run={
            "task": settings.task, "seed": settings.seed, "preset": config.preset,
            "model_id": model.model_id, **made_with(model), "steps": result.steps,
            "n_samples": result.n_samples, "fisher_examples": fisher_examples})
        write_scale_file(settings.out, result, config, seed=settings.seed,
                         model_id=model.model_id, provenance=made_by,
                         accepted_problems=accepted, extra=made_with(model))
        if checkpoint is not None:
            # The scale file is the product; a finished run's checkpoint is only dead weight.
            files.remove_output(checkpoint)
    log.info("wrote %s (%d samples averaged)", settings.out, result.n_samples)


def _fisher_at_start(settings: Settings, model, data) -> dict[str, Tensor] | None:
    """Fisher scores at theta0 for the chain diagnostics (None when turned off)."""
    from bayestune.methods.config import MethodConfig
    from bayestune.methods.fisher import fisher_scores
    from bayestune.models.base import resolve_device, task_loss

    if settings.diagnostics_fisher_examples == 0:
        return None
    model.to(resolve_device(settings.device))
    method_settings = MethodConfig(fisher_examples=settings.diagnostics_fisher_examples)
    return fisher_scores(model, data.train_epoch, task_loss, settings.seed, method_settings)


def _check_scales(settings: Settings, scales: Mapping[str, Tensor],
                  largest_weight: float) -> list[str]:
    """Fail the job on a degenerate chain, unless --allow-degenerate-scales; return the
    problems so accepted (the scale file records them, and `mask` reads them as accepted)."""
    from bayestune.scale_checks import DegenerateScalesError, scale_problems

    config = settings.sampler
    problems = scale_problems(scales, floor=config.lambda_floor, largest_weight=largest_weight,
                              lr_lambda=config.lr_lambda)
    if not problems:
        return []
    run_name = f"stage 1 of {settings.task}, seed {settings.seed} ({settings.out})"
    if settings.allow_degenerate_scales:
        log.warning("%s: degenerate scales kept (--allow-degenerate-scales): %s", run_name,
                    "; ".join(problems))
        return problems
    restart = (f"; delete the checkpoint {settings.checkpoint} before rerunning with other "
               "settings" if settings.checkpoint is not None else "")
    raise DegenerateScalesError(f"{run_name}: {'; '.join(problems)}{restart}. To keep these "
                                "scales anyway, rerun with --allow-degenerate-scales")

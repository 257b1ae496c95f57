"""``bayestune apply-delta``: a base model plus a run's sparse delta, as fine-tuned weights."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from bayestune.cli.flags import from_args
from bayestune.commands.common import TaskSettings, declared_tasks, run_flags

HELP = "base model + sparse delta -> fine-tuned weights"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    run_flags(parser, data=False, seed_default=None,
              seed_help="seed of the run that wrote the delta (default: the one it records; "
                        "needed only for deltas that record none)",
              architecture_help="the one the delta records; first-token for a delta that "
                                "records none")
    parser.add_argument("--delta", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True,
                        help="state dict to write (.safetensors)")


@dataclass(frozen=True, kw_only=True)
class Settings(TaskSettings):
    delta: Path
    out: Path


def settings(args: argparse.Namespace) -> Settings:
    return from_args(Settings, args)


def run(settings: Settings) -> None:
    from bayestune import files
    from bayestune.delta import apply_delta
    from bayestune.file_origin import (
        check_architecture,
        check_made_for,
        recorded_architecture,
        recorded_seed,
    )
    from bayestune.guards import check_distinct
    from bayestune.tasks import build_task_model

    check_distinct({"--out": settings.out}, {"--delta": settings.delta})
    delta, meta = files.load_delta(settings.delta)
    # The delta holds only the scalars that changed: a frozen head (and a drawn pooler) must be
    # rebuilt from the run's own seed and architecture, or the model silently gets other ones.
    architecture = settings.architecture or recorded_architecture(meta)
    check_architecture(meta, settings.delta, "delta", architecture)
    model = build_task_model(settings.task, settings.model,
                             recorded_seed(meta, settings.delta, settings.seed),
                             declared_tasks(settings), architecture)
    check_made_for(meta, settings.delta, "delta", task=settings.task, model=model.model_id,
                   architecture=model.architecture)
    apply_delta(model, delta, source=str(settings.delta))
    files.save_model_state(settings.out, model.state_dict(),
                           {**meta, "delta": str(settings.delta)})

"""What the commands that build a task's model share: the task, model and data flags, their
settings, the model and data of a run, and the provenance record of its outputs."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bayestune.errors import ConfigError
from bayestune.guards import positive_int


@dataclass(frozen=True, kw_only=True)
class TaskSettings:
    """A command on one task's model."""

    command: str
    task: str
    task_file: Path | None
    model: str
    seed: int | None
    architecture: str | None


@dataclass(frozen=True, kw_only=True)
class RunSettings(TaskSettings):
    """A command that runs the task's model on its data (sample, mask, finetune)."""

    data: Path | None
    batch_size: int
    eval_batch_size: int
    device: str
    quiet: bool  # no progress bars
    log_every: int  # steps between log lines (0: none)


# --- flags ----------------------------------------------------------------------------------
def task_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True,
                        help="task name: built in (cola, vtab-cifar, ...) or declared in "
                             "--task-file")
    parser.add_argument("--task-file", type=Path, default=None,
                        help="YAML with a top-level custom_tasks: mapping that declares tasks "
                             "(a run config that declares them will do)")


def architecture_flag(parser: argparse.ArgumentParser, recorded: str = "") -> None:
    """--architecture; with ``recorded`` (apply-delta) it defaults to what the file records."""
    from bayestune.models.base import ARCHITECTURES, DEFAULT_ARCHITECTURE

    parser.add_argument(
        "--architecture", choices=ARCHITECTURES, default=None if recorded else DEFAULT_ARCHITECTURE,
        help="text models: jiant (the paper's: the encoder's pooler, trained and ranked, and "
             "jiant's heads) or first-token (heads on the first token, no pooler; files that "
             "record no architecture were made by it). Image models ignore it (default: "
             f"{recorded or DEFAULT_ARCHITECTURE})")


def run_flags(parser: argparse.ArgumentParser, *, data: bool = True,
              seed_default: int | None = 0, seed_help: str = "seed of the head and data order",
              architecture_help: str = "") -> None:
    """The task, model and seed; with ``data``, the data, batch sizes and device too."""
    task_flags(parser)
    parser.add_argument("--model", required=True,
                        help="Hugging Face name or local path (roberta-base, all-MiniLM-L6-v2) "
                             "or timm model name")
    parser.add_argument("--seed", type=int, default=seed_default, help=seed_help)
    architecture_flag(parser, recorded=architecture_help)
    if data:
        parser.add_argument("--data", type=Path, help="prepared task folder (bayestune prepare)")
        parser.add_argument("--batch-size", type=positive_int, default=16)
        parser.add_argument("--eval-batch-size", type=positive_int, default=64)
        parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
        parser.add_argument("--gpu-slots", type=Path, default=None,
                            help="folder of GPU slot locks shared by a run's jobs: with several "
                                 "GPUs visible, auto and cuda take a free slot's GPU")
        # From the environment too: the workflow sets it outside the rules' commands, so that
        # changing it reruns nothing.
        parser.add_argument("--jobs-per-gpu", type=positive_int,
                            default=int(os.environ.get("BAYESTUNE_JOBS_PER_GPU") or 1),
                            help="with --gpu-slots: jobs that may share one GPU (default from "
                                 "$BAYESTUNE_JOBS_PER_GPU, else 1)")


# --- a run's model and data -----------------------------------------------------------------
def declared_tasks(settings: TaskSettings) -> dict:
    """The tasks of ``--task-file`` (none without one), by name."""
    from bayestune.tasks.custom import read_task_file

    return read_task_file(settings.task_file) if settings.task_file is not None else {}


def model_and_data(settings: RunSettings) -> tuple:
    """The task's spec, its model (fresh head from the seed) and its loaders."""
    from bayestune.tasks import build_task_model, get_task, load_task_data

    if settings.data is None:
        raise ConfigError(f"{settings.command} trains on the task's data: pass --data, the "
                          f"folder `bayestune prepare --task {settings.task} --out-dir ...` "
                          "wrote")
    declared = declared_tasks(settings)
    spec = get_task(settings.task, declared)
    model = build_task_model(settings.task, settings.model, settings.seed, declared,
                             settings.architecture)
    data = load_task_data(settings.task, settings.data, settings.batch_size, settings.seed,
                          settings.eval_batch_size, declared, settings.architecture)
    return spec, model, data


def made_with(model: Any) -> dict:
    """What the files of a run record about its model besides the name: a text model's
    architecture (nothing for a model without the choice)."""
    return {} if model.architecture is None else {"architecture": model.architecture}


def stage_provenance(settings: RunSettings, config: object) -> dict:
    """The provenance record of this command's outputs: ``config`` is what it ran with."""
    from bayestune.models.base import resolve_device
    from bayestune.provenance import collect

    return collect(settings.command, config, resolve_device(settings.device))

"""Turn a task name into its spec, prepared data, loaders and model, whatever the benchmark.

Each benchmark module (``glue``, ``vtab``) exposes the same four names: ``TASKS`` (name ->
TaskSpec), ``prepare``, ``load_data`` and ``build_model``; this module only dispatches.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from bayestune.models.base import TaskModel
from bayestune.tasks.base import TaskData, TaskError, TaskSpec


def _benchmarks() -> list[ModuleType]:
    from bayestune.tasks import glue, vtab

    return [glue, vtab]


def _module_for(task: str) -> ModuleType:
    for module in _benchmarks():
        if task in module.TASKS:
            return module
    known = sorted(name for module in _benchmarks() for name in module.TASKS)
    raise TaskError(f"unknown task {task!r}; known tasks: {', '.join(known)}")


def get_task(task: str) -> TaskSpec:
    return _module_for(task).TASKS[task]


def prepare_task(task: str, model_name: str, out_dir: Path, data_dir: Path | None = None,
                 max_length: int = 128) -> Path:
    """Read, validate and cache a task's splits under ``out_dir``; return ``out_dir``."""
    return _module_for(task).prepare(task, model_name, Path(out_dir), data_dir, max_length)


def load_task_data(task: str, prepared_dir: Path, batch_size: int, seed: int,
                   eval_batch_size: int = 64) -> TaskData:
    return _module_for(task).load_data(task, Path(prepared_dir), batch_size, seed, eval_batch_size)


def build_task_model(task: str, model_name: str, seed: int) -> TaskModel:
    """The pretrained encoder with a fresh head; the same seed gives the same head."""
    return _module_for(task).build_model(task, model_name, seed)

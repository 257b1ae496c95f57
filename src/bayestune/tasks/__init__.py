"""Turn a task name into its spec, prepared data, loaders and model, whatever the benchmark.

Each benchmark module (``glue``, ``vtab``) exposes the same four names: ``TASKS`` (name ->
TaskSpec), ``prepare``, ``load_data`` and ``build_model``. The text models' ``architecture``
(``models.base.ARCHITECTURES``) reaches the text tasks only; image models have no such choice.
Tasks declared in a run config or a task file (:mod:`bayestune.tasks.custom`) are passed in as
``custom_tasks`` (name -> CustomTask), and served by the module of their kind
(:data:`CUSTOM_KINDS`), loaded when a task of that kind is used: a job of a GLUE task runs none
of it, and the workflow's code hash of a job covers the module of its task's kind only. This
module only dispatches.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType

from bayestune.models.base import DEFAULT_ARCHITECTURE, TaskModel
from bayestune.tasks.base import TaskData, TaskError, TaskSpec
from bayestune.tasks.builtin import benchmarks, builtin_tasks
from bayestune.tasks.custom import CustomTask

CustomTasks = Mapping[str, CustomTask]
# The module that serves each kind of declared task (bayestune.provenance reads this table).
CUSTOM_KINDS = {"text": "custom_text", "image": "custom_images"}

__all__ = ["CUSTOM_KINDS", "CustomTasks", "build_task_model", "builtin_tasks",
           "check_task_names", "get_task", "load_task_data", "prepare_task", "used_token_ids"]


def _kind_module(task: CustomTask) -> ModuleType:
    return importlib.import_module(f"{__name__}.{CUSTOM_KINDS[task.kind]}")


def _unknown(names: list[str], custom_tasks: CustomTasks | None) -> TaskError:
    declared = sorted(custom_tasks or {})
    return TaskError(
        f"unknown task{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))}; built-in "
        f"tasks: {', '.join(builtin_tasks())}; declared tasks: "
        f"{', '.join(declared) if declared else 'none'} (declare your own under custom_tasks: "
        "in the run config, or in a --task-file)")


def check_task_names(tasks: Iterable[str], custom_tasks: CustomTasks | None = None) -> None:
    """Raise one error naming every task that is neither built in nor declared."""
    known = set(builtin_tasks()) | set(custom_tasks or {})
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise _unknown(unknown, custom_tasks)


def _resolve(task: str, custom_tasks: CustomTasks | None) -> ModuleType | CustomTask:
    if custom_tasks and task in custom_tasks:
        return custom_tasks[task]
    for module in benchmarks():
        if task in module.TASKS:
            return module
    raise _unknown([task], custom_tasks)


def get_task(task: str, custom_tasks: CustomTasks | None = None) -> TaskSpec:
    found = _resolve(task, custom_tasks)
    return found.spec() if isinstance(found, CustomTask) else found.TASKS[task]


def _architecture(found: ModuleType | CustomTask, architecture: str | None) -> dict:
    """``architecture=...`` for a built-in text benchmark (GLUE), nothing for the others."""
    takes = isinstance(found, ModuleType) and getattr(found, "TAKES_ARCHITECTURE", False)
    return {"architecture": architecture} if takes and architecture is not None else {}


def prepare_task(task: str, model_name: str, out_dir: Path, data_dir: Path | None = None,
                 max_length: int = 128, custom_tasks: CustomTasks | None = None,
                 architecture: str = DEFAULT_ARCHITECTURE) -> Path:
    """Read, validate and cache a task's splits under ``out_dir``; return ``out_dir``.

    Only GLUE's COPA and WSC tokenise differently per ``architecture``; a declared text task's
    tokens are the same for both.
    """
    found = _resolve(task, custom_tasks)
    if isinstance(found, CustomTask):
        if data_dir is not None:
            raise TaskError(f"task {task!r} is declared with its own data ({found.data}); "
                            "drop --data-dir")
        return _kind_module(found).prepare(found, model_name, Path(out_dir), max_length)
    return found.prepare(task, model_name, Path(out_dir), data_dir, max_length,
                         **_architecture(found, architecture))


def load_task_data(task: str, prepared_dir: Path, batch_size: int, seed: int,
                   eval_batch_size: int = 64, custom_tasks: CustomTasks | None = None,
                   architecture: str | None = None) -> TaskData:
    """The task's loaders; with ``architecture``, a token cache made for the other one is
    refused where the tokens differ (GLUE's COPA and WSC)."""
    found = _resolve(task, custom_tasks)
    if isinstance(found, CustomTask):
        return _kind_module(found).load_data(found, Path(prepared_dir), batch_size, seed,
                                             eval_batch_size)
    return found.load_data(task, Path(prepared_dir), batch_size, seed, eval_batch_size,
                           **_architecture(found, architecture))


def build_task_model(task: str, model_name: str, seed: int,
                     custom_tasks: CustomTasks | None = None,
                     architecture: str = DEFAULT_ARCHITECTURE) -> TaskModel:
    """The pretrained encoder with a fresh head; the same seed gives the same head (and, for
    a text model of architecture ``jiant`` whose checkpoint has none, the same pooler)."""
    found = _resolve(task, custom_tasks)
    if isinstance(found, CustomTask):
        return _kind_module(found).build_model(found, model_name, seed, architecture)
    return found.build_model(task, model_name, seed, **_architecture(found, architecture))


def used_token_ids(tasks: Iterable[str], model_name: str, data_dir: Path | None = None,
                   custom_tasks: CustomTasks | None = None,
                   architecture: str = DEFAULT_ARCHITECTURE) -> set[int]:
    """The token ids that the data of ``tasks`` uses (the vocabulary cut of
    :mod:`bayestune.models.derive`); built-in GLUE/SuperGLUE tasks only."""
    from bayestune.tasks import glue

    used: set[int] = set()
    for task in tasks:
        if _resolve(task, custom_tasks) is not glue:
            raise TaskError(f"task {task!r}: the vocabulary cut reads the built-in "
                            f"GLUE/SuperGLUE tasks only ({', '.join(glue.TASKS)})")
        used |= glue.token_ids(task, model_name, data_dir, architecture)
    return used

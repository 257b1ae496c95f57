"""The built-in benchmarks: GLUE/SuperGLUE (:mod:`bayestune.tasks.glue`) and VTAB-1k
(:mod:`bayestune.tasks.vtab`). Each exposes the same four names: ``TASKS`` (name -> TaskSpec),
``prepare``, ``load_data`` and ``build_model``."""

from __future__ import annotations

from types import ModuleType


def benchmarks() -> list[ModuleType]:
    from bayestune.tasks import glue, vtab

    return [glue, vtab]


def builtin_tasks() -> list[str]:
    """Every built-in task name (a declared task may not take one)."""
    return [name for module in benchmarks() for name in module.TASKS]

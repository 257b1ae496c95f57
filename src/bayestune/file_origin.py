"""Whether a mask, score, start or delta file was made for the run about to use it.

Shapes cannot tell: a mask made for RTE fits the MRPC model exactly (same encoder, same
two-class head), and fine-tuning with it gives numbers that mean nothing. These files record
the task, model, seed and (text models) architecture they were made for; a run compares them
with its own. Files written before those keys existed are still read, with a warning that they
could not be checked, except for the architecture: a file that records none was made by the
only architecture there was, ``first-token``, and is refused for a ``jiant`` model with the fix
in the message (its shapes would not fit anyway: no pooler, other heads).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from bayestune.errors import ConfigError
from bayestune.files import FileFormatError, PathLike
from bayestune.models.base import LEGACY_ARCHITECTURE

log = logging.getLogger(__name__)


def same_model(recorded: str, current: str) -> bool:
    """Model ids name the same model (a local folder may be spelled by several paths)."""
    if recorded == current:
        return True
    return os.path.isdir(recorded) and os.path.isdir(current) and os.path.samefile(recorded,
                                                                                   current)


def recorded_architecture(meta: Mapping[str, Any]) -> str:
    """The architecture a file was made for; none recorded: ``first-token`` (older files)."""
    return str(meta.get("architecture") or LEGACY_ARCHITECTURE)


def check_architecture(meta: Mapping[str, Any], path: PathLike, kind: str,
                       architecture: str | None) -> None:
    """Raise if the file was made for another text architecture than ``architecture`` (None:
    a model without the choice, not checked)."""
    if architecture is None:
        return
    made_for = recorded_architecture(meta)
    if made_for == architecture:
        return
    why = ("" if meta.get("architecture") else
           " (it records none: it was written before the choice existed, by first-token)")
    raise FileFormatError(
        f"{path}: this {kind} file was made for architecture {made_for!r}{why}, but this run "
        f"builds architecture {architecture!r}; the two models differ (pooler, heads), so its "
        f"scalars do not match. Rerun the stage that writes the {kind} file for "
        f"{architecture!r}, or run with --architecture {made_for} (config key architecture: "
        f"{made_for}) to use it with the model it was made for")


def check_made_for(meta: Mapping[str, Any], path: PathLike, kind: str, *, model: str,
                   task: str | None = None, architecture: str | None = None) -> None:
    """Raise if the file records another architecture, another model (or, when ``task`` is
    given, another task)."""
    check_architecture(meta, path, kind, architecture)
    recorded_model = meta.get("model", meta.get("model_id"))  # scale files say model_id
    recorded_task = meta.get("task")
    unchecked = [key for key, value in (("model", recorded_model), ("task", recorded_task))
                 if value is None and (key == "model" or task is not None)]
    if unchecked:
        log.warning("%s: the %s file records no %s (written by an older version); it cannot be "
                    "checked against this run", path, kind, " or ".join(unchecked))
    wrong = []
    if task is not None and recorded_task is not None and recorded_task != task:
        wrong.append(f"task {recorded_task!r}, not {task!r}")
    if recorded_model is not None and not same_model(str(recorded_model), model):
        wrong.append(f"model {recorded_model!r}, not {model!r}")
    if wrong:
        raise FileFormatError(f"{path}: this {kind} file was made for {' and '.join(wrong)}; "
                              f"give the {kind} file of this run, or make one for it")


def recorded_seed(meta: Mapping[str, Any], path: PathLike, requested: int | None) -> int:
    """The seed a delta's run used, which rebuilds its head; a different ``requested`` is an
    error (frozen head scalars are not in the delta, so another seed's head would be wrong)."""
    seed = meta.get("seed")
    if seed is None:
        if requested is None:
            log.warning("%s: the delta records no seed (written by an older version); the head is "
                        "rebuilt with seed 0, pass --seed with the run's seed if it was another",
                        path)
            return 0
        return requested
    if requested is not None and requested != int(seed):
        raise ConfigError(f"{path}: the delta comes from a run with seed {seed}, but --seed is "
                          f"{requested}; the head must be rebuilt with the run's own seed, so "
                          "drop --seed")
    return int(seed)

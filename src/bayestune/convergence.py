"""Did a fine-tuning run converge? Its validation curve, why it stopped, and the flag the tables
put on a run that ran out of steps while still improving.

A run's ``metrics.json`` holds ``history`` (one record per evaluation: ``step``,
``train_loss``, the mean training loss since the previous evaluation, and ``val_score``, in
natural units) and ``stop_reason``: ``patience`` (early stopping) or ``max_steps``.

The rule for "still improving", stated once here and quoted under the tables
(:data:`STILL_IMPROVING_RULE`): the run stopped at max_steps and its best validation score
came at one of its last two evaluations. "Best" is the first evaluation that reaches the
highest score, as early stopping picks it (a later tie is no improvement, NaN never wins), so
a flat curve is not flagged. A run with fewer than three evaluations that stopped at max_steps
is always flagged: two points say nothing about whether the curve has levelled off.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

STOP_PATIENCE = "patience"
STOP_MAX_STEPS = "max_steps"
LAST_EVALUATIONS = 2  # the best score at one of this many final evaluations: still improving

STILL_IMPROVING_RULE = (
    "stopped at max_steps while still improving: its best validation score came at one of its "
    f"last {LAST_EVALUATIONS} evaluations (every run with fewer than {LAST_EVALUATIONS + 1} "
    "evaluations that stopped at max_steps counts)")


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def history_records(history: Iterable[Sequence[float]]) -> list[dict[str, float | int | None]]:
    """``(step, train_loss, val_score)`` tuples as metrics.json records (NaN as null, so the
    file stays strict JSON)."""
    def plain(value: float) -> float | None:
        return None if math.isnan(value) else float(value)

    return [{"step": int(step), "train_loss": plain(float(loss)), "val_score": plain(float(val))}
            for step, loss, val in history]


def best_evaluation(val_scores: Sequence[float]) -> int | None:
    """Index of the evaluation early stopping keeps: the first to reach the highest score,
    NaN never better than a number (None when there is no score at all)."""
    best: int | None = None
    for index, score in enumerate(val_scores):
        if math.isnan(score):
            continue
        if best is None or score > val_scores[best]:
            best = index
    return best


def stop_reason(history: Sequence[Sequence[float]], best_step: int, patience: int) -> str:
    """Why a run ended: ``patience`` when at least ``patience`` evaluations came after the best
    one (the early-stopping condition held at the last evaluation), else ``max_steps``."""
    after_best = sum(1 for step, *_ in history if step > best_step)
    return STOP_PATIENCE if after_best >= patience else STOP_MAX_STEPS


def still_improving(record: Mapping[str, Any]) -> bool:
    """The rule of this module on one metrics.json record; False without a recorded history
    (files written before histories were) or without a stop reason."""
    history = record.get("history") or []
    if record.get("stop_reason") != STOP_MAX_STEPS or not history:
        return False
    best = best_evaluation([_number(entry.get("val_score")) for entry in history])
    return best is not None and best >= len(history) - LAST_EVALUATIONS

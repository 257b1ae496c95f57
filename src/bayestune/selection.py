"""The fair protocol: every method chooses among the same number of candidate settings on the
validation split, and only the chosen candidate is scored on test.

A candidate is a small mapping of stage-2 settings (fields of
:class:`bayestune.finetune.FinetuneConfig`, e.g. ``{"lr": 1e-3}``). BayesTune's candidates may
also name a stage-1 ``preset``: its mask then comes from that preset's scale file, so tuning
stage 1 spends the same selection budget as tuning a learning rate. The workflow's ``tuning``
config key holds the grids (:func:`method_grid`) and the run refuses a config in which methods
get unequal numbers of candidates (:func:`check_equal_counts`); ``bayestune finetune
--candidates`` trains one job's candidates in turn (:func:`parse_candidates`) and keeps the best
on validation (:func:`choose`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bayestune.convergence import best_evaluation
from bayestune.errors import ConfigError

# Keys a candidate may hold besides stage-2 settings: the stage-1 preset whose mask it uses
# (bayestune) and that mask's file (filled in by the workflow from the preset).
PRESET_KEY, MASK_KEY = "preset", "mask"
DEFAULT_GRID = "default"


def _stage2_fields() -> set[str]:
    import dataclasses

    from bayestune.finetune import FinetuneConfig

    return {f.name for f in dataclasses.fields(FinetuneConfig)}


def check_candidate(candidate: Mapping[str, Any], where: str, *, mask_ok: bool = True) -> None:
    """A candidate names only stage-2 settings (and ``preset``/``mask``)."""
    if not isinstance(candidate, Mapping) or not candidate:
        raise ConfigError(f"{where}: a candidate is a non-empty mapping of settings, e.g. "
                          f"{{lr: 1.0e-3}}; got {candidate!r}")
    allowed = _stage2_fields() | {PRESET_KEY} | ({MASK_KEY} if mask_ok else set())
    unknown = sorted(set(candidate) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown candidate setting(s) {', '.join(unknown)}; a "
                          f"candidate names stage-2 (finetune) settings and, for bayestune, "
                          f"a stage-1 preset")


def method_grid(tuning: Mapping[str, Any] | None, method: str) -> list[dict[str, Any]]:
    """The candidates of ``method``: its own grid, else the ``default`` grid, else one empty
    candidate (the finetune section as it is)."""
    grids = (tuning or {}).get("grid") or {}
    grid = grids.get(method, grids.get(DEFAULT_GRID))
    if grid is None:
        return [{}]
    return [dict(c) for c in grid]


def check_equal_counts(tuning: Mapping[str, Any] | None, methods: Sequence[str]) -> int:
    """Refuse a tuning config that gives some method more candidates than another (or than
    ``candidates``, when set), or names a preset for a method without stage 1; returns the
    common count."""
    if not tuning:
        return 1
    grids = tuning.get("grid") or {}
    unknown = sorted(set(grids) - set(methods) - {DEFAULT_GRID})
    if unknown:
        raise ConfigError(f"tuning.grid names method(s) not in this run: {', '.join(unknown)}; "
                          f"the run's methods: {', '.join(methods)}")
    counts = {}
    for method in methods:
        grid = method_grid(tuning, method)
        for i, candidate in enumerate(grid):
            check_candidate(candidate, f"tuning.grid.{method}[{i}]", mask_ok=False)
            if PRESET_KEY in candidate and method != "bayestune":
                raise ConfigError(f"tuning.grid.{method}[{i}] names a stage-1 preset; only "
                                  "bayestune has a stage 1: drop the preset")
        counts[method] = len(grid)
    wanted = tuning.get("candidates")
    expected = wanted if wanted is not None else max(counts.values(), default=1)
    unequal = {m: n for m, n in counts.items() if n != expected}
    if unequal:
        listed = ", ".join(f"{m}: {n}" for m, n in counts.items())
        raise ConfigError(
            f"unfair tuning: every method must choose among {expected} candidates on validation "
            f"(tuning.candidates), but the grids give {listed}; give each method's grid (or "
            f"tuning.grid.default) exactly {expected} entries, a bayestune preset counting as "
            "one")
    return expected


def candidate_presets(tuning: Mapping[str, Any] | None, default_preset: str) -> list[str]:
    """The stage-1 presets bayestune's candidates use, in order (the sampler's own preset for a
    candidate that names none)."""
    presets: list[str] = []
    for candidate in method_grid(tuning, "bayestune"):
        preset = candidate.get(PRESET_KEY, default_preset)
        if preset not in presets:
            presets.append(preset)
    return presets


def parse_candidates(text: str) -> list[dict[str, Any]]:
    """``--candidates``: a JSON list of candidate mappings."""
    try:
        candidates = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--candidates is not JSON ({err.msg}): give a list such as "
                          "'[{\"lr\": 1e-3}, {\"lr\": 3e-3}]'") from err
    if not isinstance(candidates, list) or not candidates:
        raise ConfigError("--candidates must be a non-empty JSON list of settings mappings")
    for i, candidate in enumerate(candidates):
        check_candidate(candidate, f"--candidates[{i}]")
    return candidates


def choose(val_scores: Sequence[float]) -> int:
    """Index of the candidate with the best validation score: the first of equals, NaN never
    chosen over a number (the first candidate when none has a score)."""
    best = best_evaluation(val_scores)
    return 0 if best is None else best


def describe(candidate: Mapping[str, Any]) -> str:
    """A short label, e.g. ``preset=cold lr=0.001`` (the mask file is left out)."""
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in candidate.items() if k != MASK_KEY) or "as configured"


def selection_rows(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per candidate of each metrics.json record with a ``selection``: what
    ``<benchmark>_selection.csv`` holds (validation scores x100)."""
    rows = []
    for record in records:
        selection = record.get("selection") or {}
        for index, candidate in enumerate(selection.get("candidates", [])):
            settings = candidate.get("settings", {})
            val = candidate.get("val_score")
            rows.append({
                "method": record["method"], "task": record["task"], "seed": record["seed"],
                "budget": record.get("budget"), "candidate": index,
                "settings": describe(settings), "lr": settings.get("lr"),
                "preset": settings.get(PRESET_KEY),
                "val_score": math.nan if val is None else 100.0 * float(val),
                "best_step": candidate.get("best_step"), "steps": candidate.get("steps"),
                "stop_reason": candidate.get("stop_reason"),
                "chosen": index == selection.get("chosen"),
            })
    return rows

"""The one place where a run config's settings become a job's settings.

A workflow config gives each stage a section (``sampler``, ``mask``, ``finetune``, ``lora``)
and overrides of it: per stage-1 preset and seed (``sampler_by_preset``, ``sampler_by_seed``)
and per method (``mask_by_method``, ``finetune_by_method``). :func:`resolve` merges them for
one job; :func:`to_flags` turns the result into the command line's flags, whose names the
command line generates from the fields of the config dataclasses (``SamplerConfig``,
``MethodConfig``, ``FinetuneConfig``, ``LoraSettings``); :func:`from_section` turns a section
into the dataclass directly, each value cast to its field's type as the command line casts a
flag (:func:`field_type`). The workflow's rules (``common.smk``), its start-up check
(``run_checks``) and the sweep all resolve through here, so a job sees the same settings
whichever of them runs it; the planner reads them back from the rules' commands with the
command line itself (:func:`bayestune.cli.parse_command`).

Only the standard library is imported: the workflow reads this module when it starts.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Mapping
from typing import Any, TypeVar

DEFAULT_PRESET = "exact"  # the sampler's preset when a config names none
SECTIONS = ("sampler", "mask", "finetune", "lora")
Config = TypeVar("Config")


# --- a section for one job ------------------------------------------------------------------
def preset_of(config: Mapping[str, Any]) -> str:
    """The preset of a config's own sampler section."""
    return str((config.get("sampler") or {}).get("preset") or DEFAULT_PRESET)


def resolve(config: Mapping[str, Any], section: str, *, method: str | None = None,
            preset: str | None = None, seed: int | str | None = None) -> dict[str, Any]:
    """Section ``section`` of a workflow config as the job of (method, preset, seed) sees it.

    ``sampler``: the section, then the preset's overrides (``sampler_by_preset``, e.g. a
    scaled-down reference chain), then the seed's (``sampler_by_seed``, keyed by the seed as a
    string, e.g. the paper's full-length chain for seed 0 only), with ``preset`` itself
    (default: the section's own). ``mask`` and ``finetune``: the section, then the method's
    overrides (``<section>_by_method``, e.g. full fine-tuning's smaller learning rate).
    ``lora``: the section as it is.
    """
    if section not in SECTIONS:
        raise ValueError(f"unknown config section {section!r}; one of {', '.join(SECTIONS)}")
    values = dict(config.get(section) or {})
    if section == "sampler":
        preset = preset or preset_of(config)
        by_seed = (config.get("sampler_by_seed") or {}).get(str(seed)) or {}
        return {**values, **((config.get("sampler_by_preset") or {}).get(preset) or {}),
                **(by_seed.get(preset) or {}), "preset": preset}
    if section in ("mask", "finetune") and method is not None:
        values.update((config.get(f"{section}_by_method") or {}).get(method) or {})
    return values


# --- a section as flags, and flags as the dataclass -------------------------------------------
def _flag_value(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 1e12 -> 1000000000000, which int and float options both read
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def to_flags(options: Mapping[str, Any], prefix: str = "") -> str:
    """A section as the command line's flags (``--lr 0.001 --no-keep-head``), shell-quoted; a
    key whose value is None is left out (the command's default applies)."""
    parts = []
    for key, value in options.items():
        name = (prefix + key).replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            parts.append(f"--{name}" if value else f"--no-{name}")
        else:
            parts.append(f"--{name} {shlex.quote(_flag_value(value))}")
    return " ".join(parts)


def field_type(field: dataclasses.Field) -> type:
    """The type a config value or flag of ``field`` is cast to: the ``type`` its metadata names
    (fields whose default is None), else its default's type."""
    return field.metadata.get("type", type(field.default))


def cast(field: dataclasses.Field, value: Any) -> Any:
    """A config value as ``field``'s type (YAML may write 0 for 0.0); booleans are kept."""
    return value if isinstance(value, bool) else field_type(field)(value)


def section_values(cls: type, section: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of ``section`` that are fields of ``cls``, cast; other keys (a loader's batch
    size) and None values (unset: the default applies, as in :func:`to_flags`) are left out."""
    return {f.name: cast(f, section[f.name]) for f in dataclasses.fields(cls)
            if section.get(f.name) is not None}


def from_section(cls: type[Config], section: Mapping[str, Any]) -> Config:
    """``cls`` built from a config section (see :func:`section_values`)."""
    return cls(**section_values(cls, section))

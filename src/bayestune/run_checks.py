"""The workflow's start-up check of a run config, beyond what its JSON schema can say.

The schema checks each key's type and range; it cannot check a value against the others (a
sampler whose burn-in leaves no sample, ``finetune.max_steps: 0`` with the linear schedule),
a NaN (it passes ``exclusiveMinimum``), or the folders the run will read and write. Each
section is built into the dataclass its jobs build, with each method's, preset's and seed's
overrides, so that everything a job would refuse is refused before the first job starts, in
one message that names the config key.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bayestune.errors import BayesTuneError, ConfigError
from bayestune.settings import from_section, resolve


def _try(problems: list[str], where: str, build: Any, *args: Any) -> None:
    try:
        build(*args)
    except (BayesTuneError, TypeError, ValueError) as err:
        problems.append(f"{where}: {err}")


def check_sections(config: Mapping[str, Any], *, presets: Sequence[str], seeds: Sequence[int],
                   methods: Iterable[str], candidates: Mapping[str, list[dict]]) -> list[str]:
    """Problems of the sampler, finetune, mask and lora sections as each job would see them."""
    from bayestune.finetune import FinetuneConfig
    from bayestune.methods import LoraSettings, MethodConfig
    from bayestune.sampler import sampler_config_from_section

    problems: list[str] = []
    for preset in presets:
        for seed in seeds:
            _try(problems, f"sampler (preset {preset}, seed {seed})", sampler_config_from_section,
                 resolve(config, "sampler", preset=preset, seed=seed))
    for method in methods:
        section = resolve(config, "finetune", method=method)
        for k, candidate in enumerate(candidates.get(method) or [{}]):
            where = f"finetune of {method}" + (f" (tuning candidate {k})" if candidate else "")
            _try(problems, where, from_section, FinetuneConfig, {**section, **candidate})
        _try(problems, f"mask of {method}", from_section, MethodConfig,
             resolve(config, "mask", method=method))
    if "lora" in methods:
        _try(problems, "lora", from_section, LoraSettings, resolve(config, "lora"))
    return problems


def check_folder(key: str, path: str) -> str | None:
    """A problem with a folder the run writes (``results_dir``, ``prepared_dir``): one of its
    parents is a file, so that no job could create it."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return (f"{key}: {path} cannot be a folder, since {probe} is a file; choose another "
                f"{key} (or move that file)")
    return None


def check_data_dir(data_dir: str | None, *, env_name: str, key: str, from_env: bool) -> str | None:
    """A problem with the task-data folder of the run's built-in tasks (None: none, or it
    exists); the message says where the path came from."""
    if not data_dir or data_dir == "hub" or os.path.isdir(data_dir):
        return None
    origin = f"${env_name}" if from_env else f"config key {key}"
    return (f"task-data folder {data_dir} (from {origin}) does not exist; point {origin} at "
            f"the folder holding one folder per task, or set {key}: hub to download from the "
            "Hugging Face Hub")


def check_run_config(config: Mapping[str, Any], *, presets: Sequence[str], seeds: Sequence[int],
                     methods: Iterable[str], candidates: Mapping[str, list[dict]],
                     data_problem: str | None) -> None:
    """Raise one :class:`ConfigError` naming every problem found."""
    methods = list(methods)
    problems = check_sections(config, presets=presets, seeds=seeds, methods=methods,
                              candidates=candidates)
    for key in ("results_dir", "prepared_dir"):
        problem = check_folder(key, str(config[key]))
        if problem:
            problems.append(problem)
    if data_problem:
        problems.append(data_problem)
    if problems:
        raise ConfigError("the run config cannot work:\n  " + "\n  ".join(problems))

"""Which raw task data a run config reads, by content: the workflow's and DVC's rerun key.

The workflow passes each task's fingerprint to its ``prepare`` job as a param, so new data
reruns that task. DVC sees neither the data folder (named by ``$BAYESTUNE_GLUE_DIR`` or a config
key, outside the repository) nor Snakemake's params, so its stage ``sources`` writes the same
fingerprints to a small JSON file with this module, on every ``dvc repro``, and the stages that
run the workflow depend on that file: relabelled data changes it, and the stage runs again.

    python -m bayestune.data_source --config config/demo.yaml --out data/sources/demo.json

(``--config``, not ``--configfile``: `bayestune plan` finds the stage that runs a config by its
Snakemake command's ``--configfile``.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bayestune.errors import BayesTuneError
from bayestune.provenance import folder_fingerprint

HUB = "hub"


def data_setting(config: Mapping[str, Any]) -> tuple[str, str]:
    """The environment variable and the config key that name the built-in tasks' data."""
    if config.get("benchmark") == "vtab":
        return "BAYESTUNE_VTAB_DIR", "vtab_dir"
    return "BAYESTUNE_GLUE_DIR", "glue_dir"


def data_dir(config: Mapping[str, Any], environ: Mapping[str, str] | None = None,
             base: str | os.PathLike[str] = "") -> str | None:
    """The built-in tasks' data folder: the environment wins over the config; None or "hub"
    reads the Hugging Face Hub. A relative folder is taken from ``base`` (default: here), the
    folder the workflow runs in."""
    env_name, key = data_setting(config)
    chosen = (os.environ if environ is None else environ).get(env_name) or config.get(key)
    if chosen and chosen != HUB:
        return os.path.abspath(os.path.join(base, chosen))
    return chosen


def task_source(task: str, folder: str | None, declared: Mapping[str, Any]) -> str:
    """The task's raw files by content (a vtab-<name> task lives in folder <name>; a declared
    task in the folder its declaration names); "hub" for data read from the Hub."""
    if task in declared:
        own = Path(declared[task].data).expanduser()
        return folder_fingerprint(own) if own.is_dir() else HUB
    if not folder or folder == HUB:
        return HUB
    return folder_fingerprint(os.path.join(folder, task.removeprefix("vtab-")))


def sources(config: Mapping[str, Any], environ: Mapping[str, str] | None = None
            ) -> dict[str, str]:
    """Every task of ``config`` -> its :func:`task_source`."""
    from bayestune.tasks.custom import parse_custom_tasks

    declared = parse_custom_tasks(config.get("custom_tasks"), where="config custom_tasks")
    folder = data_dir(config, environ)
    return {task: task_source(task, folder, declared) for task in config["tasks"]}


def main(argv: Sequence[str] | None = None) -> int:
    import yaml

    from bayestune.files import write_json

    parser = argparse.ArgumentParser(prog="python -m bayestune.data_source",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="run config (YAML)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        config = yaml.safe_load(args.config.read_text())
        found = sources(config)
    except (OSError, yaml.YAMLError, KeyError, TypeError, BayesTuneError) as err:
        print(f"bayestune.data_source: error: {args.config}: cannot read the run config's "
              f"tasks and data folder ({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    # Rewritten only when it changes, so that its timestamp too says when the data changed.
    record = {"config": str(args.config), "sources": found}
    if not args.out.is_file() or json.loads(args.out.read_text()) != record:
        write_json(args.out, record)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

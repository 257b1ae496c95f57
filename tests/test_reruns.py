"""Reruns that are right, on a copy of the session's finished tiny run (two tasks, two
budgets, two stage-1 presets; tests/shared_runs.py):

* a change to the code a stage runs reruns that stage and what follows, and nothing else: not
  a change to another subcommand's help, to a method or a kind of task the run does not use,
  to the reports or to the planner;
* new raw data reruns everything built from it;
* how a run is started (the data folder's spelling or place, progress bars, the interpreter's
  path) reruns nothing;
* the run's files carry their provenance.

Each check is a dry run (`snakemake -n`) counting the jobs it would run. Edits are made to the
run's own copy of the package and undone after each test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import yaml
from shared_runs import finished_run, workflow_env
from test_workflow import job_counts

from bayestune import files, provenance

pytestmark = pytest.mark.slow

# The tables and every figure: two tasks, so two of each per-task figure.
REPORTING = {"report": 1, "task_figures": 2, "score_figure": 1, "val_curves": 2,
             "paired_figure": 1, "chain_figures": 2, "all": 1}
# Everything built from one task's data (CB): its token cache, its two chains (exact, cold)
# and their masks, its five runs, and the reports over it. The random mask reads no data, so
# it stays; so does everything of the other task.
FROM_DATA = {"prepare": 1, "sample": 2, "mask_bayestune": 2, "finetune": 5, "report": 1,
             "task_figures": 1, "score_figure": 1, "val_curves": 1, "paired_figure": 1,
             "chain_figures": 1, "all": 1}


def tiny_config(run: Path, glue_dir: str, **changes) -> Path:
    """The finished run's config with the task data spelled ``glue_dir``."""
    config = yaml.safe_load((run / "tests/config/tiny_fair.yaml").read_text())
    config.update(glue_dir=glue_dir, **changes)
    path = run / f"tiny-{len(list(run.glob('tiny-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


environment = workflow_env


def planned(run: Path, config: Path, *, python: str | Path = sys.executable,
            env: dict[str, str] | None = None) -> dict[str, int]:
    """Jobs per rule that `snakemake -n` would run ({} when everything is up to date)."""
    result = subprocess.run([str(python), "-m", "snakemake", "-n", "--cores", "1",
                             "--configfile", str(config)], cwd=run, env=env or environment(),
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    if "Nothing to be done" in output:
        return {}
    counts = job_counts(output)
    counts.pop("total")
    return counts


@pytest.fixture(scope="module")
def finished(tmp_path_factory, glue_dir) -> tuple[Path, Path]:
    """A copy of the session's finished run (its own package sources, which the tests edit),
    the data folder given relative to the copy, as the configs give it."""
    run = finished_run(tmp_path_factory, glue_dir).copy_to(
        tmp_path_factory.mktemp("reruns") / "run")
    config = tiny_config(run, os.path.relpath(glue_dir, run))
    assert planned(run, config) == {}
    return run, config


@contextmanager
def edited(path: Path, old: bytes | None = None, new: bytes = b"") -> Iterator[None]:
    """``path`` with a comment appended, or with ``old`` replaced by ``new``; undone after."""
    original = path.read_bytes()
    try:
        if old is None:
            path.write_bytes(original + b"\n# an edit\n")
        else:
            assert original.count(old) == 1, f"{old!r} is not once in {path}"
            path.write_bytes(original.replace(old, new))
        yield
    finally:
        path.write_bytes(original)


def test_editing_the_sampler_reruns_stage_one_and_what_follows_only(finished):
    run, config = finished
    with edited(run / "src/bayestune/sampler/chain.py"):
        counts = planned(run, config)
    # bayestune's chains, masks and runs; the random masks, the random and full runs and
    # prepare stay.
    assert counts == {"sample": 4, "mask_bayestune": 4, "finetune": 4, **REPORTING}


def test_editing_the_reports_reruns_only_the_report_rules(finished):
    run, config = finished
    with edited(run / "src/bayestune/reports/tables.py"):
        counts = planned(run, config)
    assert counts == REPORTING


def test_editing_fine_tuning_reruns_every_fine_tuning_run(finished):
    run, config = finished
    with edited(run / "src/bayestune/finetune.py"):
        counts = planned(run, config)
    # The figures share the report's modules, and the report reads the runs' candidates with
    # the fair protocol's module, which checks them against FinetuneConfig (selection.py ->
    # finetune.py).
    assert counts == {"finetune": 10, **REPORTING}


# What a change to code that no stage-1 job runs may rerun: the help of a subcommand no rule
# calls, a method and a kind of declared task the run does not use, and the planner rerun
# nothing; the reports rerun the reports. Never prepare or sample.
@pytest.mark.parametrize("path, old, new, expected", [
    ("commands/sweep.py", b'help="jobs run at once"', b'help="jobs the sweep runs at once"', {}),
    ("methods/lora.py", None, b"", {}),
    ("tasks/custom_images.py", None, b"", {}),
    ("plan.py", None, b"", {}),
    ("reports/figures.py", None, b"", REPORTING),
    ("reports/tables.py", b'"""A small results table as CSV', b'"""A results table as CSV',
     REPORTING),
], ids=["help of sweep", "lora", "custom images", "planner", "figures", "tables"])
def test_code_stage_one_does_not_run_reruns_no_stage_one_job(finished, path, old, new,
                                                              expected):
    run, config = finished
    with edited(run / "src/bayestune" / path, old, new):
        counts = planned(run, config)
    assert counts == expected
    assert not {"prepare", "sample"} & set(counts)


def test_editing_one_method_reruns_that_methods_masks_and_runs_only(finished):
    run, config = finished
    with edited(run / "src/bayestune/methods/random_mask.py"):
        counts = planned(run, config)
    # the random masks (a job per task) and their runs (two budgets per task); the figures
    # of the masks; not bayestune's chains, masks or runs, nor full fine-tuning
    assert counts == {"mask": 2, "finetune": 4, "report": 1, "task_figures": 2,
                      "score_figure": 1, "val_curves": 2, "paired_figure": 1, "all": 1}


def test_new_raw_data_reruns_everything_built_from_it(finished, glue_dir, tmp_path):
    run, config = finished
    changed = tmp_path / "glue" / "cb"
    changed.mkdir(parents=True)
    (tmp_path / "glue" / "copa").symlink_to(glue_dir / "copa", target_is_directory=True)
    for split in ("train", "test"):
        (changed / f"{split}.jsonl").symlink_to(glue_dir / "cb" / f"{split}.jsonl")
    rows = (glue_dir / "cb" / "val.jsonl").read_text().splitlines(keepends=True)
    (changed / "val.jsonl").write_text("".join(rows[:-1]))  # one validation row fewer
    counts = planned(run, config, env=environment(BAYESTUNE_GLUE_DIR=str(changed.parent)))
    assert counts == FROM_DATA


def test_the_same_data_elsewhere_or_spelled_otherwise_reruns_nothing(finished, glue_dir,
                                                                     tmp_path):
    run, config = finished
    assert planned(run, config, env=environment(BAYESTUNE_GLUE_DIR=str(glue_dir))) == {}
    moved = tmp_path / "moved"
    moved.symlink_to(glue_dir, target_is_directory=True)
    assert planned(run, config, env=environment(BAYESTUNE_GLUE_DIR=str(moved))) == {}
    absolute = tiny_config(run, str(glue_dir.resolve()))
    assert planned(run, absolute) == {}


def test_progress_bars_rerun_nothing(finished):
    run, config = finished
    settings = yaml.safe_load(config.read_text())
    assert planned(run, tiny_config(run, settings["glue_dir"], progress=True)) == {}


def test_another_interpreter_path_reruns_nothing(finished, tmp_path):
    """The same virtual environment reached through another path, as after moving it."""
    run, config = finished
    moved = tmp_path / "elsewhere" / "venv"
    moved.parent.mkdir()
    moved.symlink_to(Path(sys.prefix), target_is_directory=True)
    assert planned(run, config, python=moved / "bin" / "python") == {}


def test_finished_run_records_provenance(finished):
    run, _ = finished
    results = run / "results/tiny"
    metrics = files.read_json(results / "finetune/bayestune/cb/p0.02/seed0/metrics.json")
    record = metrics["provenance"]
    package = run / "src/bayestune"
    assert record["command"] == "finetune" and record["device"] == "cpu"
    assert record["code_sha256"] == provenance.command_code_hash("finetune", package)
    assert record["lock_sha256"] is None  # the run's copy has no requirements.lock beside it
    assert record["torch"] and record["transformers"] and len(record["config_sha256"]) == 64
    assert set(metrics["upstream"]) == {"mask", "scales"}
    assert metrics["upstream"]["scales"]["code_sha256"] == provenance.command_code_hash(
        "sample", package)
    _, delta_meta = files.load_delta(results / "finetune/bayestune/cb/p0.02/seed0/"
                                     "delta.safetensors")
    assert delta_meta["provenance"] == record
    table = pd.read_csv(results / "glue_provenance.csv")
    # a row per run (ten), per mask of a masked run (eight) and per bayestune run's scale file
    assert len(table) == 10 + 8 + 4
    assert table.groupby("stage").size().to_dict() == {"finetune": 10, "mask": 8, "scales": 4}
    markdown = (results / "glue_table.md").read_text()
    assert "## Provenance" in markdown and "Warning" not in markdown

"""The worked example (config/examples/reviews.yaml) through Snakemake: a folder of CSV files
the test writes, as a user would, to the table and figures; task names and declarations checked
when the workflow starts; an edited split file or declaration reruns prepare and what follows."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from shared_runs import tiny_encoder
from task_data import write_reviews
from test_workflow import job_counts

from bayestune.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXAMPLE = "config/examples/reviews.yaml"
TINY = {  # the example's own settings, cut to a few steps per stage
    "sampler": {"batch_size": 8, "steps": 6, "warmup_steps": 2, "burnin_steps": 3,
                "thinning": 1, "lr_lambda": 1.0e-4, "noise_discount": 0.0,
                "checkpoint_every": 0},
    "finetune": {"batch_size": 8, "lr": 1.0e-3, "max_steps": 4, "eval_every": 2,
                 "patience": 2},
    "max_length": 32,
}


def workdir_with_data(root: Path) -> Path:
    for name in ("Snakefile", "workflow", "config"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / name)
    write_reviews(root / "data/raw/reviews", n_train=40, n_test=12)  # where the example looks
    return root


def snakemake(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env.pop("SNAKEMAKE_PROFILE", None)
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def edited_config(cwd: Path, name: str, **changes) -> str:
    config = yaml.safe_load((cwd / EXAMPLE).read_text())
    config.update(changes)
    (cwd / name).write_text(yaml.safe_dump(config, sort_keys=False))
    return name


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return workdir_with_data(tmp_path_factory.mktemp("reviews"))


def test_example_dry_run_passes_the_task_file_to_every_job(workdir):
    result = snakemake(workdir, "-n", "-p", "--cores", "1", "--configfile", EXAMPLE)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = job_counts(result.stdout)
    assert (counts["prepare"], counts["sample"], counts["mask"], counts["mask_bayestune"],
            counts["finetune"]) == (1, 1, 1, 1, 3)
    parser = build_parser()
    task_file = str(workdir / EXAMPLE)
    commands = [line.removeprefix("Shell command: ").split(" > ", 1)[0]
                for line in result.stdout.splitlines() if line.startswith("Shell command: ")]
    seen = set()
    for command in commands:
        argv = shlex.split(command)
        if "bayestune" not in argv:
            continue
        argv = [a for a in argv[argv.index("bayestune") + 1:] if a != "-q"]
        args = parser.parse_args(argv)  # exits (fails the test) on a flag the CLI lacks
        if argv[0] in ("prepare", "sample", "mask", "finetune"):
            assert str(args.task_file) == task_file, command
            seen.add(argv[0])
        if argv[0] == "prepare":
            assert args.data_dir is None, "a declared task names its own data"
    assert seen == {"prepare", "sample", "mask", "finetune"}


def test_unknown_task_fails_when_the_workflow_starts(workdir):
    name = edited_config(workdir, "typo.yaml", tasks=["reviews", "reveiws"])
    result = snakemake(workdir, "-n", "--cores", "1", "--configfile", name)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "unknown task 'reveiws'" in output and "declared tasks: reviews" in output
    assert "rte" in output and "Job stats" not in output


def test_bad_declaration_fails_the_schema_when_the_workflow_starts(workdir):
    config = yaml.safe_load((workdir / EXAMPLE).read_text())
    declaration = {**config["custom_tasks"]["reviews"], "regression": True}
    name = edited_config(workdir, "bad.yaml", custom_tasks={"reviews": declaration})
    result = snakemake(workdir, "-n", "--cores", "1", "--configfile", name)
    assert result.returncode != 0
    assert "labels and regression exclude each other" in result.stdout + result.stderr


@pytest.mark.slow
def test_worked_example_from_csv_folder_to_table_and_figures(tmp_path, tmp_path_factory):
    run = workdir_with_data(tmp_path)
    # the plumbing on the tiny encoder of MiniLM's family (the demo runs the real one)
    tiny = {**TINY, "model": str(tiny_encoder(tmp_path_factory))}
    config = edited_config(run, "reviews-tiny.yaml", **tiny)
    result = snakemake(run, "--cores", "2", "--configfile", config)
    logs = "\n".join(f"{p}:\n{p.read_text()[-1500:]}" for p in (run / "results").rglob("*.log"))
    assert result.returncode == 0, result.stderr[-4000:] + logs
    results = run / "results/reviews"
    table = pd.read_csv(results / "glue_table.csv", dtype={"budget": str})
    assert set(zip(table.method, table.budget, strict=True)) == {
        ("full", "-"), ("bayestune", "0.01"), ("random", "0.01")}
    assert table["reviews"].between(0, 100).all() and "reviews" in (
        results / "glue_table.md").read_text()
    for figure in ("score_vs_budget.png", "reviews/mask_locations.png",
                   "reviews/lambda_histogram.png"):
        assert (results / "figures" / figure).stat().st_size > 1000, figure

    again = snakemake(run, "-n", "--cores", "1", "--configfile", config)
    assert "Nothing to be done" in again.stdout + again.stderr

    def dry_run() -> dict[str, int]:
        return job_counts(snakemake(run, "-n", "--cores", "1", "--configfile", config).stdout)

    # one line of a split file changes: prepare and everything after it run again
    test_csv = run / "data/raw/reviews/test.csv"
    original, stat = test_csv.read_text(), test_csv.stat()
    lines = original.splitlines()
    lines[1] = lines[1][:-1] + ("0" if lines[1].endswith("1") else "1")
    test_csv.write_text("\n".join(lines) + "\n")
    edited = dry_run()
    assert edited.get("prepare") == 1 and edited.get("finetune") == 3, edited
    test_csv.write_text(original)
    os.utime(test_csv, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert dry_run() == {}
    # the declaration changes (another metric), the data does not: the same
    declaration = {**yaml.safe_load((run / config).read_text())["custom_tasks"]["reviews"],
                   "metric": "macro_f1"}
    edited_config(run, config, **tiny, custom_tasks={"reviews": declaration})
    redeclared = dry_run()
    assert redeclared.get("prepare") == 1 and redeclared.get("finetune") == 3, redeclared

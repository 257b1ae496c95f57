"""Provenance: which code a subcommand runs (read statically), the record every output file
carries, and the report's listing and warning."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from bayestune import files, provenance, reports

PACKAGE = Path(provenance.__file__).resolve().parent


def short(modules: list[str]) -> set[str]:
    return {m.removeprefix("bayestune.") for m in modules}


# --- the code a subcommand runs ---------------------------------------------------------------
def test_each_subcommand_reaches_its_own_modules():
    sample = short(provenance.command_modules("sample"))
    assert {"sampler", "prior", "running_stats", "files", "provenance", "cli", "bayestune",
            "tasks", "tasks.glue", "optim", "diagnostics",
            "methods.fisher"} <= sample  # the chain diagnostics rank by Fisher scores too
    assert not sample & {"finetune", "reports", "delta", "bench", "file_origin"}
    finetune = short(provenance.command_modules("finetune"))
    assert {"finetune", "delta", "methods", "masks"} <= finetune  # LoRA comes from methods
    assert not finetune & {"sampler", "reports", "bench"}
    assert "reports" in short(provenance.command_modules("report"))
    assert short(provenance.command_modules("report")) == short(
        provenance.command_modules("figures"))


def test_unknown_subcommand_is_an_error():
    with pytest.raises(ValueError, match="no subcommand 'smaple'.*sample"):
        provenance.command_modules("smaple")


@pytest.fixture
def package_copy(tmp_path) -> Path:
    copy = tmp_path / "src" / "bayestune"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_code_hash_follows_exactly_the_modules_run(package_copy):
    before = {c: provenance.command_code_hash(c, package_copy) for c in ("sample", "mask")}
    with open(package_copy / "file_origin.py", "a") as handle:
        handle.write("\n# an edit\n")
    after = {c: provenance.command_code_hash(c, package_copy) for c in ("sample", "mask")}
    assert after["sample"] == before["sample"]  # sample never imports file_origin
    assert after["mask"] != before["mask"]
    with open(package_copy / "sampler" / "chain.py", "a") as handle:
        handle.write("\n# an edit\n")
    assert provenance.command_code_hash("sample", package_copy) != before["sample"]


def test_imports_are_resolved_relative_and_inside_functions(tmp_path):
    """A made-up package: relative imports, `from pkg import submodule`, function-level
    imports, and a module no subcommand reaches."""
    root = tmp_path / "bayestune"
    (root / "sub").mkdir(parents=True)
    sources = {
        "__init__.py": "",
        "cli.py": "from bayestune import version\n"
                  "def cmd_go(args):\n    helper()\n"
                  "def helper():\n    from bayestune.sub import deep\n"
                  "def cmd_other(args):\n    import bayestune.unreached\n",
        "version.py": "",
        "sub/__init__.py": "from .leaf import x\n",
        "sub/leaf.py": "x = 1\n",
        "sub/deep.py": "def f():\n    from ..late import y\n",
        "late.py": "import os\ny = os.sep\n",
        "unreached.py": "",
    }
    for name, text in sources.items():
        (root / name).write_text(text)
    assert provenance.command_modules("go", root) == sorted(
        f"bayestune{suffix}" for suffix in ("", ".cli", ".version", ".sub", ".sub.leaf",
                                            ".sub.deep", ".late"))


# --- the record -----------------------------------------------------------------------------
def test_git_state_of_a_checkout_and_outside_one(tmp_path, package_copy):
    assert provenance.git_state(package_copy) == {"git_commit": None, "git_dirty": None}

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    git("add", "src")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    clean = provenance.git_state.__wrapped__(package_copy)
    assert len(clean["git_commit"]) == 40 and clean["git_dirty"] is False
    (package_copy / "sampler.py").write_text("# changed\n")
    assert provenance.git_state.__wrapped__(package_copy)["git_dirty"] is True


def test_lock_hash_belongs_to_a_source_checkout(tmp_path, package_copy):
    assert provenance.lock_file(package_copy) is None
    (tmp_path / "requirements.lock").write_text("torch==2.14.1\n")
    assert provenance.lock_file(package_copy) == tmp_path / "requirements.lock"
    assert provenance.lock_hash.__wrapped__(package_copy) == hashlib.sha256(
        b"torch==2.14.1\n").hexdigest()


@dataclasses.dataclass
class Settings:
    lr: float = 1e-3
    steps: int = 10


def test_config_hash_is_of_the_values():
    assert provenance.config_hash(Settings()) == provenance.config_hash({"steps": 10, "lr": 1e-3})
    assert provenance.config_hash(Settings(lr=2e-3)) != provenance.config_hash(Settings())
    assert provenance.config_hash({"a": Settings(), "b": 8}) == provenance.config_hash(
        {"b": 8, "a": {"lr": 1e-3, "steps": 10}})


def test_collect_names_code_software_settings_and_device():
    record = provenance.collect("sample", Settings(), torch.device("cpu"))
    assert record["command"] == "sample" and record["device"] == "cpu"
    assert record["code_sha256"] == provenance.command_code_hash("sample")
    assert record["config_sha256"] == provenance.config_hash(Settings())
    assert record["torch"] == torch.__version__.split("+")[0]
    assert record["python"].startswith("3.")
    assert set(record) == {"bayestune_version", "git_commit", "git_dirty", "command",
                           "code_sha256", "lock_sha256", "python", "torch", "transformers",
                           "config_sha256", "device"}
    bare = provenance.collect()
    assert bare["code_sha256"] is None and bare["config_sha256"] is None and bare["device"] is None


def test_every_tensor_file_carries_provenance(tmp_path):
    mask = {"w": torch.tensor([True, False])}
    run = provenance.collect("mask", Settings(), "cpu")
    files.save_mask(tmp_path / "given.safetensors", mask, {"method": "random"}, run)
    files.save_mask(tmp_path / "default.safetensors", mask, {"method": "random"})
    _, given = files.load_mask(tmp_path / "given.safetensors")
    _, default = files.load_mask(tmp_path / "default.safetensors")
    assert given["provenance"] == run
    assert default["provenance"]["torch"] == run["torch"]
    assert default["provenance"]["command"] is None  # a library call: code and software only
    files.write_json(tmp_path / "metrics.json", {"x": 1}, provenance=run)
    assert files.read_json(tmp_path / "metrics.json") == {"x": 1, "provenance": run}


def test_upstream_chains_the_stages():
    scales_meta = {"provenance": {"command": "sample"}}
    mask_meta = {"provenance": {"command": "mask"}, "upstream": provenance.upstream(
        scales_meta, "scales")}
    assert provenance.upstream(mask_meta, "mask") == {"mask": {"command": "mask"},
                                                      "scales": {"command": "sample"}}
    assert provenance.upstream({}, "mask") == {}


# --- the report -----------------------------------------------------------------------------
def write_run(folder: Path, method: str, commit: str, code: str = "c0") -> Path:
    record = {"method": method, "budget": 0.005 if method != "full" else "full", "task": "cb",
              "seed": 0, "metric": "accuracy", "test_score": 0.5, "val_score": 0.5,
              "trainable_fraction": 0.005, "model": "m"}
    run = {"bayestune_version": "0.1.0", "git_commit": commit, "git_dirty": False,
           "command": "finetune", "code_sha256": code, "lock_sha256": "l0", "python": "3.11.7",
           "torch": "2.14.1", "transformers": "5.0", "config_sha256": "k", "device": "cpu"}
    path = folder / method / "metrics.json"
    mask = {**run, "command": "mask", "code_sha256": "m0"}
    files.write_json(path, {**record, "upstream": {"mask": mask}}, provenance=run)
    return path


def test_report_lists_provenance_and_is_quiet_when_runs_agree(tmp_path, caplog):
    metrics = [write_run(tmp_path, m, "a" * 40) for m in ("full", "random")]
    reports.write_tables(reports.collect_scores(metrics), tmp_path, "glue")
    with caplog.at_level(logging.WARNING, logger="bayestune"):
        reports.write_provenance(metrics, tmp_path, "glue")
    table = pd.read_csv(tmp_path / "glue_provenance.csv")
    assert len(table) == 4 and set(table["stage"]) == {"finetune", "mask"}
    markdown = (tmp_path / "glue_table.md").read_text()
    assert "## Provenance" in markdown and "aaaaaaaaaa" in markdown
    assert "Warning" not in markdown and not caplog.records
    page = reports.write_table_html(tmp_path, "glue").read_text()
    assert page.count("<table>") == 2 and "<h2>Provenance</h2>" in page


def test_report_warns_when_a_table_mixes_commits_or_code(tmp_path, caplog):
    metrics = [write_run(tmp_path, "full", "a" * 40), write_run(tmp_path, "random", "b" * 40)]
    reports.write_tables(reports.collect_scores(metrics), tmp_path, "glue")
    with caplog.at_level(logging.WARNING, logger="bayestune"):
        reports.write_provenance(metrics, tmp_path, "glue")
    markdown = (tmp_path / "glue_table.md").read_text()
    assert "**Warning:**" in markdown and "2 different commits" in markdown
    assert any("mixes runs" in r.getMessage() for r in caplog.records)
    problems = reports.provenance_problems(reports.collect_provenance(
        [write_run(tmp_path / "x", "full", "c" * 40, code="c1"),
         write_run(tmp_path / "x", "random", "c" * 40, code="c2")]))
    assert problems == ["2 different versions of the finetune code"]


def test_report_counts_runs_without_provenance(tmp_path):
    old = tmp_path / "old.json"
    files.write_json(old, {"method": "full", "budget": "full", "task": "cb", "seed": 0,
                           "metric": "accuracy", "test_score": 0.5,
                           "trainable_fraction": 1.0})
    problems = reports.provenance_problems(reports.collect_provenance([old]))
    assert problems == ["1 run(s) record no provenance (written before it was recorded)"]


def test_provenance_counts_two_chains_runs_of_one_seed_as_two(tmp_path):
    """With --label-presets, runs of two chains share method, budget, task and seed: each
    metrics.json is still its own run."""
    metrics = [write_run(tmp_path / chain, "bayestune", "a" * 40) for chain in ("ref", "cold")]
    reports.write_provenance(metrics, tmp_path, "glue")
    table = pd.read_csv(tmp_path / "glue_provenance.csv")
    assert sorted(set(table["metrics"])) == sorted(map(str, metrics))
    row = next(line for line in (tmp_path / "glue_table.md").read_text().splitlines()
               if line.startswith("| aaaaaaaaaa"))
    assert row.rstrip(" |").endswith("| 2")

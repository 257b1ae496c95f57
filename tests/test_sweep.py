"""The validation sweep: grid checks, resumable CSV, a real (tiny) job, the summary."""

from __future__ import annotations

import pandas as pd
import pytest

from bayestune import files, sweep
from bayestune.tasks import prepare_task

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def test_grid_jobs_go_seed_by_seed_with_the_overrides():
    grid = {"runs": [{"name": "a", "sampler": {"noise_discount": 0.0}},
                     {"name": "b", "method": "random"}]}
    jobs = sweep.grid_jobs(grid, ["cb", "copa"], [0, 1])
    assert [(j.seed, j.name, j.task) for j in jobs[:4]] == [
        (0, "a", "cb"), (0, "a", "copa"), (0, "b", "cb"), (0, "b", "copa")]
    assert jobs[0].sampler == {"noise_discount": 0.0} and jobs[0].method == "bayestune"
    assert jobs[2].method == "random" and jobs[2].sampler == {}


@pytest.mark.parametrize("grid, message", [
    ({"runs": []}, "non-empty"),
    ({"runs": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ({"runs": [{"name": "a", "method": "dropout"}]}, "unknown method 'dropout'"),
    ({"runs": [{"name": "a", "sampler": {"noise_discont": 0}}]}, "noise_discont"),
    ({"runs": [{"name": "a", "mask": {"keep_heads": True}}]}, "keep_heads"),
])
def test_bad_grids_are_refused_before_anything_runs(grid, message):
    with pytest.raises(ValueError, match=message):
        sweep.grid_jobs(grid, ["cb"], [0])


def test_rows_already_in_the_csv_are_not_run_again(tmp_path, monkeypatch):
    out = tmp_path / "sweep.csv"
    jobs = sweep.grid_jobs({"runs": [{"name": "a"}, {"name": "b"}]}, ["cb"], [0])
    files.append_csv_row(out, {"name": "a", "task": "cb", "seed": 0, "method": "bayestune",
                               "val_score": 0.5}, sweep.COLUMNS)
    ran = []

    def fake_job(job, config, device):
        ran.append(job.name)
        if job.name == "b":
            return {"name": "b", "task": "cb", "seed": 0, "method": "bayestune",
                    "val_score": 0.25}
        raise AssertionError("job a is in the CSV already")

    monkeypatch.setattr(sweep, "run_job", fake_job)
    table = sweep.run_sweep({}, jobs, out)
    assert ran == ["b"]
    assert list(table["name"]) == ["a", "b"] and list(table["val_score"]) == [0.5, 0.25]
    assert out.read_text().count("val_score") == 1  # one header


def test_a_failed_job_is_reported_and_the_rest_go_on(tmp_path, monkeypatch, caplog):
    jobs = sweep.grid_jobs({"runs": [{"name": "a"}, {"name": "b"}]}, ["cb"], [0])

    def fake_job(job, config, device):
        if job.name == "a":
            raise RuntimeError("diverged")
        return {"name": "b", "task": "cb", "seed": 0, "val_score": 0.1}

    monkeypatch.setattr(sweep, "run_job", fake_job)
    table = sweep.run_sweep({}, jobs, tmp_path / "s.csv")
    assert list(table["name"]) == ["b"]
    assert "a/cb/seed0 failed: diverged" in caplog.text


def test_summary_averages_seeds_then_tasks_best_first():
    table = pd.DataFrame({
        "name": ["x", "x", "x", "y", "y"], "task": ["cb", "cb", "copa", "cb", "copa"],
        "seed": [0, 1, 0, 0, 0], "val_score": [0.2, 0.4, 0.5, 0.9, 0.7]})
    summary = sweep.summarise(table)
    assert list(summary.index) == ["y", "x"]
    assert summary.loc["x", "cb"] == pytest.approx(30.0)
    assert summary.loc["x", "avg"] == pytest.approx(40.0)
    assert summary.loc["x", "seeds"] == 2 and summary.loc["y", "seeds"] == 1


def test_a_real_job_records_the_validation_score_only(tmp_path, glue_dir):
    prepare_task("cb", MODEL, tmp_path / "prep" / "cb", glue_dir, 32)
    config = {"model": MODEL, "prepared_dir": str(tmp_path / "prep"), "main_budget": 0.02,
              "sampler": {"batch_size": 4, "steps": 4, "warmup_steps": 1, "burnin_steps": 2,
                          "thinning": 1, "checkpoint_every": 0},
              "finetune": {"batch_size": 4, "max_steps": 2, "eval_every": 2}}
    jobs = sweep.grid_jobs({"runs": [{"name": "cold", "sampler": {"noise_discount": 0.0}}]},
                           ["cb"], [0])
    table = sweep.run_sweep(config, jobs, tmp_path / "s.csv")
    row = table.iloc[0]
    assert set(table.columns) == set(sweep.COLUMNS) and "test_score" not in table.columns
    assert 0.0 <= row["val_score"] <= 1.0 and row["n_samples"] == 2
    assert row["trainable_fraction"] == pytest.approx(0.02, abs=1e-4)


def test_figure_and_comparison_use_only_seeds_every_run_finished(tmp_path):
    from bayestune.reports import plot_sweep

    table = pd.DataFrame({
        "name": ["x", "x", "y", "y", "x", "x", "y"],
        "task": ["cb", "copa"] * 3 + ["cb"],
        "seed": [0, 0, 0, 0, 1, 1, 1],
        "method": ["bayestune"] * 4 + ["bayestune"] * 2 + ["random"],
        "val_score": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]})
    kept = sweep.complete_seeds(table)
    assert set(kept["seed"]) == {0} and len(kept) == 4
    path = plot_sweep(table, tmp_path / "sweep.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_line_prints_the_summary_and_draws_the_figure(tmp_path, monkeypatch,
                                                                    capsys):
    from bayestune.cli import main

    (tmp_path / "config.yaml").write_text("model: m\nprepared_dir: p\ntasks: [cb]\nseeds: [0]\n")
    (tmp_path / "grid.yaml").write_text("runs:\n  - {name: cold, sampler: {noise_discount: 0.0}}\n"
                                        "  - {name: random, method: random}\n")
    seen = []

    def fake_job(job, config, device):
        seen.append((job.name, config["model"], device))
        return {"name": job.name, "task": job.task, "seed": job.seed, "method": job.method,
                "val_score": 0.75 if job.name == "cold" else 0.5}

    monkeypatch.setattr(sweep, "run_job", fake_job)
    out = tmp_path / "sweep" / "val.csv"
    assert main(["sweep", "--config", str(tmp_path / "config.yaml"), "--grid",
                 str(tmp_path / "grid.yaml"), "--out", str(out), "--model", "local"]) == 0
    assert seen == [("cold", "local", "cpu"), ("random", "local", "cpu")]
    printed = capsys.readouterr().out.splitlines()
    assert printed[2].startswith("cold") and "75.0" in printed[2]
    assert out.with_suffix(".png").is_file()


# --- the sampler section, resolved as the workflow resolves it ----------------------------------
BY_PRESET_AND_SEED = {
    "sampler": {"preset": "cold", "batch_size": 4, "steps": 40, "warmup_steps": 10,
                "burnin_steps": 20, "thinning": 5},
    "sampler_by_preset": {"reference": {"steps": 60, "min_steps": 0, "patience": 0,
                                        "schedule_epochs": 100}},
    "sampler_by_seed": {"1": {"reference": {"steps": 80, "burnin_steps": 30}}},
}


def test_a_sweep_chain_takes_the_presets_and_the_seeds_overrides():
    grid = {"runs": [{"name": "own"}, {"name": "ref", "sampler": {"preset": "reference"}},
                     {"name": "ref-thin", "sampler": {"preset": "reference", "thinning": 2}}]}
    jobs = {(j.name, j.seed): j for j in sweep.grid_jobs(grid, ["cb"], [0, 1])}
    own = sweep.stage1_config(BY_PRESET_AND_SEED, jobs["own", 1])
    assert (own.preset, own.steps, own.noise_discount) == ("cold", 40, 0.0)  # no overrides
    seed0 = sweep.stage1_config(BY_PRESET_AND_SEED, jobs["ref", 0])
    assert (seed0.preset, seed0.steps, seed0.burnin_steps, seed0.schedule_epochs) == (
        "reference", 60, 20, 100)  # the section, then sampler_by_preset
    seed1 = sweep.stage1_config(BY_PRESET_AND_SEED, jobs["ref", 1])
    assert (seed1.steps, seed1.burnin_steps) == (80, 30)  # then sampler_by_seed
    thin = sweep.stage1_config(BY_PRESET_AND_SEED, jobs["ref-thin", 1])
    assert (thin.steps, thin.thinning) == (80, 2)  # the run's own settings on top


def test_a_sweep_chain_is_the_workflows_chain(tmp_path):
    """Every stage-1 job of a dry run of config/gpu.yaml (three presets; sampler_by_preset
    and, for seed 0, sampler_by_seed) runs the sampler settings that the sweep resolves for
    the same preset and seed."""
    from shared_runs import copy_workflow
    from test_workflow import bayestune_commands, snakemake

    from bayestune.cli import build_parser, parse_command

    workdir = copy_workflow(tmp_path / "workflow")
    result = snakemake(workdir, "-n", "-p", "--cores", "1", "--configfile", "config/gpu.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    config = sweep.read_yaml(workdir / "config/gpu.yaml")
    parser = build_parser()
    seen = {}
    for argv in bayestune_commands(result.stdout)["sample"]:
        _, settings = parse_command(argv, parser)
        job = sweep.SweepJob("x", "bayestune", settings.task, settings.seed,
                             {"preset": settings.sampler.preset})
        assert sweep.stage1_config(config, job) == settings.sampler, argv
        seen[settings.sampler.preset, settings.seed] = settings.sampler.steps
    # the overrides took part: reference's own length, and seeds 0 and 1's full-length chains
    assert seen["reference", 0] == seen["reference", 1] == 20000
    assert seen["reference", 2] == 2000
    assert {preset for preset, _ in seen} == {"reference", "exact", "cold"}

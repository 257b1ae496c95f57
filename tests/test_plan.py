"""`bayestune plan`: job counts from Snakemake's dry run, hours from steps x measured cost,
disk from the file formats (checked against files actually written), DVC cache from dvc.yaml."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from shared_runs import tiny_encoder
from test_workflow import copy_workflow
from transformers import AutoConfig

from bayestune import cli, files, sizes
from bayestune.delta import make_delta
from bayestune.plan import format_plan, make_plan, parse_job_stats

REPO = Path(__file__).resolve().parents[1]
COSTS = yaml.safe_load((REPO / "config/costs.yaml").read_text())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("plan"))


@pytest.fixture(scope="module")
def tiny_plan(workdir):
    return make_plan("tests/config/tiny.yaml", workdir)


@pytest.fixture(scope="module")
def paper_plan(workdir):
    return make_plan("config/config.yaml", workdir)


def planned(plan, rule: str) -> list:
    return [job for job in plan.jobs if job.rule == rule]


def test_jobs_are_snakemakes(tiny_plan) -> None:
    counts = tiny_plan.job_counts
    assert counts["total"] == sum(n for rule, n in counts.items() if rule != "total")
    for rule, n in counts.items():
        if rule != "total":
            assert len(planned(tiny_plan, rule)) == n, rule
    # tiny.yaml: 2 tasks x 1 seed; bayestune and random at 2 budgets, plus full
    assert (counts["sample"], counts["mask"], counts["mask_bayestune"], counts["finetune"]) == (
        2, 2, 2, 10)


def test_hours_are_steps_times_measured_cost(tiny_plan) -> None:
    config = yaml.safe_load((REPO / "tests/config/tiny.yaml").read_text())
    cpu = COSTS["models"]["minilm"]["seconds_per_step"]["cpu"]
    # measured at 16 x 128 tokens; tiny.yaml runs batches of 8 x 64
    scale = config["sampler"]["batch_size"] * config["max_length"] / (16 * 128)
    for job in planned(tiny_plan, "sample"):
        assert job.steps == config["sampler"]["steps"]
        assert job.hours == pytest.approx(job.steps * cpu["stage1"] * scale / 3600)
    full = [j for j in planned(tiny_plan, "finetune") if any("/full/" in f.path for f in j.files)]
    masked = [j for j in planned(tiny_plan, "finetune") if j not in full]
    steps = config["finetune"]["max_steps"]
    assert len(full) == 2 and len(masked) == 8
    assert all(j.hours == pytest.approx(steps * cpu["adamw"] * scale / 3600) for j in full)
    assert all(j.hours == pytest.approx(steps * cpu["stage2"] * scale / 3600) for j in masked)
    assert tiny_plan.device == "cpu" and "CPU-hours" in format_plan(tiny_plan)
    # tiny.yaml's jobs take one thread each, so 2 cores run two at once
    assert {job.threads for job in tiny_plan.jobs if job.steps} == {1}
    assert tiny_plan.wall_hours(2) == pytest.approx(sum(j.hours for j in tiny_plan.jobs) / 2)


def test_paper_plan(paper_plan) -> None:
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    runs = len(config["tasks"]) * len(config["seeds"])
    assert paper_plan.job_counts["sample"] == runs
    assert paper_plan.n_scalars == 125_237_762  # jiant: encoder, its pooler, a 2-class head
    gpu = COSTS["models"]["roberta-base"]["seconds_per_step"]["cuda"]
    stage1 = sum(job.hours for job in planned(paper_plan, "sample"))
    from bayestune.sampler import sampler_config_from_section

    steps = sampler_config_from_section(config["sampler"]).shortest_run  # reference: 20001
    assert steps == 20001
    expected = runs * steps * gpu["stage1"] * (256 / 128) / 3600
    assert stage1 == pytest.approx(expected)
    kinds = paper_plan.by_kind().set_index("kind")
    assert kinds.loc["scale files", "results"] == pytest.approx(runs * 4 * paper_plan.n_scalars,
                                                                rel=1e-3)
    ranked = sum(paper_plan.job_counts[rule] for rule in ("mask", "mask_bayestune",
                                                          "mask_started"))
    assert kinds.loc["masks", "files"] == ranked * len(config["budgets"]) + paper_plan.job_counts[
        "mask_fixed"]
    # magnitude's start weights: a whole model per (task, seed), tracked but not cached
    assert kinds.loc["start weights", "files"] == paper_plan.job_counts["mask_started"]
    assert kinds.loc["start weights", "cache"] == 0
    # a mask at 0.5% of RoBERTa-base: about 4 bytes per selected scalar, not a byte per scalar
    masks = [f for job in paper_plan.jobs for f in job.files
             if f.kind == "masks" and f.path.endswith("p0.005.safetensors")
             and "/bitfit/" not in f.path]
    assert all(2.4e6 < f.bytes < 2.65e6 for f in masks)
    assert paper_plan.cache_bytes <= 10e9
    assert kinds.loc["scale files", "cache"] == 0 and kinds.loc["deltas, full", "cache"] == 0
    assert kinds.loc["masks", "cache"] == kinds.loc["masks", "results"]
    text = format_plan(paper_plan)
    assert "GPU-hours" in text and "--resources gpu=" in text
    assert "tracked, not cached: results/scales, results/finetune" in text


def test_gpu_jobs_take_a_gpu_slot(paper_plan, tiny_plan) -> None:
    gradient = {"magnitude", "lt-sft", "fisher", "sam"}
    for job in paper_plan.jobs:
        if job.command is None or job.command[0] not in ("sample", "finetune", "mask"):
            continue
        wants_gpu = job.command[0] != "mask" or job.command[job.command.index("--method") + 1] \
            in gradient
        assert ("--gpu-slots" in job.command) == wants_gpu, job.command
        if wants_gpu:
            assert job.command[job.command.index("--gpu-slots") + 1] == "results/.gpu_slots"
    # device: cpu asks for no GPU, so no job takes a slot
    assert not any("--gpu-slots" in (job.command or []) for job in tiny_plan.jobs)


def test_remaining_jobs_only(workdir, tiny_plan) -> None:
    plan = make_plan("tests/config/tiny.yaml", workdir, remaining=True)
    assert plan.job_counts == tiny_plan.job_counts  # nothing has run in the copy yet
    assert parse_job_stats("Building DAG of jobs...\nNothing to be done.") == {}


def _exact_masks(shapes, counts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, shape in shapes.items():
        flat = torch.zeros(sizes.numel(shape), dtype=torch.bool)
        flat[torch.randperm(flat.numel(), generator=gen)[:counts[name]]] = True
        masks[name] = flat.reshape(shape)
    return masks


SHAPES = {"encoder.embed.weight": (300, 400), "encoder.layer.weight": (70_000,),
          "encoder.layer.bias": (17,), "head.out.weight": (5, 300), "head.out.bias": (5,)}


@pytest.mark.parametrize(("method", "budget"), [("random", 0.005), ("random", 0.2),
                                                ("bitfit", 0.005)])
def test_mask_estimate_is_the_written_file(tmp_path, method, budget) -> None:
    counts = sizes.selected_counts(SHAPES, method, budget)
    path = tmp_path / "mask.safetensors"
    files.save_mask(path, _exact_masks(SHAPES, counts), {"method": method, "budget": budget})
    assert sizes.mask_file_bytes(SHAPES, counts) == pytest.approx(path.stat().st_size, abs=600)


@pytest.mark.parametrize("kind", ["full", "masked", "lora"])
def test_delta_estimate_is_the_written_file(tmp_path, kind) -> None:
    shapes = {**SHAPES, "encoder.attn.query.weight": (200, 200), "encoder.attn.key.weight":
              (200, 200)}
    if kind == "full":
        changed = sizes.full_changes(shapes)
    elif kind == "masked":
        changed = sizes.selected_counts(shapes, "bayestune", 0.01)
    else:
        changed = sizes.lora_changes(shapes, "query,value")
        assert set(changed) == {"encoder.attn.query.weight", "head.out.weight", "head.out.bias"}
    theta0 = {n: torch.zeros(s) for n, s in shapes.items()}
    model = torch.nn.Module()
    for n, m in _exact_masks(shapes, {n: changed.get(n, 0) for n in shapes}).items():
        model.register_parameter(n.replace(".", "_"), torch.nn.Parameter(m.float()))
    delta = make_delta(model, {n.replace(".", "_"): t for n, t in theta0.items()})
    path = tmp_path / "delta.safetensors"
    files.save_delta(path, delta, {})
    estimate = sizes.delta_file_bytes(shapes, changed)
    assert estimate == pytest.approx(path.stat().st_size, abs=600)


def test_cli_prints_the_plan_or_one_clear_error(workdir, tiny_plan, tmp_path, capsys) -> None:
    assert cli.main(["plan", "--configfile", "tests/config/tiny.yaml", "--directory",
                     str(workdir)]) == 0
    out = capsys.readouterr().out
    total = tiny_plan.job_counts["total"]
    assert f"plan for tests/config/tiny.yaml: {total} jobs" in out and "CPU-hours" in out
    assert cli.main(["plan", "--configfile", "config.yaml", "--directory", str(tmp_path)]) == 2
    assert "no Snakefile" in capsys.readouterr().err


def test_the_plan_sizes_the_model_after_the_vocabulary_cut(workdir, tmp_path, tmp_path_factory,
                                                           glue_dir, monkeypatch) -> None:
    source = tiny_encoder(tmp_path_factory)
    config = yaml.safe_load((REPO / "tests/config/tiny.yaml").read_text())
    config.update(model=str(source), glue_dir=str(glue_dir),
                  prepared_dir=str(tmp_path / "prepared"))
    (workdir / "uncut.yaml").write_text(yaml.safe_dump(config))
    (workdir / "cut.yaml").write_text(yaml.safe_dump({**config, "model_vocabulary": "tasks"}))
    monkeypatch.delenv("BAYESTUNE_GLUE_DIR", raising=False)
    uncut, counted = make_plan("uncut.yaml", workdir), make_plan("cut.yaml", workdir)

    # the cut the workflow's own command makes
    cut_model = tmp_path / "prepared/model"
    assert cli.main(["-q", "cut-vocabulary", "--tasks", *config["tasks"], "--model", str(source),
                     "--out-dir", str(cut_model), "--data-dir", str(glue_dir)]) == 0
    written, full = AutoConfig.from_pretrained(cut_model), AutoConfig.from_pretrained(source)
    removed = (full.vocab_size - written.vocab_size) * full.hidden_size
    assert removed > 0 and counted.n_scalars == uncut.n_scalars - removed
    assert f"vocabulary cut: {written.vocab_size} tokens (counted)" in counted.notes[0]
    scale_bytes = [sum(f.bytes for j in plan.jobs for f in j.files if f.kind == "scale files")
                   for plan in (counted, uncut)]
    assert scale_bytes[0] == pytest.approx(
        scale_bytes[1] - sizes.FLOAT_BYTES * removed * len(config["tasks"]), rel=1e-3)

    read = make_plan("cut.yaml", workdir)  # once written, the cut model itself
    assert read.n_scalars == counted.n_scalars and str(cut_model) in read.notes[0]

    shutil.rmtree(cut_model)
    (workdir / "nodata.yaml").write_text(yaml.safe_dump(
        {**config, "model_vocabulary": "tasks", "glue_dir": str(tmp_path / "no_data")}))
    unknown = make_plan("nodata.yaml", workdir)
    assert unknown.n_scalars == uncut.n_scalars and "full vocabulary, an upper bound" in \
        unknown.notes[0]

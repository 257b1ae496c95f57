"""Errors that keep their information: what the command line says when input is bad, and
that everything else (bugs, out of memory) keeps its traceback."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from test_defects import FINETUNE_FLAGS, prepared, tiny_model_dir  # noqa: F401 (fixtures)
from test_glue import good, three_splits, write_task

from bayestune import errors, files
from bayestune.cli import main
from bayestune.commands import prepare as prepare_command
from bayestune.errors import BayesTuneError
from bayestune.finetune import FinetuneConfig
from bayestune.methods import LoraSettings
from bayestune.models.text import ModelNotFoundError
from bayestune.models.vision import ModelLoadError, build_vision_model
from bayestune.prior import LaplaceGammaPrior
from bayestune.sampler import SamplerConfig, SamplerConfigError, SamplingDivergedError
from bayestune.scale_checks import DegenerateScalesError
from bayestune.tasks import build_task_model
from bayestune.tasks.base import TaskError

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = "vit_tiny_patch16_224?pretrained=false&img_size=32&patch_size=8&depth=2"


def error_line(capsys) -> str:
    """The one line a project error prints last on stderr (after any model-loading bars)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("bayestune ") and ": error: " in last, err
    return last


# --- budgets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", ["0", "1.5", "-0.1"])
def test_bad_budget_shows_the_budget_check_message(budget, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["mask", "--method", "random", "--task", "rte", "--model", "minilm",
              "--budgets", budget, "--out-dir", str(tmp_path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"budget {float(budget)!r} is outside the valid range (0, 1]" in err
    assert "invalid parse_budgets value" not in err


def test_budget_that_selects_nothing_fails_at_mask_time(tmp_path, tiny_model_dir, capsys):  # noqa: F811
    model = build_task_model("rte", tiny_model_dir, 0)
    scales = tmp_path / "scales.safetensors"
    files.save_scales(scales, {n: torch.rand(p.shape) for n, p in model.named_parameters()},
                      {"model_id": model.model_id, "architecture": model.architecture})
    out = tmp_path / "masks"
    command = ["-q", "mask", "--method", "bayestune", "--scores", str(scales), "--task", "rte",
               "--model", tiny_model_dir, "--out-dir", str(out)]
    assert main([*command, "--budgets", "1e-7,0.01"]) == 2
    assert "budget 1e-07 selects no scalar of the model's" in error_line(capsys)
    assert not out.exists()
    assert main([*command, "--budgets", "1e-6", "--per-tensor"]) == 2
    assert "selects no scalar in any tensor" in error_line(capsys)
    # A kept head is something to train whatever the budget.
    assert main([*command, "--budgets", "1e-7", "--keep-head"]) == 0
    mask, _ = files.load_mask(out / "p1e-07.safetensors")
    assert mask["head.out_proj.weight"].all()


# --- data and files -----------------------------------------------------------------------------
def test_non_utf8_data_names_file_and_line(tmp_path, glue_dir, capsys):
    write_task(tmp_path, "rte", three_splits(good("rte", glue_dir, n=4)))
    path = tmp_path / "rte" / "train.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"', b'"\xff', 1)  # Latin-1 text saved as is
    path.write_bytes(b"".join(lines))
    assert main(["prepare", "--task", "rte", "--model", "minilm", "--data-dir", str(tmp_path),
                 "--out-dir", str(tmp_path / "out")]) == 2
    line = error_line(capsys)
    assert f"{path}:3: not UTF-8 text" in line and "b'\\xff'" in line


def _damaged_header(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:12] + b"\0" * 10 + raw[22:])  # control bytes inside the JSON header


def test_corrupted_safetensors_files_are_named(tmp_path, tiny_model_dir, capsys):  # noqa: F811
    delta = tmp_path / "delta.safetensors"
    files.save_delta(delta, {}, {"task": "rte", "model": tiny_model_dir, "seed": 0})
    command = ["apply-delta", "--task", "rte", "--model", tiny_model_dir, "--delta", str(delta),
               "--out", str(tmp_path / "out.safetensors")]
    _damaged_header(delta)
    assert main(command) == 2
    assert f"{delta}: not a readable safetensors file" in error_line(capsys)

    # Our own metadata inside an intact file.
    header = json.dumps({"__metadata__": {"bayestune": "{not json"}}).encode()
    delta.write_bytes(struct.pack("<Q", len(header)) + header)
    assert main(command) == 2
    assert f"{delta}: its bayestune metadata is damaged" in error_line(capsys)

    # The weights of a model folder: safetensors' own message names no file.
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    _damaged_header(model / "model.safetensors")
    assert main(["mask", "--method", "random", "--task", "rte", "--model", str(model),
                 "--budgets", "0.01", "--out-dir", str(tmp_path / "masks")]) == 2
    assert f"{model / 'model.safetensors'}: not a readable safetensors file" in error_line(capsys)


def test_corrupted_vision_checkpoint_is_named(tmp_path):
    source = build_vision_model(TINY_VIT, num_classes=3, seed=0)
    ckpt = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, str(ckpt))
    _damaged_header(ckpt)
    with pytest.raises(ModelLoadError, match=f"{ckpt}: not a readable safetensors file"):
        build_vision_model(TINY_VIT.replace("pretrained=false", f"checkpoint={ckpt}"), 3, 0)


# --- which errors become one line ----------------------------------------------------------------
def test_every_project_error_shares_the_base_and_keeps_its_builtin_one():
    from bayestune.devices import NoFreeGpuSlot
    from bayestune.files import FileFormatError
    from bayestune.methods.registry import MethodError
    from bayestune.plan import PlanError

    kept = {MethodError: ValueError, PlanError: ValueError, NoFreeGpuSlot: RuntimeError,
            FileFormatError: ValueError, TaskError: ValueError, SamplerConfigError: ValueError,
            SamplingDivergedError: RuntimeError, ModelNotFoundError: FileNotFoundError,
            ModelLoadError: ValueError, DegenerateScalesError: RuntimeError,
            errors.ConfigError: ValueError, errors.DataError: ValueError,
            errors.MissingFileError: FileNotFoundError, errors.RunFailedError: RuntimeError}
    for cls, builtin in kept.items():
        assert issubclass(cls, BayesTuneError) and issubclass(cls, builtin), cls


def test_config_validation_errors_are_project_errors(tmp_path, capsys):
    for make in (lambda: FinetuneConfig(max_steps=0), lambda: FinetuneConfig(warmup_ratio=1.0),
                 lambda: SamplerConfig(steps=0), lambda: LaplaceGammaPrior(alpha=0.0)):
        with pytest.raises(BayesTuneError):
            make()
    assert main(["finetune", "--task", "rte", "--model", "minilm", "--out-dir", str(tmp_path),
                 "--max-steps", "0"]) == 2
    assert "max_steps (>= 1), eval_every and patience must be at least 1" in error_line(capsys)


@pytest.mark.parametrize("unexpected", [IndexError("index 7 is out of bounds for dimension 0"),
                                        ValueError("a bug deep in a library"),
                                        torch.cuda.OutOfMemoryError("CUDA out of memory")])
def test_unexpected_errors_keep_their_traceback(unexpected, monkeypatch, tmp_path):
    def fails(args):
        raise unexpected

    monkeypatch.setattr(prepare_command, "run", fails)
    with pytest.raises(type(unexpected)) as raised:
        main(["prepare", "--task", "rte", "--model", "minilm", "--out-dir", str(tmp_path)])
    assert raised.value is unexpected


def test_project_errors_become_one_line(monkeypatch, tmp_path, capsys):
    def fails(args):
        raise errors.DataError("data/x.jsonl:3: something to fix")

    monkeypatch.setattr(prepare_command, "run", fails)
    assert main(["prepare", "--task", "rte", "--model", "minilm", "--out-dir", str(tmp_path)]) == 2
    assert error_line(capsys) == "bayestune prepare: error: data/x.jsonl:3: something to fix"


# --- what metrics.json records -------------------------------------------------------------------
def test_metrics_record_every_finetune_and_lora_setting(tmp_path, tiny_model_dir, prepared):  # noqa: F811
    assert main(["-q", "finetune", "--task", "rte", "--model", tiny_model_dir, "--data",
                 str(prepared["rte"]), "--out-dir", str(tmp_path), *FINETUNE_FLAGS,
                 "--method", "lora", "--lora-rank", "2", "--lr", "3e-4"]) == 0
    metrics = files.read_json(tmp_path / "metrics.json")
    expected = dataclasses.asdict(FinetuneConfig(max_steps=2, eval_every=2, lr=3e-4))
    assert metrics["finetune"] == {**expected, "batch_size": 4, "eval_batch_size": 128}
    assert metrics["lora"] == dataclasses.asdict(LoraSettings(rank=2))
    assert metrics["method"] == "lora"


# --- after a killed Snakemake run (the README's recipe) -------------------------------------------
@pytest.mark.slow
def test_readme_recipe_after_a_killed_snakemake_run(tmp_path, tiny_model_dir, glue_dir):  # noqa: F811
    from test_workflow import BIN, copy_workflow, run_env, snakemake, write_config

    readme = (REPO / "README.md").read_text()
    assert "--unlock" in readme and ".snakemake/locks" in readme
    run = copy_workflow(tmp_path / "run")
    tiny = yaml.safe_load((run / "tests/config/tiny.yaml").read_text())
    config = write_config(run / "killed.yaml", run / "tests/config/tiny.yaml", tasks=["cb"],
                          model=tiny_model_dir, max_length=32,
                          sampler={**tiny["sampler"], "steps": 100, "checkpoint_every": 5})
    target = "results/tiny/scales/exact/cb/seed0.safetensors"
    args = [target, "--cores", "1", "--configfile", str(config)]
    checkpoint = run / "results/tiny/scales/exact/cb/seed0.ckpt"
    env = run_env(glue_dir)
    proc = subprocess.Popen([str(BIN / "snakemake"), *args], cwd=run, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: the lock stays
    proc.wait(timeout=60)
    assert checkpoint.exists() and not (run / target).exists()

    locks = run / ".snakemake/locks"
    assert list(locks.iterdir()), "the kill left no lock: nothing to test"
    assert snakemake(run, *args, "--unlock", env=env).returncode == 0
    assert not locks.exists() or not list(locks.iterdir())
    again = snakemake(run, *args, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    log = (run / "results/tiny/logs/sample/exact/cb/seed0.log").read_text()
    assert "stage 1 resumed from step" in log
    assert (run / target).is_file() and not checkpoint.exists()
    assert not list(checkpoint.parent.glob(".*.tmp"))

"""Results that used to come out silently wrong, each reproduced through the command line.

Every test runs the real `bayestune` commands on a tiny random BERT saved as a local model
folder (with MiniLM's tokenizer) and the real RTE and MRPC data: two tasks whose models have
exactly the same shapes, so only the files' own records can tell them apart.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from bayestune import files
from bayestune.cli import main
from bayestune.delta import apply_delta
from bayestune.masks import mask_metadata
from bayestune.models.text import load_tokenizer
from bayestune.scale_checks import PLAUSIBLE_FACTOR, scale_problems
from bayestune.tasks import build_task_model, prepare_task

REPO = Path(__file__).resolve().parents[1]
SAMPLER_FLAGS = ["--steps", "6", "--warmup-steps", "2", "--burnin-steps", "3", "--thinning", "1",
                 "--batch-size", "4"]
FINETUNE_FLAGS = ["--max-steps", "2", "--eval-every", "2", "--batch-size", "4",
                  "--eval-batch-size", "128"]


# --- a tiny model and two same-shaped tasks ---------------------------------------------------
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 1-layer BERT with hidden size 16 and MiniLM's tokenizer, as a local model folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = load_tokenizer("minilm")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, tiny_model_dir, glue_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prepared")
    return {task: prepare_task(task, tiny_model_dir, root / task, glue_dir, max_length=32)
            for task in ("rte", "mrpc")}


def finetune(model: str, data: Path, task: str, out_dir: Path, *extra: str) -> int:
    return main(["-q", "finetune", "--task", task, "--model", model, "--data", str(data),
                 "--out-dir", str(out_dir), *FINETUNE_FLAGS, *extra])


def encoder_only_mask(model_dir: str, task: str, seed: int, path: Path, /, **meta) -> Path:
    """A mask that trains one encoder tensor and freezes the whole head; ``meta`` replaces
    what the file records (None: not recorded, as in files of older versions)."""
    shapes = {n: p.shape for n, p in build_task_model(task, model_dir, seed).named_parameters()}
    mask = {n: torch.zeros(s, dtype=torch.bool) for n, s in shapes.items()}
    mask["encoder.encoder.layer.0.output.dense.bias"][:] = True
    record = {"task": task, "model": model_dir, "seed": seed, "architecture": "jiant", **meta}
    files.save_mask(path, mask, mask_metadata(mask, 0.01, method="random",
                                              **{k: v for k, v in record.items() if v is not None}))
    return path


# --- 1. apply-delta rebuilds the head from the seed the delta records -------------------------
def test_apply_delta_uses_the_seed_the_delta_records(tmp_path, tiny_model_dir, prepared, capsys):
    model = tiny_model_dir
    mask = encoder_only_mask(model, "rte", 1, tmp_path / "mask.safetensors")
    assert finetune(model, prepared["rte"], "rte", tmp_path / "run", "--seed", "1",
                    "--mask", str(mask)) == 0
    delta_path = tmp_path / "run" / "delta.safetensors"
    assert files.load_delta(delta_path)[1]["seed"] == 1

    out = tmp_path / "tuned.safetensors"
    assert main(["apply-delta", "--task", "rte", "--model", model, "--delta", str(delta_path),
                 "--out", str(out)]) == 0
    expected = build_task_model("rte", model, 1)  # the run's head, frozen, so not in the delta
    apply_delta(expected, files.load_delta(delta_path)[0])
    rebuilt, _ = files.load_model_state(out)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(rebuilt[name], tensor), name

    # Another seed would give another head: refused, whatever the order of the flags.
    assert main(["apply-delta", "--task", "rte", "--model", model, "--delta", str(delta_path),
                 "--out", str(tmp_path / "other.safetensors"), "--seed", "0"]) == 2
    assert "seed 1" in capsys.readouterr().err
    assert not (tmp_path / "other.safetensors").exists()
    assert main(["apply-delta", "--task", "rte", "--model", model, "--delta", str(delta_path),
                 "--out", str(tmp_path / "same.safetensors"), "--seed", "1"]) == 0


# --- 2. masks and deltas of another task or model ---------------------------------------------
def test_mask_and_delta_of_another_task_are_refused(tmp_path, tiny_model_dir, prepared, capsys):
    model = tiny_model_dir
    masks = tmp_path / "masks"
    assert main(["-q", "mask", "--method", "random", "--task", "rte", "--model", model,
                 "--budgets", "0.01", "--out-dir", str(masks)]) == 0
    rte_mask = masks / "p0.01.safetensors"
    assert finetune(model, prepared["mrpc"], "mrpc", tmp_path / "mrpc-run", "--mask",
                    str(rte_mask)) == 2
    err = capsys.readouterr().err
    assert str(rte_mask) in err and "task 'rte', not 'mrpc'" in err
    assert not (tmp_path / "mrpc-run" / "metrics.json").exists()

    assert finetune(model, prepared["mrpc"], "mrpc", tmp_path / "full") == 0
    delta = tmp_path / "full" / "delta.safetensors"
    assert main(["apply-delta", "--task", "rte", "--model", model, "--delta", str(delta),
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "task 'mrpc', not 'rte'" in capsys.readouterr().err

    other_model = encoder_only_mask(model, "rte", 0, tmp_path / "m.safetensors", model="other")
    assert finetune(model, prepared["rte"], "rte", tmp_path / "r", "--mask", str(other_model)) == 2
    assert "model 'other'" in capsys.readouterr().err


def test_old_mask_without_task_and_model_is_read_with_a_warning(tmp_path, tiny_model_dir,
                                                                prepared, caplog):
    legacy = encoder_only_mask(tiny_model_dir, "rte", 0, tmp_path / "old.safetensors",
                               task=None, model=None)
    assert "task" not in files.load_mask(legacy)[1]
    with caplog.at_level(logging.WARNING):
        assert finetune(tiny_model_dir, prepared["rte"], "rte", tmp_path / "run", "--mask",
                        str(legacy)) == 0
    assert "records no model or task" in caplog.text
    assert (tmp_path / "run" / "metrics.json").is_file()


# --- 3. a mask and LoRA at once ---------------------------------------------------------------
def test_mask_with_lora_is_refused(tmp_path, tiny_model_dir, prepared, capsys):
    mask = encoder_only_mask(tiny_model_dir, "rte", 0, tmp_path / "mask.safetensors")
    assert finetune(tiny_model_dir, prepared["rte"], "rte", tmp_path / "run", "--mask", str(mask),
                    "--method", "lora") == 2
    assert "--mask and --method lora" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --- 4. a killed sampler's temporary checkpoint -----------------------------------------------
# Runs `bayestune sample` in its own process and SIGKILLs it from inside its second checkpoint
# write, after part of the file is out: exactly where a scheduler's kill leaves a temporary.
KILL_MID_CHECKPOINT = """
import os, signal, sys
from bayestune import cli, files
real, calls = files.save_checkpoint, []
def save_then_die(path, state, attachments=None):
    calls.append(path)
    if len(calls) < 2:
        return real(path, state, attachments)
    with files.atomic_output(path) as tmp:
        tmp.write_bytes(b"the first bytes of a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
files.save_checkpoint = save_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_resumed_sampler_removes_the_killed_run_temporary(tmp_path, tiny_model_dir, prepared,
                                                          caplog):
    out, checkpoint = tmp_path / "seed0.safetensors", tmp_path / "seed0.ckpt"
    command = ["-q", "sample", "--task", "rte", "--model", tiny_model_dir, "--data",
               str(prepared["rte"]), "--out", str(out), "--checkpoint", str(checkpoint),
               *SAMPLER_FLAGS, "--checkpoint-every", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILL_MID_CHECKPOINT, *command], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    left = list(tmp_path.glob(".seed0.ckpt.*.tmp"))
    assert len(left) == 1 and checkpoint.is_file()

    with caplog.at_level(logging.INFO):
        assert main(command) == 0
    assert "resumed from step 2" in caplog.text
    assert out.is_file() and not checkpoint.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "seed0.diagnostics.json", "seed0.safetensors", "seed0.traces.safetensors"]


def test_only_dead_writers_temporaries_are_removed(tmp_path):
    target = tmp_path / "seed0.ckpt"
    host = files._writer().rpartition("-")[0]
    live = subprocess.Popen(["sleep", "60"])
    ended = subprocess.Popen(["true"])
    ended.wait()  # reaped: its pid names no process now
    try:
        temporaries = {
            "live": tmp_path / f".seed0.ckpt.{host}-{live.pid}.abc123.tmp",
            "dead": tmp_path / f".seed0.ckpt.{host}-{ended.pid}.abc123.tmp",
            "mine": tmp_path / f".seed0.ckpt.{files._writer()}.abc123.tmp",
            "other_host": tmp_path / ".seed0.ckpt.elsewhere-1.abc123.tmp",
            "other_host_old": tmp_path / ".seed0.ckpt.elsewhere-2.abc123.tmp",
            "legacy": tmp_path / ".seed0.ckpt.k3_x9q2w.tmp",
            "legacy_old": tmp_path / ".seed0.ckpt.a8b7c6d5.tmp",
            "other_target": tmp_path / f".seed0.ckpt.bak.{host}-{ended.pid}.abc123.tmp",
            "not_a_temporary": tmp_path / ".seed0.ckpt.notes.txt",
        }
        for path in temporaries.values():
            path.write_bytes(b"x")
        hours_ago = time.time() - 2 * files.STALE_TEMPORARY_SECONDS
        for key in ("other_host_old", "legacy_old"):
            os.utime(temporaries[key], (hours_ago, hours_ago))
        removed = files.remove_stale_temporaries(target)
    finally:
        live.kill()
        live.wait()
    assert sorted(removed) == sorted(temporaries[k] for k in ("dead", "other_host_old",
                                                              "legacy_old"))
    assert {k for k, p in temporaries.items() if p.exists()} == {
        "live", "mine", "other_host", "legacy", "other_target", "not_a_temporary"}


# --- 5. a degenerate chain ----------------------------------------------------------------------
def test_degenerate_chain_fails_the_job_unless_allowed(tmp_path, tiny_model_dir, prepared,
                                                       capsys):
    out = tmp_path / "seed0.safetensors"
    command = ["-q", "sample", "--task", "rte", "--model", tiny_model_dir, "--data",
               str(prepared["rte"]), "--out", str(out), "--checkpoint",
               str(tmp_path / "seed0.ckpt"), *SAMPLER_FLAGS, "--lr-lambda", "1e6"]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "stage 1 of rte, seed 0" in err and "lr_lambda=1e+06" in err
    assert "--allow-degenerate-scales" in err and "seed0.ckpt" in err
    assert not out.exists()

    # The finished checkpoint is kept, so accepting the result costs no second chain.
    assert main([*command, "--allow-degenerate-scales"]) == 0
    scales, _ = files.load_scales(out)
    assert max(float(t.max()) for t in scales.values()) > 1e4


def test_scale_checks_name_each_kind_of_degeneracy() -> None:
    gen = torch.Generator().manual_seed(0)
    good = {"a": torch.rand(50, generator=gen) * 1e-3, "b": torch.rand(3, 4, generator=gen)}
    check = dict(floor=1e-8, largest_weight=2.0, lr_lambda=1e-2)
    assert scale_problems(good, **check) == []
    # The bound follows the model's largest weight (and is never below PLAUSIBLE_FACTOR).
    near = {"a": torch.full((3,), 0.9 * PLAUSIBLE_FACTOR * 2.0), "b": torch.zeros(2)}
    assert scale_problems(near, **check) == []
    assert "lr_lambda=0.01" in scale_problems({**near, "c": torch.tensor([1e3])}, **check)[0]
    assert scale_problems({"a": torch.tensor([50.0, 0.0])},
                          **{**check, "largest_weight": 0.01}) == []
    nan = {**good, "b": torch.tensor([1.0, float("nan")])}
    assert "NaN or infinite" in scale_problems(nan, **check)[0]
    floor = {"a": torch.full((4,), 1e-8), "b": torch.full((2, 2), 1e-8)}
    assert "at the floor" in scale_problems(floor, **check)[0]
    same = {"a": torch.full((4,), 1e-4), "b": torch.full((2,), 1e-4)}
    assert "every scale equals" in scale_problems(same, **check)[0]


# --- 6. Snakemake run from inside workflow/ ----------------------------------------------------
def test_snakemake_outside_the_repository_root_stops_at_once(tmp_path):
    from test_workflow import copy_workflow, snakemake

    root = copy_workflow(tmp_path / "repo")
    args = ("-n", "--cores", "1", "--configfile", "../config/demo.yaml")
    inside = snakemake(root / "workflow", *args)  # no Snakefile here: snakemake says so
    pointed = snakemake(root / "workflow", "--snakefile", "../Snakefile", *args)
    for run in (inside, pointed):
        assert run.returncode != 0
        assert "Nothing to be done" not in run.stdout + run.stderr
    assert "no snakefile found" in (inside.stdout + inside.stderr).lower()
    printed = pointed.stdout + pointed.stderr
    assert f"run Snakemake from the repository root, {root.resolve()}" in printed

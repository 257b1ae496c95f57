"""Encoders beyond BERT/RoBERTa through the whole command line: tiny random DeBERTa-v2,
ELECTRA and DistilBERT folders on a sentence-pair task, and a timm ResNet checkpoint on an
image task; each runs prepare, sample, mask, finetune and apply-delta."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from task_data import save_tiny_text_model, write_reviews

from bayestune import files
from bayestune.cli import main
from bayestune.tasks import build_task_model
from bayestune.tasks.custom import read_task_file

TEXT_FAMILIES = ["deberta-v2", "electra", "distilbert"]
# What each family's forward takes of the tokenizer's outputs (MiniLM's tokenizer gives all
# three): DistilBERT has no segment input, this DeBERTa-v2 no segment embedding.
INPUTS = {"deberta-v2": ("input_ids", "attention_mask"),
          "electra": ("input_ids", "attention_mask", "token_type_ids"),
          "distilbert": ("input_ids", "attention_mask")}
SAMPLE = ["--steps", "6", "--warmup-steps", "2", "--burnin-steps", "3", "--thinning", "1",
          "--batch-size", "8", "--checkpoint-every", "0"]
FINETUNE = ["--max-steps", "4", "--eval-every", "2", "--batch-size", "8", "--lr", "1e-2"]


def run_pipeline(tmp: Path, task: str, model: str, task_file: Path, budget: str) -> dict:
    """The five subcommands as the workflow calls them; every one must succeed."""
    common = ["--task", task, "--task-file", str(task_file), "--model", model]
    steps = [
        ["prepare", *common, "--out-dir", str(tmp / "prep"), "--max-length", "32"],
        ["sample", *common, "--data", str(tmp / "prep"), "--out", str(tmp / "scales.safetensors"),
         "--device", "cpu", *SAMPLE],
        ["mask", *common, "--method", "bayestune", "--scores", str(tmp / "scales.safetensors"),
         "--budgets", budget, "--out-dir", str(tmp / "masks")],
        ["finetune", *common, "--data", str(tmp / "prep"), "--device", "cpu",
         "--mask", str(tmp / "masks" / f"p{budget}.safetensors"), "--out-dir", str(tmp / "run"),
         *FINETUNE],
        ["apply-delta", *common, "--delta", str(tmp / "run/delta.safetensors"),
         "--out", str(tmp / "tuned.safetensors")],
    ]
    for argv in steps:
        assert main(["-q", *argv]) == 0, argv[0]
    return json.loads((tmp / "run/metrics.json").read_text())


def check_tuned_model(tmp: Path, task: str, model_name: str, task_file: Path) -> None:
    """apply-delta's weights are the base model's except exactly where the delta says."""
    base = build_task_model(task, model_name, 0, read_task_file(task_file)).state_dict()
    tuned, _ = files.load_model_state(tmp / "tuned.safetensors")
    delta, _ = files.load_delta(tmp / "run/delta.safetensors")
    assert set(tuned) == set(base) and delta
    changed = 0
    for name, tensor in base.items():
        expected = tensor.clone().flatten()
        if name in delta:
            indices, values = delta[name]
            if indices is None:  # a dense entry: every value of the tensor
                changed += int((values.flatten() != expected).sum())
                expected = values.flatten()
            else:
                expected[indices] = values
                changed += len(indices)
        assert torch.equal(tuned[name].flatten(), expected), name
    assert changed > 0


def write_task_file(path: Path, name: str, declaration: dict) -> Path:
    path.write_text(yaml.safe_dump({"custom_tasks": {name: declaration}}))
    return path


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_text_family_through_every_subcommand(tmp_path, family):
    model = save_tiny_text_model(family, tmp_path / family)
    data = write_reviews(tmp_path / "pairs", n_train=24, n_test=8, pair=True)
    task_file = write_task_file(tmp_path / "tasks.yaml", "pairs", {
        "data": str(data), "text_fields": ["text", "summary"], "label_field": "label",
        "labels": [0, 1], "metric": "acc_f1"})
    metrics = run_pipeline(tmp_path, "pairs", str(model), task_file, "0.05")
    assert metrics["task"] == "pairs" and metrics["metric"] == "acc_f1"
    assert metrics["trainable_fraction"] == pytest.approx(0.05, abs=1e-4)
    assert 0.0 <= metrics["test_score"] <= 1.0
    built = build_task_model("pairs", str(model), 0, read_task_file(task_file))
    assert built.encoder.config.model_type == family
    assert built.input_names == INPUTS[family]
    # jiant's architecture (the default) on a family without a pooling layer: the head reads
    # the first token's state, as jiant's DeBERTa-v2 and ELECTRA wrappers pool
    assert built.architecture == "jiant" and not built.has_pooler
    assert not any("pooler" in n for n, _ in built.named_parameters())
    assert metrics["architecture"] == "jiant"
    check_tuned_model(tmp_path, "pairs", str(model), task_file)


def test_timm_convnet_checkpoint_through_every_subcommand(tmp_path):
    encoder = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.01)  # not timm's init: the checkpoint, not a fresh model, must be loaded
    checkpoint = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(checkpoint))
    model = f"test_resnet?checkpoint={checkpoint}&img_size=32"

    digits = load_digits()
    images = (digits.images * (255 / 16)).astype(np.uint8)
    for split, (start, n) in {"train": (0, 8), "test": (8, 3)}.items():
        for c in (3, 5):
            folder = tmp_path / "digits" / split / f"digit{c}"
            folder.mkdir(parents=True)
            for i in np.flatnonzero(digits.target == c)[start:start + n]:
                Image.fromarray(images[i]).convert("RGB").save(folder / f"{i}.png")
    task_file = write_task_file(tmp_path / "tasks.yaml", "digits",
                                {"data": str(tmp_path / "digits"), "metric": "accuracy"})
    metrics = run_pipeline(tmp_path, "digits", model, task_file, "0.1")
    assert metrics["model"] == model and metrics["trainable_fraction"] == pytest.approx(0.1, 1e-3)
    built = build_task_model("digits", model, 0, read_task_file(task_file))
    assert built.head.out_features == 2
    loaded = built.encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in encoder.state_dict().items())
    check_tuned_model(tmp_path, "digits", model, task_file)

"""The two text architectures through the command line: jiant's pooler where the checkpoint has
none (as roberta-base), and files of one architecture given to the other (older files, which
record none, are first-token's).

A tiny RoBERTa saved without pooler weights, with MiniLM's tokenizer, on the real RTE data.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import RobertaConfig, RobertaModel

from bayestune import files
from bayestune.cli import main
from bayestune.masks import mask_metadata
from bayestune.models.base import task_loss
from bayestune.models.text import load_tokenizer
from bayestune.sampler import sample_scales, sampler_config
from bayestune.tasks import build_task_model, load_task_data, prepare_task

POOLER = ("encoder.pooler.dense.weight", "encoder.pooler.dense.bias")
SAMPLE = ["--steps", "6", "--warmup-steps", "2", "--burnin-steps", "3", "--thinning", "1",
          "--batch-size", "4", "--device", "cpu", "--diagnostics-fisher-examples", "0"]
FINETUNE = ["--max-steps", "3", "--eval-every", "3", "--batch-size", "4", "--lr", "1e-2",
            "--eval-batch-size", "128", "--device", "cpu"]


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory) -> str:
    """A two-layer RoBERTa whose checkpoint has no pooler weights, as roberta-base's."""
    folder = tmp_path_factory.mktemp("tiny-roberta")
    tokenizer = load_tokenizer("minilm")
    config = RobertaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=160, pad_token_id=tokenizer.pad_token_id,
                           type_vocab_size=1)
    torch.manual_seed(0)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def rte(tmp_path_factory, roberta_dir, glue_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prepared")
    return {arch: prepare_task("rte", roberta_dir, root / arch, glue_dir, max_length=32,
                               architecture=arch) for arch in ("jiant", "first-token")}


def common(model: str, *extra: str) -> list[str]:
    return ["--task", "rte", "--model", model, "--seed", "3", *extra]


def test_drawn_pooler_is_trained_ranked_and_counted(tmp_path, roberta_dir, rte):
    model = build_task_model("rte", roberta_dir, 3)
    assert model.pooler_drawn and model.architecture == "jiant"
    assert torch.equal(model.encoder.pooler.dense.weight,
                       build_task_model("rte", roberta_dir, 3).encoder.pooler.dense.weight)
    d = sum(p.numel() for p in model.parameters())
    n_pooler = sum(p.numel() for n, p in model.named_parameters() if n in POOLER)
    assert n_pooler == 16 * 16 + 16

    # stage 1 moves the pooler (it has a data gradient) and gives it a lambda
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in POOLER}
    data = load_task_data("rte", rte["jiant"], 4, 3, architecture="jiant")
    config = sampler_config("exact", steps=6, warmup_steps=2, burnin_steps=3, thinning=1)
    result = sample_scales(model, data.train_epoch, task_loss, config, seed=3, device="cpu",
                           progress=False)
    for name in POOLER:
        assert not torch.equal(dict(model.named_parameters())[name].detach(), before[name])
        assert result.mean[name].shape == before[name].shape

    # through the command line: the scale and mask files hold it, D counts it
    scales, masks = tmp_path / "scales.safetensors", tmp_path / "masks"
    assert main(["-q", "sample", *common(roberta_dir, "--data", str(rte["jiant"]),
                                         "--out", str(scales)), *SAMPLE]) == 0
    scale_tensors, scale_meta = files.load_scales(scales)
    assert set(POOLER) <= set(scale_tensors) and scale_meta["architecture"] == "jiant"
    assert main(["-q", "mask", "--method", "bayestune", *common(roberta_dir),
                 "--scores", str(scales), "--budgets", "0.05", "--out-dir", str(masks)]) == 0
    mask, meta = files.load_mask(masks / "p0.05.safetensors")
    assert set(POOLER) <= set(mask) and meta["architecture"] == "jiant"
    assert meta["n_total"] == d and meta["k"] == math.floor(0.05 * d)
    assert not meta["keep_head"]  # bayestune ranks head and pooler with the encoder

    # stage 2 trains the pooler where a mask selects it
    only_pooler = {n: torch.full(m.shape, n in POOLER) for n, m in mask.items()}
    files.save_mask(tmp_path / "pooler.safetensors", only_pooler, mask_metadata(
        only_pooler, 0.05, method="random", task="rte", model=roberta_dir, seed=3,
        architecture="jiant"))
    run = tmp_path / "run"
    assert main(["-q", "finetune", *common(roberta_dir, "--data", str(rte["jiant"])),
                 "--mask", str(tmp_path / "pooler.safetensors"), "--out-dir", str(run),
                 *FINETUNE]) == 0
    delta, delta_meta = files.load_delta(run / "delta.safetensors")
    assert set(delta) == set(POOLER) and delta_meta["architecture"] == "jiant"
    metrics = files.read_json(run / "metrics.json")
    assert metrics["n_total"] == d and metrics["n_trainable"] == n_pooler
    assert metrics["architecture"] == "jiant"

    # apply-delta rebuilds the same drawn pooler from the recorded seed and architecture
    out = tmp_path / "tuned.safetensors"
    assert main(["apply-delta", *common(roberta_dir)[:4], "--delta",
                 str(run / "delta.safetensors"), "--out", str(out)]) == 0
    tuned, _ = files.load_model_state(out)
    base = build_task_model("rte", roberta_dir, 3).state_dict()
    for name, tensor in base.items():
        if name not in POOLER:
            assert torch.equal(tuned[name], tensor), name
    assert not torch.equal(tuned[POOLER[0]], base[POOLER[0]])


def _forget_architecture(path: Path, kind: str) -> None:
    """Rewrite a file as a version before the architecture existed wrote it."""
    if kind == "scales":
        tensors, meta = files.load_scales(path)
        meta.pop("architecture")
        files.save_scales(path, tensors, meta)
    elif kind == "mask":
        mask, meta = files.load_mask(path)
        meta.pop("architecture")
        files.save_mask(path, mask, meta)
    else:
        delta, meta = files.load_delta(path)
        meta.pop("architecture")
        files.save_delta(path, delta, meta)


def test_old_first_token_files_load_for_first_token_and_are_refused_for_jiant(
        tmp_path, roberta_dir, rte, capsys):
    first = ["--architecture", "first-token"]
    scales, masks, run = tmp_path / "s.safetensors", tmp_path / "masks", tmp_path / "run"
    assert main(["-q", "sample", *common(roberta_dir, "--data", str(rte["first-token"]),
                                         "--out", str(scales)), *SAMPLE, *first]) == 0
    _forget_architecture(scales, "scales")
    mask_args = ["-q", "mask", "--method", "bayestune", *common(roberta_dir), "--scores",
                 str(scales), "--budgets", "0.05", "--out-dir", str(masks)]

    def refused(code: int, kind: str) -> None:
        assert code == 2
        err = capsys.readouterr().err
        assert f"this {kind} file was made for architecture 'first-token'" in err, err
        assert "records none" in err and "builds architecture 'jiant'" in err
        assert "--architecture first-token" in err and "Rerun the stage" in err

    refused(main(mask_args), "score")
    assert main([*mask_args, *first]) == 0
    mask_path = masks / "p0.05.safetensors"
    assert files.load_mask(mask_path)[1]["architecture"] == "first-token"
    _forget_architecture(mask_path, "mask")
    finetune = ["-q", "finetune", *common(roberta_dir, "--mask", str(mask_path)),
                "--out-dir", str(run), *FINETUNE]
    refused(main([*finetune, "--data", str(rte["jiant"])]), "mask")
    assert not (run / "metrics.json").exists()
    assert main([*finetune, "--data", str(rte["first-token"]), *first]) == 0
    assert files.read_json(run / "metrics.json")["architecture"] == "first-token"

    delta = run / "delta.safetensors"
    _forget_architecture(delta, "delta")
    apply = ["apply-delta", *common(roberta_dir)[:4], "--delta", str(delta), "--out"]
    # with no --architecture, apply-delta builds what the delta records: first-token here
    assert main([*apply, str(tmp_path / "old.safetensors")]) == 0
    refused(main([*apply, str(tmp_path / "no.safetensors"), "--architecture", "jiant"]), "delta")
    assert not (tmp_path / "no.safetensors").exists()


def test_a_jiant_file_is_refused_for_first_token(tmp_path, roberta_dir, rte, capsys):
    masks = tmp_path / "masks"
    assert main(["-q", "mask", "--method", "random", *common(roberta_dir), "--budgets", "0.05",
                 "--out-dir", str(masks)]) == 0
    assert main(["-q", "finetune", *common(roberta_dir, "--data", str(rte["first-token"])),
                 "--architecture", "first-token", "--mask", str(masks / "p0.05.safetensors"),
                 "--out-dir", str(tmp_path / "run"), *FINETUNE]) == 2
    err = capsys.readouterr().err
    assert "made for architecture 'jiant'" in err and "--architecture jiant" in err


def test_wsc_pooler_gets_no_gradient_and_nothing_breaks(tmp_path, roberta_dir, glue_dir):
    """WSC's head reads the token states, so jiant's pooler is idle there (in jiant too): the
    reference sampler leaves it at theta0 (no_grad_params skip) while its lambdas move by prior
    and noise, and a mask that selects it trains without error."""
    prep = prepare_task("wsc", roberta_dir, tmp_path / "wsc", glue_dir, max_length=128)
    model = build_task_model("wsc", roberta_dir, 0)
    before = model.encoder.pooler.dense.weight.detach().clone()
    data = load_task_data("wsc", prep, 4, 0, architecture="jiant")
    config = sampler_config("reference", steps=6, patience=0, warmup_steps=2, burnin_steps=3,
                            thinning=1, schedule_epochs=10)
    result = sample_scales(model, data.train_epoch, task_loss, config, seed=0, device="cpu",
                           progress=False, steps_per_epoch=len(data.train))
    assert torch.equal(model.encoder.pooler.dense.weight.detach(), before)
    assert not bool((result.mean[POOLER[0]] == config.lambda_init).all())
    scales = tmp_path / "scales.safetensors"
    assert main(["-q", "sample", "--task", "wsc", "--model", roberta_dir, "--data", str(prep),
                 "--out", str(scales), *SAMPLE, "--preset", "reference", "--patience", "0",
                 "--schedule-epochs", "10"]) == 0
    assert main(["-q", "mask", "--method", "bayestune", "--task", "wsc", "--model", roberta_dir,
                 "--scores", str(scales), "--budgets", "0.5", "--out-dir",
                 str(tmp_path / "m")]) == 0
    mask, _ = files.load_mask(tmp_path / "m" / "p0.5.safetensors")
    assert mask[POOLER[0]].any()
    assert main(["-q", "finetune", "--task", "wsc", "--model", roberta_dir, "--data", str(prep),
                 "--mask", str(tmp_path / "m" / "p0.5.safetensors"),
                 "--out-dir", str(tmp_path / "run"), *FINETUNE]) == 0

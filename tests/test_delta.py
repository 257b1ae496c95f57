"""Sparse delta: base model + delta reproduces the fine-tuned model bit for bit."""

from __future__ import annotations

import pytest
import torch
from test_finetune import SPEC, random_mask, tiny_data, tiny_model

from bayestune import files
from bayestune.delta import apply_delta, difference, make_delta, snapshot
from bayestune.files import FileFormatError
from bayestune.finetune import FinetuneConfig, finetune


@pytest.fixture(scope="module")
def tuned():
    model = tiny_model(seed=3)
    theta0 = snapshot(model)
    mask = random_mask(model, 0.05, seed=1)
    config = FinetuneConfig(lr=1e-2, weight_decay=0.1, max_steps=4, eval_every=2)
    finetune(model, tiny_data(), SPEC, config, mask=mask, seed=3, device="cpu", progress=False)
    return model.eval(), theta0, mask


def test_base_plus_delta_file_is_the_finetuned_model(tuned, tmp_path) -> None:
    model, theta0, mask = tuned
    delta = make_delta(model, theta0)
    path = tmp_path / "delta.safetensors"
    files.save_delta(path, delta, {"values": "finetuned"})
    loaded, meta = files.load_delta(path)
    assert meta["values"] == "finetuned"
    base = tiny_model(seed=3).eval()
    apply_delta(base, loaded, source=str(path))
    for name, param in base.named_parameters():
        assert torch.equal(param, dict(model.named_parameters())[name]), name
    batch = next(iter(tiny_data().val))
    with torch.no_grad():
        assert torch.equal(base(batch).logits, model(batch).logits)


def test_delta_holds_only_changed_masked_scalars(tuned) -> None:
    model, theta0, mask = tuned
    delta = make_delta(model, theta0)
    n_stored = sum(idx.numel() for idx, _ in delta.values())
    assert 0 < n_stored <= sum(int(m.sum()) for m in mask.values())
    for name, (idx, values) in delta.items():
        assert idx.dtype == torch.int64 and values.shape == idx.shape
        assert mask[name].reshape(-1)[idx].all(), name
    untouched = {n for n, m in mask.items() if not m.any()}
    assert untouched and not (untouched & set(delta))


def test_difference_is_theta_minus_theta0(tuned) -> None:
    model, theta0, _ = tuned
    diff = difference(make_delta(model, theta0), theta0)
    params = dict(model.named_parameters())
    for name, (idx, values) in diff.items():
        expected = params[name].detach().reshape(-1)[idx] - theta0[name].reshape(-1)[idx]
        assert torch.equal(values, expected)
        assert (values != 0).all()


def test_apply_delta_rejects_foreign_deltas() -> None:
    base = tiny_model()
    with pytest.raises(FileFormatError, match="x.safetensors: parameter encoder.nope"):
        apply_delta(base, {"encoder.nope": (torch.tensor([0]), torch.tensor([1.0]))},
                    source="x.safetensors")
    bias = "head.out_proj.bias"
    with pytest.raises(FileFormatError, match="outside"):
        apply_delta(base, {bias: (torch.tensor([5]), torch.tensor([1.0]))})
    with pytest.raises(FileFormatError, match="corrupt"):
        apply_delta(base, {bias: (torch.tensor([0, 1]), torch.tensor([1.0]))})


def test_make_delta_needs_matching_theta0() -> None:
    model = tiny_model()
    theta0 = snapshot(model)
    theta0.pop("head.out_proj.bias")
    with pytest.raises(ValueError, match="head.out_proj.bias"):
        make_delta(model, theta0)

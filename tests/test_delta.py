"""Delta: base model + delta reproduces the fine-tuned model bit for bit, and the file is never
larger than the tensors it replaces (sparse or dense per tensor, narrowest index type)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from test_files import payload_bytes
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
        assert idx is not None, name  # a 5% mask changes too few scalars for a dense entry
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


@pytest.fixture(scope="module")
def fully_tuned():
    model = tiny_model(seed=5)
    theta0 = snapshot(model)
    config = FinetuneConfig(lr=1e-3, weight_decay=0.0, max_steps=2, eval_every=2)
    finetune(model, tiny_data(), SPEC, config, mask=None, seed=5, device="cpu", progress=False)
    return model.eval(), theta0


def test_full_finetuning_delta_is_dense_and_no_larger_than_the_model(fully_tuned,
                                                                      tmp_path) -> None:
    model, theta0 = fully_tuned
    delta = make_delta(model, theta0)
    params = dict(model.named_parameters())
    # Without weight decay the embedding rows of tokens never seen keep their values: those
    # tensors stay sparse when that is smaller; every other tensor is stored whole.
    dense = {n for n, (idx, _) in delta.items() if idx is None}
    assert "encoder.encoder.layer.0.attention.self.query.weight" in dense
    assert len(dense) > 0.8 * len(params)
    path = tmp_path / "delta.safetensors"
    files.save_delta(path, delta, {})
    replaced = sum(params[n].numel() * params[n].element_size() for n in delta)
    assert payload_bytes(path) <= replaced
    base = tiny_model(seed=5).eval()
    apply_delta(base, files.load_delta(path)[0], source=str(path))
    for name, param in base.named_parameters():
        assert torch.equal(param, params[name]), name
    for name, (idx, values) in difference(delta, theta0).items():
        expected = params[name].detach().reshape(-1) - theta0[name].reshape(-1)
        assert torch.equal(values, expected if idx is None else expected[idx]), name


def test_delta_entries_take_the_smaller_encoding(tmp_path) -> None:
    model = tiny_model(seed=2)
    theta0 = snapshot(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        params["encoder.embeddings.word_embeddings.weight"].view(-1)[[5, 3000]] += 1.0
        params["head.out_proj.bias"].add_(1.0)            # 2 of 2 changed: dense
        params["encoder.embeddings.LayerNorm.weight"][:30] += 1.0  # 30 of 32: dense
        params["encoder.encoder.layer.0.output.dense.bias"][:3] += 1.0  # 3 of 32: sparse
    delta = make_delta(model, theta0)
    path = tmp_path / "delta.safetensors"
    files.save_delta(path, delta, {"task": "tiny"})
    with safe_open(str(path), framework="pt") as handle:
        stored = {key: handle.get_tensor(key).dtype for key in handle.keys()}
    assert stored == {
        "encoder.embeddings.word_embeddings.weight::indices": torch.uint16,  # 120 x 32 scalars
        "encoder.embeddings.word_embeddings.weight::values": torch.float32,
        "head.out_proj.bias::values": torch.float32,
        "encoder.embeddings.LayerNorm.weight::values": torch.float32,
        "encoder.encoder.layer.0.output.dense.bias::indices": torch.uint8,
        "encoder.encoder.layer.0.output.dense.bias::values": torch.float32,
    }
    loaded, meta = files.load_delta(path)
    assert meta["values"] == "finetuned" and meta["format_version"] == files.DELTA_FORMAT
    base = tiny_model(seed=2)
    apply_delta(base, loaded)
    assert all(torch.equal(p, params[n]) for n, p in base.named_parameters())


def test_old_delta_files_still_apply(tuned, tmp_path) -> None:
    model, theta0, _ = tuned
    delta = make_delta(model, theta0)
    path = tmp_path / "old.safetensors"
    # what save_delta wrote before format 2: int64 indices beside every tensor's values
    old = {}
    for name, (idx, values) in delta.items():
        old[f"{name}::indices"], old[f"{name}::values"] = idx, values
    files._save_tensors(path, old, "delta", {"values": "finetuned"})
    loaded, _ = files.load_delta(path)
    base = tiny_model(seed=3).eval()
    apply_delta(base, loaded, source=str(path))
    params = dict(model.named_parameters())
    assert all(torch.equal(p, params[n]) for n, p in base.named_parameters())


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
    with pytest.raises(FileFormatError, match="3 dense values for 2 scalars"):
        apply_delta(base, {bias: (None, torch.zeros(3))})


def test_make_delta_needs_matching_theta0() -> None:
    model = tiny_model()
    theta0 = snapshot(model)
    theta0.pop("head.out_proj.bias")
    with pytest.raises(ValueError, match="head.out_proj.bias"):
        make_delta(model, theta0)

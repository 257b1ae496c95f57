"""Mask files: compact per tensor (sorted indices or packed bits), exact round trips, old files."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open

from bayestune import files
from bayestune.files import FileFormatError

SHAPES = {
    "empty": (0,),
    "empty_matrix": (0, 3),
    "scalar": (),
    "one": (1,),
    "bias": (7,),
    "vector": (300,),       # indices fit uint16
    "matrix": (24, 20),
    "cube": (3, 5, 7),
    "wide": (70_000,),      # indices need uint32
}


def random_masks(density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.rand(shape, generator=gen) < density for name, shape in SHAPES.items()}


def stored_entries(path) -> dict[str, torch.dtype]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key).dtype for key in handle.keys()}


def payload_bytes(path) -> int:
    """File size minus the safetensors header (8-byte length + JSON)."""
    raw = path.read_bytes()
    return len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]


@pytest.mark.parametrize("density", [0.0, 0.003, 0.05, 0.5, 1.0])
def test_mask_round_trip(tmp_path, density) -> None:
    masks = random_masks(density, seed=int(density * 1000))
    path = tmp_path / "mask.safetensors"
    files.save_mask(path, masks, {"method": "random", "budget": density})
    loaded, meta = files.load_mask(path)
    assert meta["method"] == "random" and meta["format_version"] == files.MASK_FORMAT
    assert "shapes" not in meta  # the layout is the reader's business, not the caller's
    assert set(loaded) == set(masks)
    for name, mask in masks.items():
        assert loaded[name].dtype == torch.bool and loaded[name].shape == mask.shape, name
        assert torch.equal(loaded[name], mask), name
    expected = sum(files.mask_entry_bytes(m.numel(), int(m.sum())) for m in masks.values())
    assert payload_bytes(path) == expected


def test_each_tensor_takes_the_smaller_encoding(tmp_path) -> None:
    masks = {
        "sparse_small": torch.zeros(200, dtype=torch.bool),   # 2 uint8 indices < 25 bytes
        "dense_small": torch.ones(200, dtype=torch.bool),     # 25 bytes < 200 indices
        "sparse_wide": torch.zeros(70_000, dtype=torch.bool),
        "sparse_mid": torch.zeros(1000, dtype=torch.bool),
    }
    masks["sparse_small"][[3, 150]] = True
    masks["sparse_wide"][[0, 69_999]] = True
    masks["sparse_mid"][::100] = True                          # 10 uint16 indices < 125 bytes
    path = tmp_path / "mask.safetensors"
    files.save_mask(path, masks, {})
    assert stored_entries(path) == {
        "sparse_small::indices": torch.uint8,
        "dense_small::bits": torch.uint8,
        "sparse_wide::indices": torch.uint32,
        "sparse_mid::indices": torch.uint16,
    }
    loaded, _ = files.load_mask(path)
    assert all(torch.equal(loaded[n], m) for n, m in masks.items())


def test_index_dtype_is_the_narrowest_that_holds_the_size() -> None:
    assert files.index_dtype(256) == torch.uint8 and files.index_dtype(257) == torch.uint16
    assert files.index_dtype(65_536) == torch.uint16 and files.index_dtype(65_537) == torch.uint32
    assert files.index_dtype(2**32) == torch.uint32 and files.index_dtype(2**32 + 1) == torch.int64


def roberta_base_shapes() -> dict[str, tuple[int, ...]]:
    """RoBERTa-base's parameter shapes as our models have them (no pooler, a two-class
    classification head), built on the meta device: no weights, no download."""
    from transformers import AutoModel, RobertaConfig

    config = RobertaConfig(max_position_embeddings=514, type_vocab_size=1)
    with torch.device("meta"):
        encoder = AutoModel.from_config(config, add_pooling_layer=False)
    shapes = {f"encoder.{n}": tuple(p.shape) for n, p in encoder.named_parameters()}
    hidden = config.hidden_size
    shapes.update({"head.dense.weight": (hidden, hidden), "head.dense.bias": (hidden,),
                   "head.out_proj.weight": (2, hidden), "head.out_proj.bias": (2,)})
    return shapes


@pytest.mark.slow
def test_half_percent_roberta_base_mask_is_at_most_3mb(tmp_path) -> None:
    shapes = roberta_base_shapes()
    n_total = sum(torch.Size(s).numel() for s in shapes.values())
    assert 124.5e6 < n_total < 124.8e6
    gen = torch.Generator().manual_seed(0)
    # 0.5% of every tensor at random places: the mask a random method draws at that budget
    masks = {name: torch.rand(shape, generator=gen) < 0.005 for name, shape in shapes.items()}
    path = tmp_path / "p0.005.safetensors"
    files.save_mask(path, masks, {"method": "random", "budget": 0.005})
    size = path.stat().st_size
    print(f"0.5% RoBERTa-base mask: {size / 1e6:.2f} MB (one bool per scalar: "
          f"{n_total / 1e6:.1f} MB)")
    assert size <= 3_000_000
    loaded, _ = files.load_mask(path)
    assert all(torch.equal(loaded[n], m) for n, m in masks.items())


def test_old_bool_mask_files_still_load(tmp_path) -> None:
    masks = random_masks(0.1, seed=4)
    path = tmp_path / "old.safetensors"
    # what save_mask wrote before format 2: one bool tensor per parameter, no format version
    files._save_tensors(path, masks, "mask", {"method": "random", "budget": 0.1})
    assert stored_entries(path) == dict.fromkeys(masks, torch.bool)
    loaded, meta = files.load_mask(path)
    assert meta["method"] == "random"
    assert all(torch.equal(loaded[n], m) for n, m in masks.items())


def _rewrite(path, tensors, meta) -> None:
    files._save_tensors(path, tensors, "mask", meta)


def test_damaged_or_future_mask_files_are_refused(tmp_path) -> None:
    path = tmp_path / "mask.safetensors"
    shapes = {"w": [10]}
    _rewrite(path, {"w::indices": torch.tensor([4, 2], dtype=torch.uint8)},
             {"format_version": 2, "shapes": shapes})
    with pytest.raises(FileFormatError, match="not sorted"):
        files.load_mask(path)
    _rewrite(path, {"w::indices": torch.tensor([2, 10], dtype=torch.uint8)},
             {"format_version": 2, "shapes": shapes})
    with pytest.raises(FileFormatError, match="not sorted flat positions of its 10"):
        files.load_mask(path)
    _rewrite(path, {"w::bits": torch.zeros(1, dtype=torch.uint8)},
             {"format_version": 2, "shapes": shapes})
    with pytest.raises(FileFormatError, match="packed bytes"):
        files.load_mask(path)
    _rewrite(path, {"w::bits": torch.zeros(2, dtype=torch.uint8)},
             {"format_version": 2, "shapes": {"w": [10], "b": [3]}})
    with pytest.raises(FileFormatError, match="do not match"):
        files.load_mask(path)
    _rewrite(path, {"w::other": torch.zeros(2, dtype=torch.uint8)},
             {"format_version": 2, "shapes": shapes})
    with pytest.raises(FileFormatError, match="neither indices nor packed bits"):
        files.load_mask(path)
    _rewrite(path, {"w::bits": torch.zeros(2, dtype=torch.uint8)},
             {"format_version": 3, "shapes": shapes})
    with pytest.raises(FileFormatError, match="newer than this bayestune reads"):
        files.load_mask(path)


def test_mask_metadata_keeps_the_callers_keys(tmp_path) -> None:
    path = tmp_path / "mask.safetensors"
    files.save_mask(path, random_masks(0.2), {"method": "bitfit", "seed": 3})
    with safe_open(str(path), framework="pt") as handle:
        stored = json.loads(handle.metadata()[files.METADATA_KEY])
    assert stored["kind"] == "mask" and stored["seed"] == 3
    assert stored["shapes"]["cube"] == [3, 5, 7] and stored["shapes"]["scalar"] == []

"""VTAB-1k tasks and timm models, on a VTAB-format folder made from scikit-learn's real digits."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from bayestune.files import read_json
from bayestune.models.base import is_head, task_loss
from bayestune.models.vision import ModelLoadError, build_vision_model, parse_model_name
from bayestune.tasks import vtab
from bayestune.tasks.base import TaskError, evaluate

TASK = "vtab-svhn"          # 10 digit classes, like sklearn's digits
FOLDER = "svhn"
TINY = "vit_tiny_patch16_224?pretrained=false&img_size=32&patch_size=8&depth=2"
PER_CLASS = {"train800.txt": 10, "val200.txt": 3, "test.txt": 3}


def _write_lists(task_dir: Path, counts: dict[str, int]) -> None:
    """Save digits as 16x16 RGB PNGs and write the four VTAB list files over them."""
    digits = load_digits()
    images = (digits.images * (255 / 16)).astype(np.uint8)
    (task_dir / "images").mkdir(parents=True)
    by_class = {c: np.flatnonzero(digits.target == c) for c in range(10)}
    start = 0
    lines: dict[str, list[str]] = {}
    for list_name, per_class in counts.items():
        lines[list_name] = []
        for c, indices in by_class.items():
            for i in indices[start:start + per_class]:
                rel = f"images/{i}.png"
                Image.fromarray(images[i]).resize((16, 16), Image.NEAREST).convert("RGB") \
                    .save(task_dir / rel)
                lines[list_name].append(f"{rel} {c}")
        start += per_class
    lines["train800val200.txt"] = lines["train800.txt"] + lines["val200.txt"]
    for list_name, rows in lines.items():
        (task_dir / list_name).write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vtab")
    _write_lists(root / FOLDER, PER_CLASS)
    return root


@pytest.fixture(scope="module")
def prepared(vtab_root, tmp_path_factory) -> Path:
    return vtab.prepare(TASK, TINY, tmp_path_factory.mktemp("prep"), vtab_root, 128)


def test_registry_has_19_tasks_in_three_groups():
    assert len(vtab.TASKS) == 19
    sizes = {g: sum(s.group == g for s in vtab.TASKS.values()) for g in vtab.GROUPS}
    assert sizes == {"Natural": 7, "Specialized": 4, "Structured": 8}
    assert all(s.benchmark == "vtab" and name.startswith("vtab-") for name, s in vtab.TASKS.items())
    assert vtab.NUM_CLASSES["vtab-cifar"] == 100 and vtab.NUM_CLASSES["vtab-sun397"] == 397
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    metric = vtab.TASKS["vtab-patch_camelyon"].metric
    assert metric(logits, np.array([1, 1, 1])) == pytest.approx(2 / 3)


def test_group_means():
    scores = {name: 0.0 for name in vtab.TASKS}
    scores.update({"vtab-cifar": 0.7, "vtab-dtd": 0.7, "vtab-eurosat": 0.8, "vtab-kitti": 0.8})
    means = vtab.group_means(scores)
    assert means["Natural"] == pytest.approx(1.4 / 7)
    assert means["Specialized"] == pytest.approx(0.8 / 4)
    assert means["Structured"] == pytest.approx(0.8 / 8)
    assert means["Mean"] == pytest.approx((1.4 / 7 + 0.2 + 0.1) / 3)
    partial = vtab.group_means({"vtab-cifar": 0.5, "dtd": 0.3})  # bare folder names work too
    assert partial["Natural"] == pytest.approx(0.4) and math.isnan(partial["Structured"])
    assert math.isnan(partial["Mean"])
    with pytest.raises(TaskError, match="unknown VTAB-1k task 'vtab-mnist'"):
        vtab.group_means({"mnist": 0.5})
    with pytest.raises(TaskError, match="scored twice"):
        vtab.group_means({"cifar": 0.5, "vtab-cifar": 0.5})


def test_prepare_writes_manifest(prepared, vtab_root, tmp_path):
    manifest = read_json(prepared / vtab.MANIFEST)
    assert manifest["num_classes"] == 10 and manifest["preprocess"]["input_size"] == [3, 32, 32]
    assert manifest["preprocess"]["mean"] == [0.5, 0.5, 0.5]  # the model's own statistics
    sizes = {s: len(manifest["splits"][s]["labels"]) for s in ("train", "val", "test")}
    assert sizes == {"train": 100, "val": 30, "test": 30}
    assert all(Path(p).is_absolute() and Path(p).is_file()
               for p in manifest["splits"]["test"]["paths"])
    final = read_json(vtab.prepare(TASK, TINY, tmp_path, vtab_root, 0, final=True) / vtab.MANIFEST)
    assert len(final["splits"]["train"]["labels"]) == 130
    assert final["train_list"] == "train800val200.txt"


def test_data_dir_from_env_or_clear_error(vtab_root, tmp_path, monkeypatch):
    monkeypatch.delenv(vtab.ENV_DATA_DIR, raising=False)
    with pytest.raises(TaskError, match="BAYESTUNE_VTAB_DIR.*vtab_dir"):
        vtab.prepare(TASK, TINY, tmp_path, None)
    monkeypatch.setenv(vtab.ENV_DATA_DIR, str(vtab_root))
    assert (vtab.prepare(TASK, TINY, tmp_path, None) / vtab.MANIFEST).is_file()
    with pytest.raises(TaskError, match="dtd: no such task folder"):
        vtab.prepare("vtab-dtd", TINY, tmp_path, None)


def _broken_copy(tmp_path: Path) -> Path:
    root = tmp_path / "vtab"
    _write_lists(root / FOLDER, {"train800.txt": 2, "val200.txt": 1, "test.txt": 1})
    return root


@pytest.mark.parametrize("damage, message", [
    ("missing_list", r"val200\.txt: missing list file"),
    ("malformed", r"test\.txt:3: malformed line 'images/oops\.png'"),
    ("bad_label", r"train800\.txt:2: label 10 outside \[0, 10\)"),
    ("missing_image", r"test\.txt:1: image .*gone\.png does not exist"),
])
def test_bad_input_names_file_and_line(tmp_path, damage, message):
    task_dir = _broken_copy(tmp_path) / FOLDER
    test_list = task_dir / "test.txt"
    rows = test_list.read_text().splitlines()
    if damage == "missing_list":
        (task_dir / "val200.txt").unlink()
    elif damage == "malformed":
        test_list.write_text("\n".join(rows[:2] + ["images/oops.png"] + rows[2:]) + "\n")
    elif damage == "bad_label":
        train = (task_dir / "train800.txt").read_text().splitlines()
        train[1] = train[1].rsplit(" ", 1)[0] + " 10"
        (task_dir / "train800.txt").write_text("\n".join(train) + "\n")
    else:
        test_list.write_text("\n".join(["images/gone.png 3"] + rows[1:]) + "\n")
    with pytest.raises(TaskError, match=message):
        vtab.prepare(TASK, TINY, tmp_path / "out", tmp_path / "vtab")
    assert not (tmp_path / "out" / vtab.MANIFEST).exists()


def test_loaders_batches_and_replayable_epochs(prepared):
    data = vtab.load_data(TASK, prepared, batch_size=16, seed=3, eval_batch_size=32)
    batch = next(iter(data.val))
    assert batch["pixel_values"].shape == (30, 3, 32, 32) and batch["labels"].dtype == torch.long
    # normalised with mean 0.5, std 0.5: the black digit background maps to -1
    assert batch["pixel_values"].min().item() == pytest.approx(-1.0)
    first = [b["labels"].tolist() for b in data.train_epoch(2)]
    assert [b["labels"].tolist() for b in data.train_epoch(2)] == first
    assert [b["labels"].tolist() for b in data.train_epoch(3)] != first
    with pytest.raises(TaskError, match="prepared for task 'vtab-svhn', not 'vtab-eurosat'"):
        vtab.load_data("vtab-eurosat", prepared, 16, 0)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_seed_same_head_and_fixed_encoder():
    a, b, c = (vtab.build_model(TASK, TINY, seed) for seed in (1, 1, 2))
    assert a.head.out_features == 10
    assert _same(a.head, b.head) and not _same(a.head, c.head)
    # a random encoder stands in for a pretrained one: every stage must rebuild the same theta0
    assert _same(a.encoder, c.encoder)
    names = [n for n, _ in a.named_parameters()]
    assert all(n.startswith(("encoder.", "head.")) for n in names)
    assert {n for n in names if is_head(n)} == {"head.weight", "head.bias"}


def test_checkpoint_loading_and_errors(tmp_path, monkeypatch):
    source = build_vision_model(TINY, num_classes=3, seed=0)
    with torch.no_grad():
        for p in source.encoder.parameters():
            p.add_(1.0)  # differ from the seeded random init
    ckpt = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, str(ckpt))
    loaded = build_vision_model(TINY.replace("pretrained=false", f"checkpoint={ckpt}"), 3, 0)
    assert _same(source.encoder, loaded.encoder)
    with pytest.raises(ModelLoadError, match="no such file"):
        build_vision_model(TINY, 3, 0, pretrained=True, checkpoint=str(tmp_path / "none.pth"))
    with pytest.raises(ModelLoadError, match="unknown timm model"):
        build_vision_model("vit_nonexistent_model", 3, 0)
    with pytest.raises(ModelLoadError, match="rejects an option"):
        build_vision_model(TINY + "&bogus_option=1", 3, 0)
    # offline and nothing cached: the error must say how to use a local checkpoint
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="checkpoint=/path/to/model.safetensors"):
        build_vision_model(TINY, 3, 0, pretrained=True)
    spec = parse_model_name("vit_base_patch16_224.augreg_in21k?img_size=384&depth=2")
    assert (spec.name, spec.pretrained, spec.img_size, spec.kwargs) == \
        ("vit_base_patch16_224.augreg_in21k", True, 384, {"depth": 2})


def test_tiny_vit_learns_digits(prepared):
    data = vtab.load_data(TASK, prepared, batch_size=20, seed=0)
    model = vtab.build_model(TASK, TINY, seed=0)
    spec = vtab.TASKS[TASK]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for epoch in range(25):
        epoch_losses = []
        for batch in data.train_epoch(epoch):
            loss = task_loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_losses.append(loss.item())
        losses.append(sum(epoch_losses) / len(epoch_losses))
    assert losses[-1] < 0.5 * losses[0], losses
    assert evaluate(model, data.train, spec) > 0.4  # chance is 0.1; measured 0.62


def test_dispatch_reaches_vtab(vtab_root, tmp_path):
    from bayestune.tasks import build_task_model, get_task, load_task_data, prepare_task

    assert get_task(TASK).group == "Natural"
    out = prepare_task(TASK, TINY, tmp_path, vtab_root)
    data = load_task_data(TASK, out, batch_size=8, seed=0)
    model = build_task_model(TASK, TINY, seed=0)
    assert 0.0 <= evaluate(model, data.val, get_task(TASK)) <= 1.0

"""The 19 VTAB-1k tasks: registry, list-file reading, preprocessing, loaders and model.

On disk (the layout of the VTAB-1k PEFT literature: NOAH, SSF, SPT, GPS) the data root holds
one folder per task, e.g. ``<root>/cifar``, with ``train800.txt``, ``val200.txt``,
``train800val200.txt`` and ``test.txt``; each line is ``relative/image/path label``, the path
relative to the task folder.

Task names are the folder names with a ``vtab-`` prefix (``vtab-cifar``, ``vtab-svhn``, ...),
so that they stay apart from the GLUE names in one namespace and say where they come from.

Splits: ``train`` = train800, ``val`` = val200 (model selection), ``test`` = test. The paper's
final numbers train on all 1000 images: ``prepare(..., final=True)`` makes ``train`` =
train800val200; ``val`` is then still val200, a subset of train, so use a fixed step count
rather than early stopping on it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bayestune.files import read_json, write_json
from bayestune.models.base import TaskModel
from bayestune.tasks.base import TaskData, TaskError, TaskSpec
from bayestune.tasks.metrics import accuracy

# Pillow, torchvision and timm (models.vision) are imported by the functions that read images
# or build a model: the task registry is read by every job and by Snakemake at start-up, and
# those imports cost seconds.

PREFIX = "vtab-"
ENV_DATA_DIR = "BAYESTUNE_VTAB_DIR"
MANIFEST = "manifest.json"
GROUPS = ("Natural", "Specialized", "Structured")
LIST_FILES = {"train": "train800.txt", "val": "val200.txt",
              "trainval": "train800val200.txt", "test": "test.txt"}

# (folder, number of classes, group), in the column order of the VTAB-1k tables.
_TABLE = [
    ("caltech101", 102, "Natural"),
    ("cifar", 100, "Natural"),
    ("dtd", 47, "Natural"),
    ("oxford_flowers102", 102, "Natural"),
    ("oxford_iiit_pet", 37, "Natural"),
    ("svhn", 10, "Natural"),
    ("sun397", 397, "Natural"),
    ("patch_camelyon", 2, "Specialized"),
    ("eurosat", 10, "Specialized"),
    ("resisc45", 45, "Specialized"),
    ("diabetic_retinopathy", 5, "Specialized"),
    ("clevr_count", 8, "Structured"),
    ("clevr_dist", 6, "Structured"),
    ("dmlab", 6, "Structured"),
    ("kitti", 4, "Structured"),
    ("dsprites_loc", 16, "Structured"),
    ("dsprites_ori", 16, "Structured"),
    ("smallnorb_azi", 18, "Structured"),
    ("smallnorb_ele", 9, "Structured"),
]


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return accuracy(logits, labels)


FOLDERS: dict[str, str] = {PREFIX + folder: folder for folder, _, _ in _TABLE}
NUM_CLASSES: dict[str, int] = {PREFIX + folder: n for folder, n, _ in _TABLE}
TASKS: dict[str, TaskSpec] = {
    PREFIX + folder: TaskSpec(name=PREFIX + folder, benchmark="vtab", metric_name="accuracy",
                              metric=top1_accuracy, group=group)
    for folder, _, group in _TABLE
}


def _spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise TaskError(f"unknown VTAB-1k task {task!r}; known: {', '.join(TASKS)}")
    return TASKS[task]


# --- table summary ----------------------------------------------------------------------------
def group_means(scores: Mapping[str, float]) -> dict[str, float]:
    """Mean score of each group and the mean of the three group means (key ``"Mean"``).

    ``scores`` maps task names (``vtab-cifar`` or the bare folder name ``cifar``) to scores.
    A group with no score is NaN, and so is ``Mean`` unless all three groups have one: the
    mean of group means is only comparable with published tables when it covers all groups.
    """
    by_group: dict[str, list[float]] = {g: [] for g in GROUPS}
    seen: set[str] = set()
    for name, score in scores.items():
        task = name if name in TASKS else PREFIX + name
        if task in seen:
            raise TaskError(f"task {task} scored twice (as {task} and {FOLDERS.get(task)})")
        seen.add(task)
        by_group[_spec(task).group].append(float(score))
    means = {g: (sum(v) / len(v) if v else math.nan) for g, v in by_group.items()}
    means["Mean"] = sum(means[g] for g in GROUPS) / len(GROUPS)
    return means


# --- reading and validating the lists ---------------------------------------------------------
def _data_root(data_dir: str | os.PathLike[str] | None) -> Path:
    root = data_dir or os.environ.get(ENV_DATA_DIR)
    if not root:
        raise TaskError(f"no VTAB-1k data directory: pass data_dir (--data-dir) or set "
                        f"{ENV_DATA_DIR}, or set config key vtab_dir")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise TaskError(f"VTAB-1k data directory {root} does not exist; pass data_dir "
                        f"(--data-dir) or set {ENV_DATA_DIR} (config key vtab_dir)")
    return root


def read_list(path: Path, num_classes: int) -> list[tuple[str, int]]:
    """Read one ``path label`` list; image paths come back absolute and checked to exist."""
    if not path.is_file():
        raise TaskError(f"{path}: missing list file; a VTAB-1k task folder holds "
                        f"{', '.join(LIST_FILES.values())}")
    folder = path.parent.resolve()
    items = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 1)  # the path itself may contain spaces
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise TaskError(f"{path}:{lineno}: malformed line {line!r}; expected "
                            "'relative/image/path label'")
        rel, label = parts[0].strip(), int(parts[1])
        if not 0 <= label < num_classes:
            raise TaskError(f"{path}:{lineno}: label {label} outside [0, {num_classes}) "
                            f"for this task")
        image = folder / rel
        if not image.is_file():
            raise TaskError(f"{path}:{lineno}: image {image} does not exist")
        items.append((str(image), label))
    if not items:
        raise TaskError(f"{path}: list file has no images")
    return items


def prepare(task: str, model_name: str, out_dir: Path, data_dir: Path | None = None,
            max_length: int = 0, final: bool = False) -> Path:
    """Validate the task's four lists and write ``out_dir/manifest.json``; return ``out_dir``.

    ``max_length`` is ignored (text only). The manifest records the model's preprocessing
    (input size, interpolation, mean, std) so the loaders need no model name.
    """
    del max_length
    _spec(task)
    folder = _data_root(data_dir) / FOLDERS[task]
    if not folder.is_dir():
        raise TaskError(f"{folder}: no such task folder; the VTAB-1k root must hold one folder "
                        f"per task named {', '.join(FOLDERS.values())}")
    lists = {split: read_list(folder / name, NUM_CLASSES[task])
             for split, name in LIST_FILES.items()}
    train_split = "trainval" if final else "train"
    splits = {"train": lists[train_split], "val": lists["val"], "test": lists["test"]}
    manifest = {
        "task": task, "folder": str(folder.resolve()), "num_classes": NUM_CLASSES[task],
        "final": final, "train_list": LIST_FILES[train_split],
        **image_manifest(model_name, splits),
    }
    out_dir = Path(out_dir)
    write_json(out_dir / MANIFEST, manifest)
    return out_dir


def image_manifest(model_name: str,
                   splits: Mapping[str, list[tuple[str, int]]]) -> dict[str, Any]:
    """What the image loaders read from a manifest: the model's preprocessing and each
    split's paths and labels."""
    from bayestune.models.vision import ModelLoadError, vision_data_config

    try:
        preprocess = vision_data_config(model_name)
    except ModelLoadError as err:
        raise TaskError(str(err)) from err
    return {"model": model_name, "preprocess": preprocess,
            "splits": {s: {"paths": [p for p, _ in items], "labels": [lb for _, lb in items]}
                       for s, items in splits.items()}}


# --- loaders ----------------------------------------------------------------------------------
def make_transform(preprocess: Mapping[str, Any]) -> Callable:
    """Resize straight to the input size (no crop, no augmentation, as VTAB-1k does)."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    _, height, width = preprocess["input_size"]
    return transforms.Compose([
        transforms.Resize((height, width),
                          interpolation=InterpolationMode(preprocess["interpolation"])),
        transforms.PILToTensor(),
    ])


class ImageListDataset(Dataset):
    """Images from a list of paths as ``{"pixel_values", "labels"}``.

    With ``cache=True`` the resized uint8 image is kept after the first read: VTAB-1k train
    and val sets are 1000 images, read every epoch, and need no augmentation.
    """

    def __init__(self, paths: list[str], labels: list[int], preprocess: Mapping[str, Any],
                 cache: bool = False):
        self.paths, self.labels = paths, labels
        self.transform = make_transform(preprocess)
        self.mean = torch.tensor(preprocess["mean"]).view(3, 1, 1)
        self.std = torch.tensor(preprocess["std"]).view(3, 1, 1)
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def _pixels(self, index: int) -> torch.Tensor:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            pixels = self.transform(image.convert("RGB"))
        if self.cache is not None:
            self.cache[index] = pixels
        return pixels

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pixels = self._pixels(index).float().div_(255)
        return {"pixel_values": (pixels - self.mean) / self.std,
                "labels": torch.tensor(self.labels[index], dtype=torch.long)}


def read_manifest(task: str, prepared_dir: Path) -> dict[str, Any]:
    path = Path(prepared_dir) / MANIFEST
    if not path.is_file():
        raise TaskError(f"{path}: no prepared image data; run `bayestune prepare --task {task}`")
    manifest = read_json(path)
    if manifest.get("task") != task:
        raise TaskError(f"{path}: prepared for task {manifest.get('task')!r}, not {task!r}; "
                        "point at the right folder or prepare again")
    return manifest


def image_loaders(splits: Mapping[str, Mapping[str, list]], preprocess: Mapping[str, Any],
                  batch_size: int, seed: int, eval_batch_size: int = 64,
                  num_workers: int = 0) -> TaskData:
    """Loaders over ``{split: {"paths", "labels"}}``; train shuffles with its own generator."""

    def dataset(split: str, cache: bool) -> ImageListDataset:
        return ImageListDataset(splits[split]["paths"], splits[split]["labels"], preprocess, cache)

    common = {"num_workers": num_workers, "pin_memory": torch.cuda.is_available(),
              "persistent_workers": num_workers > 0}
    generator = torch.Generator().manual_seed(seed)
    return TaskData(
        train=DataLoader(dataset("train", True), batch_size=batch_size, shuffle=True,
                         generator=generator, **common),
        val=DataLoader(dataset("val", True), batch_size=eval_batch_size, **common),
        test=DataLoader(dataset("test", False), batch_size=eval_batch_size, **common),
        seed=seed,
    )


def load_data(task: str, prepared_dir: Path, batch_size: int, seed: int,
              eval_batch_size: int = 64, num_workers: int = 0) -> TaskData:
    """Loaders over a prepared task; train shuffles with its own generator (see TaskData)."""
    _spec(task)
    manifest = read_manifest(task, prepared_dir)
    return image_loaders(manifest["splits"], manifest["preprocess"], batch_size, seed,
                         eval_batch_size, num_workers)


def build_model(task: str, model_name: str, seed: int) -> TaskModel:
    """The encoder named by ``model_name`` with a fresh head of the task's class count."""
    from bayestune.models.vision import build_vision_model

    return build_vision_model(model_name, NUM_CLASSES[_spec(task).name], seed)

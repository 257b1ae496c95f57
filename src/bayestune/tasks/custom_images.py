"""Declared image tasks (``custom_tasks`` without ``text_fields``): two folder layouts.

* class folders, torchvision's ImageFolder layout: ``DATA/<split>/<class>/<image>``. The
  classes are ``labels`` in that order when given, else the class folders of train, sorted
  (ImageFolder's order); a class folder not in ``labels`` is an error.
* list files, the VTAB-1k format: ``DATA/<split>.txt`` with lines ``relative/path class``
  where ``class`` is a number into ``labels`` (required here: it says how many classes).

Split names default to train, val and test (``splits:`` renames them, e.g. ``train: train800``
for a VTAB-1k folder); without val, a seeded 90/10 cut of train is the val split. ``prepare``
writes a manifest like VTAB's (image paths, labels, the model's preprocessing) that records
the declaration; the loaders refuse a manifest made for another declaration or class list.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from bayestune.files import write_json
from bayestune.models.base import TaskModel
from bayestune.models.vision import build_vision_model
from bayestune.tasks import vtab
from bayestune.tasks.base import SPLITS, TaskData, TaskError, split_train_val
from bayestune.tasks.custom import CustomTask, label_text

MANIFEST = vtab.MANIFEST
Items = list[tuple[str, int]]   # (image path, class id)


def _folder(task: CustomTask) -> Path:
    folder = Path(task.data).expanduser()
    if not folder.is_dir():
        raise TaskError(f"custom task {task.name!r}: image folder {folder} does not exist "
                        f"(relative paths are read from {Path.cwd()})")
    return folder


def layout(task: CustomTask, folder: Path) -> str:
    """``folders`` (ImageFolder) or ``lists`` (VTAB), from what holds the train split."""
    train = task.split_name("train")
    if (folder / train).is_dir():
        return "folders"
    if (folder / f"{train}.txt").is_file():
        return "lists"
    raise TaskError(f"{folder}: neither a class-folder split {train}/ nor a list file "
                    f"{train}.txt (task {task.name!r}); see the module's layouts")


def class_names(task: CustomTask, folder: Path | None = None) -> tuple[str, ...]:
    """The classes in head order: ``labels``, or the train split's class folders sorted."""
    if task.labels is not None:
        return task.labels
    folder = folder or _folder(task)
    if layout(task, folder) == "lists":
        raise TaskError(f"custom task {task.name!r}: list files hold class numbers; declare "
                        "labels: the class names in the order of those numbers")
    classes, _ = find_classes(str(folder / task.split_name("train")))
    if len(classes) < 2:
        raise TaskError(f"{folder / task.split_name('train')}: {len(classes)} class folder(s); "
                        "a classifier needs two or more")
    return tuple(label_text(c) for c in classes)


def _folder_items(split_dir: Path, classes: tuple[str, ...]) -> Items:
    found, _ = find_classes(str(split_dir))
    unknown = [c for c in found if label_text(c) not in classes]
    if unknown:
        raise TaskError(f"{split_dir / unknown[0]}: class folder {unknown[0]!r} is not one of "
                        f"the labels {list(classes)}; add it to labels or move it")
    class_to_idx = {c: classes.index(label_text(c)) for c in found}
    return make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS,
                        allow_empty=True)


def _split_items(task: CustomTask, folder: Path, kind: str, split: str,
                 classes: tuple[str, ...]) -> Items | None:
    """The split's images, or None for a val split that is not there (cut from train)."""
    name = task.split_name(split)
    if name is None:
        return None
    where = folder / name if kind == "folders" else folder / f"{name}.txt"
    if not where.exists():
        if split == "val" and task.val_is_optional():
            return None
        raise TaskError(f"{where}: missing {split} split of task {task.name!r}")
    items = (_folder_items(where, classes) if kind == "folders"
             else vtab.read_list(where, len(classes)))
    if not items:
        raise TaskError(f"{where}: no images in the {split} split of task {task.name!r}")
    return items


def prepare(task: CustomTask, model_name: str, out_dir: str | os.PathLike[str],
            max_length: int = 128) -> Path:
    """Check every split and write ``out_dir/manifest.json``; return ``out_dir``
    (``max_length`` is a text task's: images have none)."""
    folder = _folder(task)
    kind = layout(task, folder)
    classes = class_names(task, folder)
    items = {split: _split_items(task, folder, kind, split, classes) for split in SPLITS}
    if items["val"] is None:
        items["train"], items["val"] = split_train_val(items["train"])
    manifest: dict[str, Any] = {
        "task": task.name, "declaration": task.declaration(), "labels": list(classes),
        "layout": kind, "folder": str(folder.resolve()),
        **vtab.image_manifest(model_name, items),
    }
    out_dir = Path(out_dir)
    write_json(out_dir / MANIFEST, manifest)
    return out_dir


def load_data(task: CustomTask, prepared_dir: str | os.PathLike[str], batch_size: int,
              seed: int, eval_batch_size: int = 64) -> TaskData:
    manifest = vtab.read_manifest(task.name, Path(prepared_dir))
    if manifest.get("declaration") != task.declaration():
        raise TaskError(f"{prepared_dir}: prepared for another declaration of task "
                        f"{task.name!r}; run `bayestune prepare` again with the current one")
    if tuple(manifest.get("labels", ())) != class_names(task):
        raise TaskError(f"{prepared_dir}: the class folders of task {task.name!r} changed "
                        "since it was prepared; run `bayestune prepare` again")
    return vtab.image_loaders(manifest["splits"], manifest["preprocess"], batch_size, seed,
                              eval_batch_size)


def build_model(task: CustomTask, model_name: str, seed: int,
                architecture: str | None = None) -> TaskModel:
    """The timm encoder ``model_name`` with a fresh head over the task's classes
    (``architecture`` is a text model's: an image model has no choice)."""
    return build_vision_model(model_name, len(class_names(task)), seed)

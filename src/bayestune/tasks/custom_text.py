"""Declared text tasks (``custom_tasks`` with ``text_fields``): source, rows, token cache.

The data is a folder of split files (``train.csv``, ...) when ``data`` names one; anything
else, a Hub name or a folder in a dataset repository's layout, is read by
``datasets.load_dataset(data, subset)``.
Each row gives one or two texts and a label; the label is a class of ``labels`` (compared as
text, see :func:`bayestune.tasks.custom.label_text`) or, for ``regression: true``, a number.
The token cache's key holds the declaration, the source and a hash of the raw data, so an edit
to either tokenises again, and :func:`load_data` refuses a cache made for another declaration.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bayestune.models.base import DEFAULT_ARCHITECTURE, TaskModel
from bayestune.models.text import build_text_model
from bayestune.tasks import tables, tokens
from bayestune.tasks.base import SPLITS, TaskData, TaskError, hash_files, split_train_val
from bayestune.tasks.custom import CustomTask, label_text

# split -> (where the rows come from, the rows); None: no val split, cut from train
SplitRows = dict[str, tuple[str, list[tables.Row]] | None]


@dataclass
class Example:
    where: str
    texts: tuple[str, ...]
    label: int | float


# --- sources ----------------------------------------------------------------------------------
@dataclass
class TextSource:
    """Where a declared task's rows come from, and the identity of that data. The rows are
    read on first use: a current token cache needs only the identity."""

    name: str          # absolute folder, or "hub:NAME[/SUBSET]"
    data_hash: str     # SHA-256 of the split files, or the Hub splits' datasets fingerprints
    readers: dict[str, Callable[[], tuple[str, list[tables.Row]]] | None]

    @functools.cached_property
    def rows(self) -> SplitRows:
        return {split: None if read is None else read() for split, read in self.readers.items()}


def _folder_source(task: CustomTask, folder: Path) -> TextSource:
    paths: dict[str, Path | None] = {}
    for split in SPLITS:
        stem = task.split_name(split)
        paths[split] = None if stem is None else tables.find_split_file(folder, stem)
        optional = split == "val" and task.val_is_optional()
        if paths[split] is None and not optional:
            raise TaskError(f"{folder}: no {split} split; expected {stem} with one of "
                            f"{', '.join(tables.SUFFIXES)} (task {task.name!r}; name other "
                            "files with the declaration's splits: key)")
    found = [p for p in paths.values() if p is not None]
    readers = {split: None if p is None else functools.partial(_read_file, p)
               for split, p in paths.items()}
    return TextSource(str(folder.resolve()), hash_files(found), readers)


def _read_file(path: Path) -> tuple[str, list[tables.Row]]:
    return str(path), tables.read_table(path)


def _hub_source(task: CustomTask, folder: Path | None) -> TextSource:
    """Every split through ``datasets.load_dataset(data, subset)``: a Hub name, or a local
    folder ``datasets`` reads (a downloaded Hub repository, with its card and Parquet files)."""
    try:
        loaded = tables.load_hub_splits(task.data, task.subset)
    except Exception as err:  # offline, unknown name, wrong subset: all end here
        if folder is not None:
            raise TaskError(
                f"custom task {task.name!r}: folder {folder} holds no {task.split_name('train')} "
                f"file ({', '.join(tables.SUFFIXES)}) and `datasets` cannot read it as a "
                f"dataset either ({err}); name the split files with splits:") from err
        raise TaskError(
            f"custom task {task.name!r}: data {task.data!r} is not a folder (looked in "
            f"{Path.cwd()}) and cannot be loaded as a Hugging Face dataset ({err}); give an "
            "existing folder, or a dataset name reachable from this machine") from err
    readers: dict[str, Callable[[], tuple[str, list[tables.Row]]] | None] = {}
    fingerprints = []
    for split in SPLITS:
        name = task.split_name(split, hub=True)
        if name not in loaded:
            if split == "val" and task.val_is_optional():
                readers[split] = None
                continue
            raise TaskError(f"custom task {task.name!r}: dataset {task.data!r} has no split "
                            f"{name!r} (it has {', '.join(loaded)}); map {split} to one of "
                            "them with splits:")
        dataset = loaded[name]
        readers[split] = functools.partial(_read_hub_split, task, name, dataset)
        fingerprints.append(f"{name}:{getattr(dataset, '_fingerprint', '')}")
    origin = str(folder.resolve()) if folder is not None else task.data
    source = "hub:" + origin + (f"/{task.subset}" if task.subset else "")
    return TextSource(source, "/".join(fingerprints), readers)


def _read_hub_split(task: CustomTask, name: str, dataset: Any) -> tuple[str, list[tables.Row]]:
    return f"hub {task.data} {name}", tables.hub_rows(task.data, name, dataset, task.label_field)


def open_source(task: CustomTask) -> TextSource:
    """A folder of split files; else whatever ``datasets.load_dataset`` reads at ``data``."""
    folder = Path(task.data).expanduser()
    if folder.is_dir():
        has_files = tables.find_split_file(folder, task.split_name("train")) is not None
        if has_files and task.subset is None:
            return _folder_source(task, folder)
        return _hub_source(task, folder)
    # A Hub name is NAME or OWNER/NAME; anything else that names no folder is a missing one.
    if task.data.startswith((".", "/", "~")) or task.data.count("/") > 1:
        raise TaskError(f"custom task {task.name!r}: data folder {folder} does not exist "
                        f"(relative paths are read from {Path.cwd()})")
    return _hub_source(task, None)


# --- rows -> examples -------------------------------------------------------------------------
def _label(task: CustomTask, value: Any, where: str) -> int | float:
    if tables.is_missing(value) or value == "":
        raise TaskError(f"{where}: no label in field {task.label_field!r}")
    if task.regression:
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise TaskError(f"{where}: label {value!r} is not a finite number (task "
                            f"{task.name!r} is a regression)")
        return number
    try:
        text = label_text(value)
    except TypeError as err:
        raise TaskError(f"{where}: {err}") from err
    if text not in task.labels:
        text = _same_number(text, task.labels) or text
    if text not in task.labels:
        raise TaskError(f"{where}: label {text!r} is not one of the declared labels "
                        f"{list(task.labels)} of task {task.name!r} (labels are compared as "
                        "text); fix the row or add the label")
    return task.labels.index(text)


def _same_number(text: str, labels: Sequence[str]) -> str | None:
    """The declared label that names the same integral number as ``text`` ("1.0" and "1"), as
    a number read from JSON or Parquet already does (see label_text): a CSV written from a
    float column holds "1.0" for a label declared "1". Only an integral number matches one."""
    try:
        number = float(text)
    except ValueError:
        return None
    if not number.is_integer():
        return None
    matches = [label for label in labels if _integral(label) == number]
    return matches[0] if len(matches) == 1 else None


def _integral(label: str) -> float | None:
    try:
        number = float(label)
    except ValueError:
        return None
    return number if number.is_integer() else None


def to_example(task: CustomTask, row: dict[str, Any], where: str) -> Example:
    texts = []
    for name in task.text_fields:
        value = row.get(name)
        if tables.is_missing(value):
            raise TaskError(f"{where}: no text in field {name!r}")
        if not isinstance(value, str):
            raise TaskError(f"{where}: field {name!r} must be text, got {value!r}")
        texts.append(value)
    return Example(where, tuple(texts), _label(task, row.get(task.label_field), where))


def _check_columns(task: CustomTask, origin: str, rows: list[tables.Row]) -> None:
    if not rows:
        return
    columns = tables.columns_of(rows)
    wanted = [*task.text_fields, task.label_field]
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise TaskError(f"{origin}: no field {missing[0]!r} (task {task.name!r} reads "
                        f"{', '.join(wanted)}; the data has {', '.join(sorted(columns))})")


def read_examples(task: CustomTask, source: TextSource) -> dict[str, list[Example]]:
    """Validated train/val/test examples; without a val split, a seeded 90/10 cut of train."""
    examples: dict[str, list[Example]] = {}
    for split, found in source.rows.items():
        if found is None:
            continue
        origin, rows = found
        if not rows:
            raise TaskError(f"{origin}: the {split} split of task {task.name!r} has no rows")
        _check_columns(task, origin, rows)
        examples[split] = [to_example(task, row, where) for where, row in rows]
    if "val" not in examples:
        if len(examples["train"]) < 2:
            raise TaskError(f"custom task {task.name!r}: train has one row; a val split cut "
                            "from it needs two or more")
        examples["train"], examples["val"] = split_train_val(examples["train"])
    return examples


# --- the operations the dispatcher calls ------------------------------------------------------
def prepare(task: CustomTask, model_name: str, out_dir: str | os.PathLike[str],
            max_length: int = 128) -> Path:
    """Read, validate and tokenise the task's splits into ``out_dir`` (cached; see module)."""
    source = open_source(task)
    key = tokens.cache_key(task.name, model_name, max_length, source.name, source.data_hash,
                           declaration=task.declaration())
    if tokens.cache_is_current(out_dir, key):
        tokens.log.info("%s: token cache in %s is up to date", task.name, out_dir)
        return Path(out_dir)
    examples = read_examples(task, source)
    tokenizer = tokens.tokenizer_for(model_name)
    tensors = {}
    for split in SPLITS:
        rows = examples[split]
        second = [e.texts[1] for e in rows] if len(task.text_fields) == 2 else None
        tensors[split] = tokens.tokenize_texts(tokenizer, [e.texts[0] for e in rows], second,
                                               [e.label for e in rows], max_length,
                                               task.regression)
    return tokens.write_cache(out_dir, tensors, key, {s: len(examples[s]) for s in SPLITS})


def load_data(task: CustomTask, prepared_dir: str | os.PathLike[str], batch_size: int,
              seed: int, eval_batch_size: int = 64) -> TaskData:
    splits, meta = tokens.read_cache(task.name, prepared_dir)
    if meta.get("declaration") != task.declaration():
        raise TaskError(f"{prepared_dir}: prepared for another declaration of task "
                        f"{task.name!r} ({meta.get('declaration')}); run `bayestune prepare` "
                        "again with the current one")
    return tokens.text_loaders(splits, batch_size, seed, eval_batch_size)


def build_model(task: CustomTask, model_name: str, seed: int,
                architecture: str = DEFAULT_ARCHITECTURE) -> TaskModel:
    """The text encoder ``model_name`` with a fresh head: a regression head, or one over the
    declared labels."""
    head = "regression" if task.regression else "classification"
    return build_text_model(model_name, head, task.num_labels, seed, architecture)

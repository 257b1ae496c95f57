"""Tasks declared in a run config or a task file instead of in code (``custom_tasks:``).

A declaration names the data and how to read it::

    custom_tasks:
      reviews:                      # the task's name, listed under tasks:
        data: path/to/folder        # or a Hugging Face dataset name, e.g. imdb
        text_fields: [text]         # one field, or two for sentence pairs
        label_field: label
        labels: ["0", "1"]          # class order; or  regression: true
        metric: accuracy

Optional keys: ``kind`` (``text`` or ``image``; by default a task with ``text_fields`` or
another text-only key is a text task, any other an image task), ``subset`` (a Hub dataset's
configuration, e.g. ``rte`` of ``nyu-mll/glue``) and ``splits`` (where ``train``, ``val``
and ``test`` are found when not under those names: a file stem or folder in a data folder,
a split name on the Hub; the defaults are train/val/test in a folder and
train/validation/test on the Hub). Without a val split (or when its default name is taken,
as by ``test: validation``), a seeded 90/10 cut of train is the val split, as the paper's
tasks have.

Labels are compared as text: ``0``, ``"0"`` and ``0.0`` are the same label, and booleans read
as ``true`` / ``false``, so a CSV's ``"0"`` matches ``labels: [0, 1]`` and a JSON ``0``
matches ``labels: ["0", "1"]``.

Relative ``data`` paths are read from the working directory, like every path of a run config.
The schema (``workflow/schemas/config.schema.yaml``) checks the same rules when the workflow
starts; :func:`parse_custom_tasks` checks them again for the command line, which has no schema.

This module only reads declarations. What a task of each kind does (prepare, load, build) is
in :mod:`bayestune.tasks.custom_text` and :mod:`bayestune.tasks.custom_images`, which the
dispatcher (:mod:`bayestune.tasks`) loads by the declared kind.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bayestune.tasks.base import SPLITS, TaskError, TaskSpec
from bayestune.tasks.metrics import METRICS, REGRESSION_METRICS, TWO_CLASS_METRICS

SECTION = "custom_tasks"
KINDS = ("text", "image")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
KEYS = ("data", "kind", "subset", "splits", "text_fields", "label_field", "labels", "regression",
        "metric")
TEXT_ONLY_KEYS = ("subset", "text_fields", "label_field", "regression")
# Split names looked for when `splits:` does not say: in a data folder, and on the Hub.
FOLDER_SPLITS = {"train": "train", "val": "val", "test": "test"}
HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}
DECLARATION_HELP = "see the custom_tasks section of config/README.md"


def label_text(value: Any) -> str | None:
    """A raw label as the text it is compared by; None for a missing value.

    Integral numbers lose any ``.0`` (a column of ints with a gap reads as floats), booleans
    are ``true`` / ``false`` as JSON and YAML write them, strings lose surrounding spaces.
    """
    if value is None:
        return None
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return None
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if isinstance(value, str):
        return value.strip()
    raise TypeError(f"a label must be text, a number or a boolean, got {value!r}")


@dataclass(frozen=True)
class CustomTask:
    """One validated declaration; ``declaration`` is its content as written (normalised)."""

    name: str
    data: str
    kind: str
    metric: str
    text_fields: tuple[str, ...] = ()
    label_field: str | None = None
    labels: tuple[str, ...] | None = None
    regression: bool = False
    subset: str | None = None
    splits: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def num_labels(self) -> int:
        """Outputs of the head: 1 for regression, else the number of declared labels."""
        return 1 if self.regression else len(self.labels or ())

    def split_name(self, split: str, hub: bool = False) -> str | None:
        """Where ``split`` is read from; None for a val split to cut from train (no ``val``
        in ``splits:`` and the default name already taken, e.g. ``test: validation``)."""
        if split in self.splits:
            return self.splits[split]
        name = (HUB_SPLITS if hub else FOLDER_SPLITS)[split]
        if split == "val" and name in {self.split_name("train", hub), self.split_name("test", hub)}:
            return None
        return name

    def val_is_optional(self) -> bool:
        return "val" not in self.splits

    def declaration(self) -> dict[str, Any]:
        """The declaration in JSON types: part of a prepared cache's key, recorded with it."""
        out: dict[str, Any] = {"data": self.data, "kind": self.kind, "metric": self.metric}
        if self.kind == "text":
            out.update(text_fields=list(self.text_fields), label_field=self.label_field,
                       regression=self.regression)
        if self.labels is not None:
            out["labels"] = list(self.labels)
        if self.subset is not None:
            out["subset"] = self.subset
        if self.splits:
            out["splits"] = dict(sorted(self.splits.items()))
        return out

    def fingerprint(self) -> str:
        """The declaration as one stable string (a workflow param: an edit reruns prepare)."""
        return json.dumps(self.declaration(), sort_keys=True)

    def spec(self) -> TaskSpec:
        return TaskSpec(name=self.name, benchmark="custom", metric_name=self.metric,
                        metric=METRICS[self.metric])


# --- validation -------------------------------------------------------------------------------
def _fail(name: str, problem: str) -> TaskError:
    return TaskError(f"custom task {name!r}: {problem}; {DECLARATION_HELP}")


def _string(name: str, raw: Mapping[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(name, f"{key} must be a non-empty string, got {value!r}")
    return value


def _kind(name: str, raw: Mapping[str, Any]) -> str:
    kind = raw.get("kind")
    if kind is None:  # a text key says text, even when text_fields itself was forgotten
        return "text" if any(k in raw for k in TEXT_ONLY_KEYS) else "image"
    if kind not in KINDS:
        raise _fail(name, f"kind {kind!r} is not one of {', '.join(KINDS)}")
    return kind


def _text_fields(name: str, raw: Mapping[str, Any]) -> tuple[str, ...]:
    fields = raw.get("text_fields")
    if fields is None:
        raise _fail(name, "a text task needs text_fields (one field, or two for sentence pairs)")
    if isinstance(fields, str):
        fields = [fields]
    if not isinstance(fields, list) or not all(isinstance(f, str) and f for f in fields):
        raise _fail(name, f"text_fields must be a list of field names, got {fields!r}")
    if not 1 <= len(fields) <= 2:
        raise _fail(name, f"text_fields takes one field, or two for sentence pairs, not "
                          f"{len(fields)} ({', '.join(fields)})")
    if len(set(fields)) != len(fields):
        raise _fail(name, f"text_fields names {fields[0]!r} twice")
    return tuple(fields)


def _labels(name: str, raw: Mapping[str, Any]) -> tuple[str, ...] | None:
    labels = raw.get("labels")
    if labels is None:
        return None
    if not isinstance(labels, list):
        raise _fail(name, f"labels must be a list (the classes in order), got {labels!r}")
    try:
        texts = [label_text(label) for label in labels]
    except TypeError as err:
        raise _fail(name, f"labels: {err}") from err
    if any(t is None or t == "" for t in texts):
        raise _fail(name, "labels must not be empty or null")
    if len(texts) < 2:
        raise _fail(name, f"labels lists {len(texts)} class; a classifier needs two or more")
    duplicates = sorted({t for t in texts if texts.count(t) > 1})
    if duplicates:
        raise _fail(name, f"labels repeats {duplicates[0]!r} (labels are compared as text, so "
                          "0 and \"0\" are the same label)")
    return tuple(texts)


def _splits(name: str, raw: Mapping[str, Any]) -> dict[str, str]:
    splits = raw.get("splits") or {}
    if not isinstance(splits, Mapping):
        raise _fail(name, f"splits must map train/val/test to names, got {splits!r}")
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise _fail(name, f"splits: unknown split {unknown[0]!r}; use {', '.join(SPLITS)}")
    for split, value in splits.items():
        if not isinstance(value, str) or not value:
            raise _fail(name, f"splits: {split} must name a file stem, folder or Hub split, "
                              f"got {value!r}")
    return dict(splits)


def parse_declaration(name: str, raw: Any, reserved: frozenset[str] = frozenset()) -> CustomTask:
    """Validate one declaration; every problem is a :class:`TaskError` naming task and key."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise _fail(str(name), "a task name takes letters, digits, '_', '.' and '-', starting "
                               "with a letter or digit (it becomes a folder name)")
    if name in reserved:
        raise _fail(name, "the name of a built-in task; give the declaration another name")
    if not isinstance(raw, Mapping):
        raise _fail(name, f"the declaration must be a mapping of keys, got {raw!r}")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise _fail(name, f"unknown key {unknown[0]!r}; the keys are {', '.join(KEYS)}")
    data = _string(name, raw, "data")
    if data is None:
        raise _fail(name, "data is missing: a folder, or a Hugging Face dataset name")
    metric = raw.get("metric")
    if metric is None:
        raise _fail(name, f"metric is missing; one of {', '.join(METRICS)}")
    if metric not in METRICS:
        raise _fail(name, f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
    kind, labels = _kind(name, raw), _labels(name, raw)
    common = {"name": name, "data": data, "kind": kind, "metric": metric, "labels": labels,
              "splits": _splits(name, raw)}
    if kind == "image":
        given = [k for k in TEXT_ONLY_KEYS if k in raw]
        if given:
            raise _fail(name, f"{given[0]} is for text tasks; an image task takes data, labels "
                              "(optional for class folders), splits and metric")
        if metric in REGRESSION_METRICS:
            raise _fail(name, f"metric {metric} scores a regression; image tasks are classified")
        return CustomTask(**common)
    regression = raw.get("regression", False)
    if not isinstance(regression, bool):
        raise _fail(name, f"regression must be true or false, got {regression!r}")
    label_field = _string(name, raw, "label_field")
    if label_field is None:
        raise _fail(name, "label_field is missing: the field that holds each row's label")
    fields = _text_fields(name, raw)
    if label_field in fields:
        raise _fail(name, f"label_field {label_field!r} is also a text field")
    if "regression" in raw and labels is not None:
        raise _fail(name, "labels and regression both given: give labels for classes, or "
                          "regression: true for a score")
    if not regression and labels is None:
        raise _fail(name, "labels is missing: the classes in order (or regression: true)")
    if regression != (metric in REGRESSION_METRICS):
        wanted = sorted(REGRESSION_METRICS if regression else set(METRICS) - REGRESSION_METRICS)
        raise _fail(name, f"metric {metric} does not score a "
                          f"{'regression' if regression else 'classification'}; use one of "
                          f"{', '.join(wanted)}")
    if metric in TWO_CLASS_METRICS and labels is not None and len(labels) != 2:
        raise _fail(name, f"metric {metric} is the F1 of class 1 of two classes, and labels "
                          f"lists {len(labels)}; use macro_f1 or acc_macro_f1")
    return CustomTask(**common, text_fields=fields, label_field=label_field,
                      regression=regression, subset=_string(name, raw, "subset"))


def parse_custom_tasks(section: Any, where: str = SECTION) -> dict[str, CustomTask]:
    """Every declaration of a ``custom_tasks`` mapping, validated (``where`` for messages)."""
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise TaskError(f"{where}: custom_tasks must map task names to declarations, got "
                        f"{type(section).__name__}")
    from bayestune.tasks.builtin import builtin_tasks  # loads the benchmarks' modules

    reserved = frozenset(builtin_tasks())
    return {name: parse_declaration(name, raw, reserved) for name, raw in section.items()}


def read_task_file(path: str | os.PathLike[str]) -> dict[str, CustomTask]:
    """The declarations of a task file: YAML with a top-level ``custom_tasks:`` mapping (so a
    run config that declares tasks is a task file too)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such task file; a task file is YAML with a top-level "
                        "custom_tasks: mapping (a run config that declares tasks will do)")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise TaskError(f"{path}: not a readable YAML task file ({err})") from err
    if not isinstance(content, Mapping) or SECTION not in content:
        raise TaskError(f"{path}: no top-level custom_tasks: mapping; a task file declares "
                        f"tasks under it ({DECLARATION_HELP})")
    return parse_custom_tasks(content[SECTION], where=str(path))

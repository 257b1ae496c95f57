"""Rows of a declared text task's splits, from a data folder or a Hugging Face dataset.

A data folder holds one file per split, named by the split (``train.csv``, ``val.jsonl``,
``test.parquet``; see :data:`SUFFIXES`). Files are parsed by pandas; this module adds what
pandas does not say: which line of which file a row came from, so that every data error can
name it. CSV and TSV files are read as text (a CSV label ``0`` is the string ``"0"``); TSV
fields are not quoted, as in GLUE's files. JSON Lines keep their JSON types, and a key missing
from a line reads as missing (not as an empty string).
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from bayestune.tasks.base import TaskError

SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet")
Row = tuple[str, dict[str, Any]]   # (where: "file:line" or "hub NAME split row N", row)


def is_missing(value: Any) -> bool:
    """None, NaN and pandas' NA: a field the row does not have."""
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def find_split_file(folder: Path, stem: str) -> Path | None:
    """The one file ``stem.<suffix>`` in ``folder``; None when there is none."""
    found = [folder / f"{stem}{suffix}" for suffix in SUFFIXES if (folder / f"{stem}{suffix}")
             .is_file()]
    if len(found) > 1:
        raise TaskError(f"{folder}: {' and '.join(p.name for p in found)} both hold split "
                        f"{stem!r}; keep one")
    return found[0] if found else None


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark (spreadsheet exports) is dropped
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise TaskError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save "
                        "the file as UTF-8") from err


def _bad_json_line(path: Path, lines: list[str]) -> TaskError:
    """The first line that is not a JSON object (pandas' own errors name no line)."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            return TaskError(f"{path}:{number}: malformed JSON ({err.msg}); fix the line")
        if not isinstance(record, dict):
            return TaskError(f"{path}:{number}: expected a JSON object, got "
                             f"{type(record).__name__}")
    return TaskError(f"{path}: not a JSON Lines file (one JSON object per line)")


def _jsonl_rows(path: Path, text: str) -> list[Row]:
    lines = text.split("\n")
    numbers = [i for i, line in enumerate(lines, start=1) if line.strip()]  # pandas skips blanks
    if not numbers:
        return []
    try:
        frame = pd.read_json(io.StringIO(text), lines=True, dtype=False)
    except (ValueError, TypeError) as err:
        raise _bad_json_line(path, lines) from err
    if len(frame) != len(numbers):
        raise _bad_json_line(path, lines)
    return [(f"{path}:{n}", row) for n, row in zip(numbers, _records(frame), strict=True)]


def _delimited_rows(path: Path, text: str, tsv: bool) -> list[Row]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            frame = pd.read_csv(io.StringIO(text), sep="\t" if tsv else ",", dtype=str,
                                keep_default_na=False, skip_blank_lines=False, index_col=False,
                                quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        except (pd.errors.ParserError, pd.errors.ParserWarning) as err:
            raise TaskError(f"{path}: a row has more fields than the header ({err}); quote "
                            "fields that hold the separator") from err
        except pd.errors.EmptyDataError as err:
            raise TaskError(f"{path}: empty file; it needs a header line and rows") from err
    duplicated = [c for c in frame.columns if "." in c and c.rsplit(".", 1)[0] in frame.columns]
    if duplicated:
        raise TaskError(f"{path}: column {duplicated[0].rsplit('.', 1)[0]!r} appears twice in "
                        "the header")
    lines = text.split("\n")
    rows, line = [], 2  # line 1 is the header
    for row in _records(frame):
        blank = line <= len(lines) and not lines[line - 1].strip()
        if not blank:
            rows.append((f"{path}:{line}", row))
        # a quoted field may span lines: the next row starts after them
        line += 1 + sum(value.count("\n") for value in row.values() if isinstance(value, str))
    return rows


def _records(frame: pd.DataFrame) -> Iterator[dict[str, Any]]:
    columns = [str(c) for c in frame.columns]
    for values in frame.itertuples(index=False, name=None):
        yield dict(zip(columns, values, strict=True))


def read_table(path: Path) -> list[Row]:
    """Every row of one split file with the line (or row number, Parquet) it came from."""
    if path.suffix == ".parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise TaskError(f"{path}: not a readable Parquet file ({err})") from err
        return [(f"{path} row {i}", row) for i, row in enumerate(_records(frame), start=1)]
    text = _decode(path)
    if path.suffix == ".jsonl":
        return _jsonl_rows(path, text)
    return _delimited_rows(path, text, tsv=path.suffix == ".tsv")


def columns_of(rows: list[Row]) -> set[str]:
    return set(rows[0][1]) if rows else set()


# --- Hugging Face datasets ------------------------------------------------------------------
def load_hub_splits(name: str, subset: str | None) -> Any:
    """``datasets.load_dataset(name, subset)``: every split of a Hub dataset (a DatasetDict)."""
    import datasets

    return datasets.load_dataset(name, subset)


def hub_rows(name: str, split_name: str, dataset: Any, label_field: str | None) -> list[Row]:
    """Rows of one loaded split; a class-label column gives each row its class *name*
    (imdb: neg/pos), the hidden label -1 of a test split stays -1."""
    import datasets

    feature = dataset.features.get(label_field) if label_field else None
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    rows = []
    for i, row in enumerate(dataset):
        if names is not None and isinstance(row.get(label_field), int) and \
                0 <= row[label_field] < len(names):
            row = {**row, label_field: names[row[label_field]]}
        rows.append((f"hub {name} {split_name} row {i}", row))
    return rows

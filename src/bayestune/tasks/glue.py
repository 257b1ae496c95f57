"""The seven GLUE / SuperGLUE tasks of the paper: registry, sources, token cache, loaders.

Splits follow the SAM paper's protocol (the BayesTune benchmark): the official training set is
split 90/10 into ``train`` / ``val`` (model selection) and the official dev set is ``test``.

Two sources give the same three splits:

* a local folder laid out as ``TASK/{train,val,test}.jsonl`` (the glue_superglue layout), given
  as ``data_dir`` (CLI ``--data-dir``, config key ``glue_dir``) or env ``BAYESTUNE_GLUE_DIR``;
* the Hugging Face Hub through ``datasets`` when no folder is given (or ``data_dir == "hub"``):
  the official train split is cut 90/10 with :data:`HUB_SPLIT_SEED`, the dev split is ``test``.

Rows from either source are validated by the same code, so a bad line fails with its file and
line number. :func:`prepare` tokenises the splits once into a cache keyed by (task, tokenizer,
max length); :func:`load_data` serves it with padding trimmed per batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from torch.utils.data import DataLoader

from bayestune.files import FileFormatError, load_token_cache, save_token_cache
from bayestune.models.base import TaskModel
from bayestune.models.text import build_text_model, canonical_model_name, load_tokenizer
from bayestune.tasks.base import TaskData, TaskError, TaskSpec

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CACHE_FILE = "tokens.safetensors"
ENV_DIR = "BAYESTUNE_GLUE_DIR"
HUB = "hub"
HUB_SPLIT_SEED = 0          # the fixed permutation seed of the hub source's 90/10 train/val cut
HUB_VAL_FRACTION = 0.1
COPA_QUESTIONS = {"cause": "What was the cause?", "effect": "What happened as a result?"}
SOURCE_HELP = (
    "point bayestune at a local copy laid out as TASK/{train,val,test}.jsonl (like "
    "shared/data/glue_superglue): config key glue_dir, environment variable BAYESTUNE_GLUE_DIR, "
    "or --data-dir on the command line")


# --- metrics: logits and labels as numpy arrays, scores in natural units ---------------------
def _predictions(logits: np.ndarray) -> np.ndarray:
    return np.asarray(logits).argmax(axis=-1)


def matthews(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(matthews_corrcoef(labels, _predictions(logits)))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(accuracy_score(labels, _predictions(logits)))


def acc_f1(logits: np.ndarray, labels: np.ndarray) -> float:
    preds = _predictions(logits)
    return float((accuracy_score(labels, preds) + f1_score(labels, preds, zero_division=0)) / 2)


def acc_macro_f1(logits: np.ndarray, labels: np.ndarray) -> float:
    preds = _predictions(logits)
    f1 = f1_score(labels, preds, labels=[0, 1, 2], average="macro", zero_division=0)
    return float((accuracy_score(labels, preds) + f1) / 2)


def pearson_spearman(logits: np.ndarray, labels: np.ndarray) -> float:
    preds = np.asarray(logits, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    if np.ptp(preds) == 0 or np.ptp(labels) == 0:
        return 0.0  # correlation is undefined for a constant; count it as none, not NaN
    return float((pearsonr(preds, labels)[0] + spearmanr(preds, labels)[0]) / 2)


# --- registry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskFormat:
    """How one task's rows look: its text fields, labels, head and Hub source."""

    fields: tuple[str, ...]
    labels: tuple | None        # allowed raw labels in class-id order; None: a score in [0, 5]
    head: str
    hub: tuple[str, str]        # (dataset, config) on the Hugging Face Hub

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


FORMATS: dict[str, TaskFormat] = {
    "cola": TaskFormat(("text",), ("0", "1"), "classification", ("nyu-mll/glue", "cola")),
    "stsb": TaskFormat(("text_a", "text_b"), None, "regression", ("nyu-mll/glue", "stsb")),
    "mrpc": TaskFormat(("text_a", "text_b"), ("0", "1"), "classification",
                       ("nyu-mll/glue", "mrpc")),
    "rte": TaskFormat(("premise", "hypothesis"), ("entailment", "not_entailment"),
                      "classification", ("nyu-mll/glue", "rte")),
    "cb": TaskFormat(("premise", "hypothesis"), ("entailment", "contradiction", "neutral"),
                     "classification", ("aps/super_glue", "cb")),
    "copa": TaskFormat(("premise", "choice1", "choice2", "question"), (0, 1), "copa",
                       ("aps/super_glue", "copa")),
    "wsc": TaskFormat(("text", "target"), (False, True), "wsc", ("aps/super_glue", "wsc.fixed")),
}

_METRICS = {"cola": ("matthews", matthews), "stsb": ("pearson_spearman", pearson_spearman),
            "mrpc": ("acc_f1", acc_f1), "rte": ("accuracy", accuracy),
            "cb": ("acc_macro_f1", acc_macro_f1), "copa": ("accuracy", accuracy),
            "wsc": ("accuracy", accuracy)}

TASKS: dict[str, TaskSpec] = {
    name: TaskSpec(name=name, benchmark="glue", metric_name=metric_name, metric=metric)
    for name, (metric_name, metric) in _METRICS.items()
}


def _format(task: str) -> TaskFormat:
    if task not in FORMATS:
        raise TaskError(f"unknown GLUE/SuperGLUE task {task!r}; known: {', '.join(FORMATS)}")
    return FORMATS[task]


# --- validation: one raw row (local line or Hub row) -> one clean example ---------------------
def _field(row: dict, name: str, kind: type, where: str, task: str) -> Any:
    if name not in row:
        raise TaskError(f"{where}: missing field {name!r} (task {task} rows need "
                        f"{', '.join(FORMATS[task].fields)} and label)")
    value = row[name]
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise TaskError(f"{where}: field {name!r} must be {kind.__name__}, got {value!r}")
    return value


def _label_id(task: str, row: dict, where: str) -> int | float:
    if "label" not in row:
        raise TaskError(f"{where}: missing field 'label'")
    label, allowed = row["label"], FORMATS[task].labels
    if allowed is None:
        ok = isinstance(label, int | float) and not isinstance(label, bool) and 0 <= label <= 5
        if not ok:
            raise TaskError(f"{where}: label {label!r} is not a similarity score in [0, 5]")
        return float(label)
    for class_id, value in enumerate(allowed):
        if type(label) is type(value) and label == value:
            return class_id
    raise TaskError(f"{where}: label {label!r} is not in the {task} label set {list(allowed)}")


def _norm_word(word: str) -> str:
    return re.sub(r"\W", "", word.lower())


def locate_span(text: str, word_index: int, span_text: str) -> tuple[int, int] | None:
    """Character range of the span that starts at whitespace word ``word_index`` of ``text``.

    The official WSC data has a few off-by-one word indices and possessives ("Emma's" for
    span "Emma"), so an exact match up to two words away is accepted, then a prefix match in
    place; anything else is a data error (``None``).
    """
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    target = [_norm_word(w) for w in span_text.split()]
    if not target or not all(target):
        return None

    def found(start: int) -> list[str] | None:
        if start < 0 or start + len(target) > len(words):
            return None
        return [_norm_word(text[a:b]) for a, b in words[start:start + len(target)]]

    for shift in (0, -1, 1, -2, 2):
        if found(word_index + shift) == target:
            first, last = words[word_index + shift], words[word_index + shift + len(target) - 1]
            return first[0], last[1]
    cand = found(word_index)
    if cand and cand[:-1] == target[:-1] and cand[-1].startswith(target[-1]):
        last_start = words[word_index + len(target) - 1][0]
        return words[word_index][0], last_start + len(span_text.split()[-1])
    return None


def _wsc_spans(row: dict, where: str) -> tuple[tuple[int, int], tuple[int, int]]:
    text = row["text"]
    target = _field(row, "target", dict, where, "wsc")
    spans = []
    for k in ("1", "2"):
        span_text = _field(target, f"span{k}_text", str, f"{where} target", "wsc")
        index = _field(target, f"span{k}_index", int, f"{where} target", "wsc")
        span = locate_span(text, index, span_text)
        if span is None:
            word = text.split()[index] if 0 <= index < len(text.split()) else "<out of range>"
            raise TaskError(f"{where}: span{k}_text {span_text!r} does not match the text at "
                            f"word {index} ({word!r}); fix span{k}_index or span{k}_text")
        spans.append(span)
    return spans[0], spans[1]


def validate_row(task: str, row: Any, where: str) -> dict:
    """Check a raw row against its task; return its texts, label id and (WSC) span ranges."""
    if not isinstance(row, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(row).__name__}")
    fmt = _format(task)
    example = {"where": where, "label": _label_id(task, row, where)}
    for name in fmt.fields:
        if name != "target":
            example[name] = _field(row, name, str, where, task)
    if task == "copa" and example["question"] not in COPA_QUESTIONS:
        raise TaskError(f"{where}: question {example['question']!r} is not one of "
                        f"{list(COPA_QUESTIONS)}")
    if task == "wsc":
        example["span1"], example["span2"] = _wsc_spans(row, where)
    return example


# --- sources ----------------------------------------------------------------------------------
def read_split_file(task: str, path: Path) -> list[dict]:
    """Validated examples of one ``.jsonl`` split; errors name the file and line."""
    if not path.is_file():
        raise TaskError(f"{path}: split file missing; a GLUE data folder needs "
                        f"{task}/train.jsonl, val.jsonl and test.jsonl")
    examples = []
    with path.open("rb") as handle:  # decoded line by line, so a bad byte has a line number
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TaskError(f"{path}:{lineno}: not UTF-8 text (byte {err.start + 1} of the "
                                f"line is {raw[err.start:err.start + 1]!r}); save the file as "
                                "UTF-8") from err
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{path}:{lineno}: malformed JSON ({err.msg}); "
                                "fix the line or restore the file") from err
            examples.append(validate_row(task, row, f"{path}:{lineno}"))
    if not examples:
        raise TaskError(f"{path}: empty split, no rows; restore the file")
    return examples


def read_local(task: str, data_dir: Path) -> dict[str, list[dict]]:
    return {split: read_split_file(task, data_dir / task / f"{split}.jsonl") for split in SPLITS}


T = TypeVar("T")


def split_train_val(rows: Sequence[T], seed: int = HUB_SPLIT_SEED,
                    val_fraction: float = HUB_VAL_FRACTION) -> tuple[list[T], list[T]]:
    """Cut ``rows`` into (train, val) by a seeded permutation; each part keeps the row order."""
    n = len(rows)
    n_val = min(n - 1, max(1, math.ceil(n * val_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    val_idx = set(order[:n_val].tolist())
    train = [row for i, row in enumerate(rows) if i not in val_idx]
    val = [row for i, row in enumerate(rows) if i in val_idx]
    return train, val


def _hub_to_local(task: str, row: dict) -> dict:
    """A Hub row in the local file layout, so both sources share one validation."""
    label = row.get("label")
    if task in ("cola", "mrpc"):
        label = str(label)
    elif task in ("rte", "cb"):
        names = FORMATS[task].labels
        label = names[label] if isinstance(label, int) and 0 <= label < len(names) else label
    elif task == "wsc":
        label = bool(label) if label in (0, 1) else label
    out = {"idx": row.get("idx"), "label": label}
    if task == "cola":
        out["text"] = row["sentence"]
    elif task in ("stsb", "mrpc"):
        out["text_a"], out["text_b"] = row["sentence1"], row["sentence2"]
    elif task == "rte":
        out["premise"], out["hypothesis"] = row["sentence1"], row["sentence2"]
    elif task == "wsc":
        out["text"] = row["text"]
        out["target"] = {k: row[k] for k in
                         ("span1_index", "span1_text", "span2_index", "span2_text")}
    else:
        out.update({k: row[k] for k in FORMATS[task].fields})
    return out


def _load_hub_split(dataset: str, config: str, split: str) -> list[dict]:
    import datasets

    return list(datasets.load_dataset(dataset, config, split=split))


def read_hub(task: str) -> dict[str, list[dict]]:
    """Official train cut 90/10 into train/val (seed :data:`HUB_SPLIT_SEED`), dev as test."""
    dataset, config = _format(task).hub
    try:
        train_rows = _load_hub_split(dataset, config, "train")
        dev_rows = _load_hub_split(dataset, config, "validation")
    except Exception as err:  # offline, unknown repo, changed layout: all mean "use a folder"
        raise TaskError(f"cannot load {task} from the Hugging Face Hub ({dataset}, {config}): "
                        f"{err}. Offline, {SOURCE_HELP}.") from err
    where = f"hub {dataset}/{config}"
    if not train_rows or not dev_rows:
        raise TaskError(f"{where}: empty split on the Hub; {SOURCE_HELP}")

    def clean(rows: list[dict], split: str) -> list[dict]:
        return [validate_row(task, _hub_to_local(task, r), f"{where} {split} row {i}")
                for i, r in enumerate(rows)]

    train, val = split_train_val(clean(train_rows, "train"))
    return {"train": train, "val": val, "test": clean(dev_rows, "validation")}


def resolve_source(data_dir: str | os.PathLike[str] | None) -> Path | str:
    """``data_dir`` if given, else env BAYESTUNE_GLUE_DIR, else the Hub (``"hub"``)."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(ENV_DIR) or None
    if chosen is None or str(chosen) == HUB:
        return HUB
    path = Path(chosen)
    if not path.is_dir():
        origin = "data_dir" if data_dir not in (None, "") else f"${ENV_DIR}"
        raise TaskError(f"GLUE data folder {path} (from {origin}) does not exist; {SOURCE_HELP}, "
                        "or pass data_dir='hub' to download from the Hugging Face Hub")
    return path


def read_splits(task: str, data_dir: str | os.PathLike[str] | None = None) -> dict[str, list[dict]]:
    """The validated train/val/test examples of ``task`` from the resolved source."""
    _format(task)
    source = resolve_source(data_dir)
    return read_hub(task) if source == HUB else read_local(task, Path(source))


# --- tokenisation -----------------------------------------------------------------------------
def _encode(tokenizer, first: list[str], second: list[str] | None, max_length: int, **extra):
    return tokenizer(first, second, truncation=True, max_length=max_length, padding=True,
                     return_tensors="pt", **extra)


def _model_inputs(enc, tokenizer) -> dict[str, torch.Tensor]:
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
             if n in enc and n in tokenizer.model_input_names]
    return {n: enc[n].to(torch.int32) for n in names}


def _span_mask(enc, row: int, span: tuple[int, int], example: dict,
               max_length: int) -> torch.Tensor:
    start, end = span
    offsets = enc["offset_mapping"][row]
    in_text = torch.tensor([seq == 0 for seq in enc.sequence_ids(row)])
    overlaps = (offsets[:, 0] < end) & (offsets[:, 1] > start) & (offsets[:, 1] > offsets[:, 0])
    mask = in_text & overlaps
    if not mask.any():
        raise TaskError(f"{example['where']}: span {example['text'][start:end]!r} lies beyond "
                        f"max_length {max_length} tokens; raise --max-length")
    return mask


def tokenize_examples(task: str, examples: list[dict], tokenizer, max_length: int
                      ) -> dict[str, torch.Tensor]:
    """Tensors of one split, padded to its longest row (``load_data`` trims per batch)."""
    fmt = _format(task)
    if fmt.head == "copa":
        firsts = [f"{e['premise']} {COPA_QUESTIONS[e['question']]}" for e in examples for _ in "12"]
        choices = [e[c] for e in examples for c in ("choice1", "choice2")]
        out = _model_inputs(_encode(tokenizer, firsts, choices, max_length), tokenizer)
        out = {k: v.view(len(examples), 2, -1) for k, v in out.items()}
    elif fmt.head == "wsc":
        enc = _encode(tokenizer, [e["text"] for e in examples], None, max_length,
                      return_offsets_mapping=True)
        out = _model_inputs(enc, tokenizer)
        for k in ("span1", "span2"):
            out[f"{k}_mask"] = torch.stack([_span_mask(enc, i, e[k], e, max_length)
                                            for i, e in enumerate(examples)])
    else:
        first = [e[fmt.fields[0]] for e in examples]
        second = [e[fmt.fields[1]] for e in examples] if len(fmt.fields) > 1 else None
        out = _model_inputs(_encode(tokenizer, first, second, max_length), tokenizer)
    dtype = torch.float32 if fmt.labels is None else torch.int64
    out["labels"] = torch.tensor([e["label"] for e in examples], dtype=dtype)
    return out


# --- the four names the dispatcher uses -------------------------------------------------------
def _cache_key(task: str, model_name: str, max_length: int) -> dict:
    return {"task": task, "tokenizer": canonical_model_name(model_name), "max_length": max_length}


def _cache_matches(path: Path, key: dict) -> bool:
    if not path.is_file():
        return False
    try:
        _, meta = load_token_cache(path)
    except FileFormatError:
        return False
    return all(meta.get(k) == v for k, v in key.items())


def prepare(task: str, model_name: str, out_dir: str | os.PathLike[str],
            data_dir: str | os.PathLike[str] | None = None, max_length: int = 128) -> Path:
    """Read, validate and tokenise the three splits into ``out_dir/tokens.safetensors``."""
    _format(task)
    out_dir = Path(out_dir)
    cache, key = out_dir / CACHE_FILE, _cache_key(task, model_name, max_length)
    if _cache_matches(cache, key):
        log.info("%s: token cache %s is up to date", task, cache)
        return out_dir
    source = resolve_source(data_dir)
    examples = read_splits(task, source)
    tokenizer = load_tokenizer(model_name)
    tokenizer.padding_side = "right"  # load_data trims padding off the right end
    tensors = {s: tokenize_examples(task, examples[s], tokenizer, max_length) for s in SPLITS}
    rows = {s: len(examples[s]) for s in SPLITS}
    save_token_cache(cache, tensors, {**key, "rows": rows, "source": str(source)})
    log.info("%s: %s rows from %s -> %s", task,
             ", ".join(f"{s} {n}" for s, n in rows.items()), source, cache)
    return out_dir


class _TrimCollate:
    """Gather rows by index and cut the padding columns that no row of the batch uses."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.tensor(indices)
        batch = {k: v[idx] for k, v in self.tensors.items()}
        length = int(batch["attention_mask"].sum(-1).max())
        for k, v in batch.items():
            if k == "labels":
                continue
            v = v[..., :length]
            batch[k] = v if v.dtype == torch.bool else v.long()
        return batch


def _loader(tensors: dict[str, torch.Tensor], batch_size: int,
            generator: torch.Generator | None = None) -> DataLoader:
    n = len(tensors["labels"])
    return DataLoader(range(n), batch_size=batch_size, shuffle=generator is not None,
                      generator=generator, collate_fn=_TrimCollate(tensors))


def load_data(task: str, prepared_dir: str | os.PathLike[str], batch_size: int, seed: int,
              eval_batch_size: int = 64) -> TaskData:
    """Loaders over the token cache: train shuffled by its own generator, val/test in order."""
    _format(task)
    path = Path(prepared_dir) / CACHE_FILE
    if not path.is_file():
        raise TaskError(f"{path}: no token cache; run `bayestune prepare --task {task} ...` first")
    splits, meta = load_token_cache(path)
    if meta.get("task") != task:
        raise TaskError(f"{path}: token cache of task {meta.get('task')!r}, not {task!r}; "
                        "point at the right prepared folder")
    generator = torch.Generator().manual_seed(seed)
    return TaskData(train=_loader(splits["train"], batch_size, generator),
                    val=_loader(splits["val"], eval_batch_size),
                    test=_loader(splits["test"], eval_batch_size), seed=seed)


def build_model(task: str, model_name: str, seed: int) -> TaskModel:
    """Pretrained encoder ``model_name`` with the task's head, seeded by ``seed``."""
    fmt = _format(task)
    return build_text_model(model_name, fmt.head, fmt.num_labels, seed)

"""The seven GLUE / SuperGLUE tasks of the paper: registry, sources, token cache, loaders.

Splits follow the SAM paper's protocol (the BayesTune benchmark): the official training set is
split 90/10 into ``train`` / ``val`` (model selection) and the official dev set is ``test``.

Two sources give the same three splits:

* a local folder laid out as ``TASK/{train,val,test}.jsonl`` (the glue_superglue layout), given
  as ``data_dir`` (CLI ``--data-dir``, config key ``glue_dir``) or env ``BAYESTUNE_GLUE_DIR``;
* the Hugging Face Hub through ``datasets`` when no folder is given (or ``data_dir == "hub"``):
  the official train split is cut 90/10 with :data:`HUB_SPLIT_SEED`, the dev split is ``test``.

Rows from either source are validated by the same code, so a bad line fails with its file and
line number. :func:`prepare` tokenises the splits once into a cache keyed by task, tokenizer,
max length, source, a hash of the raw data (the split files' bytes, or the Hub dataset's
fingerprint) and the model architecture (COPA's question and WSC's span rule depend on it);
:func:`load_data` serves it with padding trimmed per batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bayestune.models.base import DEFAULT_ARCHITECTURE, LEGACY_ARCHITECTURE, TaskModel
from bayestune.models.text import build_text_model, check_architecture
from bayestune.tasks import tokens
from bayestune.tasks.base import (
    SPLITS,
    VAL_CUT_SEED,
    TaskData,
    TaskError,
    TaskSpec,
    hash_files,
    split_train_val,
)
from bayestune.tasks.metrics import METRICS

log = logging.getLogger(__name__)

CACHE_FILE = tokens.CACHE_FILE
TAKES_ARCHITECTURE = True  # the text models' architecture (tasks/__init__.py passes it)
ENV_DIR = "BAYESTUNE_GLUE_DIR"
HUB = "hub"
HUB_SPLIT_SEED = VAL_CUT_SEED   # the fixed permutation seed of the hub source's 90/10 cut
# The question appended to a COPA premise, per architecture: jiant's text (jiant/tasks/lib/
# copa.py) for ``jiant``, this project's earlier one for ``first-token``.
COPA_QUESTIONS = {
    "jiant": {"cause": "What was the cause of this?", "effect": "What happened as a result?"},
    "first-token": {"cause": "What was the cause?", "effect": "What happened as a result?"},
}
COPA_KINDS = ("cause", "effect")
# Tasks whose tokens depend on the architecture: COPA's question, WSC's span rule.
ARCHITECTURE_TOKENS = ("copa", "wsc")
SOURCE_HELP = (
    "point bayestune at a local copy laid out as TASK/{train,val,test}.jsonl (like "
    "shared/data/glue_superglue): config key glue_dir, environment variable BAYESTUNE_GLUE_DIR, "
    "or --data-dir on the command line")


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

_METRICS = {"cola": "matthews", "stsb": "pearson_spearman", "mrpc": "acc_f1", "rte": "accuracy",
            "cb": "acc_macro_f1", "copa": "accuracy", "wsc": "accuracy"}

TASKS: dict[str, TaskSpec] = {
    name: TaskSpec(name=name, benchmark="glue", metric_name=metric, metric=METRICS[metric])
    for name, metric in _METRICS.items()
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


def word_span(text: str, word_index: int, span_text: str) -> tuple[int, int]:
    """jiant's rule for a WSC span: the ``len(span_text.split())`` whitespace words of ``text``
    from word ``word_index`` on, taken as given (no correction of an off-by-one index), whole
    words; returned as their character range (all of their sub-word tokens overlap it)."""
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    first = min(max(word_index, 0), len(words) - 1)
    last = min(first + max(len(span_text.split()), 1), len(words)) - 1
    return words[first][0], words[last][1]


def _wsc_spans(row: dict, where: str) -> dict[str, tuple[int, int]]:
    """Both spans' character ranges: ``spanK`` located as this project does (a shifted index or
    a possessive corrected), ``spanK_words`` by jiant's rule (:func:`word_span`)."""
    text = row["text"]
    target = _field(row, "target", dict, where, "wsc")
    spans = {}
    for k in ("1", "2"):
        span_text = _field(target, f"span{k}_text", str, f"{where} target", "wsc")
        index = _field(target, f"span{k}_index", int, f"{where} target", "wsc")
        span = locate_span(text, index, span_text)
        if span is None:
            word = text.split()[index] if 0 <= index < len(text.split()) else "<out of range>"
            raise TaskError(f"{where}: span{k}_text {span_text!r} does not match the text at "
                            f"word {index} ({word!r}); fix span{k}_index or span{k}_text")
        spans[f"span{k}"] = span
        spans[f"span{k}_words"] = word_span(text, index, span_text)
    return spans


def validate_row(task: str, row: Any, where: str) -> dict:
    """Check a raw row against its task; return its texts, label id and (WSC) span ranges."""
    if not isinstance(row, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(row).__name__}")
    fmt = _format(task)
    example = {"where": where, "label": _label_id(task, row, where)}
    for name in fmt.fields:
        if name != "target":
            example[name] = _field(row, name, str, where, task)
    if task == "copa" and example["question"] not in COPA_KINDS:
        raise TaskError(f"{where}: question {example['question']!r} is not one of "
                        f"{list(COPA_KINDS)}")
    if task == "wsc":
        example.update(_wsc_spans(row, where))
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


def split_files(task: str, data_dir: Path) -> list[Path]:
    return [data_dir / task / f"{split}.jsonl" for split in SPLITS]


def read_local(task: str, data_dir: Path) -> dict[str, list[dict]]:
    return {split: read_split_file(task, path)
            for split, path in zip(SPLITS, split_files(task, data_dir), strict=True)}


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


def _load_hub_split(dataset: str, config: str, split: str):
    import datasets

    return datasets.load_dataset(dataset, config, split=split)


def load_hub(task: str) -> dict[str, Any]:
    """The official train and validation splits of ``task`` as ``datasets`` objects."""
    dataset, config = _format(task).hub
    try:
        raw = {split: _load_hub_split(dataset, config, split) for split in ("train", "validation")}
    except Exception as err:  # offline, unknown repo, changed layout: all mean "use a folder"
        raise TaskError(f"cannot load {task} from the Hugging Face Hub ({dataset}, {config}): "
                        f"{err}. Offline, {SOURCE_HELP}.") from err
    if not all(len(rows) for rows in raw.values()):
        raise TaskError(f"hub {dataset}/{config}: empty split on the Hub; {SOURCE_HELP}")
    return raw


def hub_fingerprint(raw: dict[str, Any]) -> str:
    """The ``datasets`` fingerprints of the loaded splits: they change with the Hub's files."""
    def one(rows) -> str:
        found = getattr(rows, "_fingerprint", None)
        return found or hashlib.sha256(repr(list(rows)).encode()).hexdigest()

    return "/".join(f"{split}:{one(rows)}" for split, rows in raw.items())


def read_hub(task: str, raw: dict[str, Any] | None = None) -> dict[str, list[dict]]:
    """Official train cut 90/10 into train/val (seed :data:`HUB_SPLIT_SEED`), dev as test."""
    raw = load_hub(task) if raw is None else raw
    dataset, config = _format(task).hub
    where = f"hub {dataset}/{config}"

    def clean(rows, split: str) -> list[dict]:
        return [validate_row(task, _hub_to_local(task, r), f"{where} {split} row {i}")
                for i, r in enumerate(rows)]

    train, val = split_train_val(clean(raw["train"], "train"), HUB_SPLIT_SEED)
    return {"train": train, "val": val, "test": clean(raw["validation"], "validation")}


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


def tokenize_examples(task: str, examples: list[dict], tokenizer, max_length: int,
                      architecture: str = DEFAULT_ARCHITECTURE) -> dict[str, torch.Tensor]:
    """Tensors of one split, padded to its longest row (``load_data`` trims per batch).

    COPA: each choice as the pair (premise + " " + question, choice), jiant's input, with the
    architecture's question. WSC: the text alone, each span a mask over its tokens: for
    ``jiant`` every sub-word token of the span's words at the given word index (jiant's
    projection), for ``first-token`` the tokens of the located span text.
    """
    fmt = _format(task)
    if fmt.head == "copa":
        questions = COPA_QUESTIONS[architecture]
        firsts = [f"{e['premise']} {questions[e['question']]}" for e in examples for _ in "12"]
        choices = [e[c] for e in examples for c in ("choice1", "choice2")]
        out = tokens.model_inputs(tokens.encode(tokenizer, firsts, choices, max_length), tokenizer)
        out = {k: v.view(len(examples), 2, -1) for k, v in out.items()}
    elif fmt.head == "wsc":
        enc = tokens.encode(tokenizer, [e["text"] for e in examples], None, max_length,
                      return_offsets_mapping=True)
        out = tokens.model_inputs(enc, tokenizer)
        rule = "_words" if architecture == "jiant" else ""
        for k in ("span1", "span2"):
            out[f"{k}_mask"] = torch.stack([_span_mask(enc, i, e[k + rule], e, max_length)
                                            for i, e in enumerate(examples)])
    else:
        first = [e[fmt.fields[0]] for e in examples]
        second = [e[fmt.fields[1]] for e in examples] if len(fmt.fields) > 1 else None
        out = tokens.model_inputs(tokens.encode(tokenizer, first, second, max_length), tokenizer)
    dtype = torch.float32 if fmt.labels is None else torch.int64
    out["labels"] = torch.tensor([e["label"] for e in examples], dtype=dtype)
    return out


def token_ids(task: str, model_name: str, data_dir: str | os.PathLike[str] | None = None,
              architecture: str = DEFAULT_ARCHITECTURE) -> set[int]:
    """Every token id of ``model_name``'s tokenizer that ``task``'s three splits use, without
    truncation (a cut at another length would split the pair differently)."""
    tokenizer = tokens.tokenizer_for(model_name)
    used: set[int] = set()
    for examples in read_splits(task, data_dir).values():
        batch = tokenize_examples(task, examples, tokenizer, tokenizer.model_max_length,
                                  architecture)
        used.update(batch["input_ids"].unique().tolist())
    return used


# --- the four names the dispatcher uses -------------------------------------------------------
def prepare(task: str, model_name: str, out_dir: str | os.PathLike[str],
            data_dir: str | os.PathLike[str] | None = None, max_length: int = 128,
            architecture: str = DEFAULT_ARCHITECTURE) -> Path:
    """Read, validate and tokenise the three splits into ``out_dir/tokens.safetensors``.

    The cache is reused only when task, tokenizer, max length, source, the raw data's hash and
    the architecture (COPA's question and WSC's spans depend on it) all match; an edited split
    file, another source or a cache of an older version (no architecture) is tokenised again.
    """
    check_architecture(architecture)
    _format(task)
    source = resolve_source(data_dir)
    if source == HUB:
        raw = load_hub(task)
        source_name, data_hash = "hub:" + "/".join(FORMATS[task].hub), hub_fingerprint(raw)
    else:
        paths = split_files(task, Path(source))
        missing = [p for p in paths if not p.is_file()]
        if missing:
            read_split_file(task, missing[0])  # raises the missing-file error
        source_name, data_hash = str(Path(source).resolve()), hash_files(paths)
    key = tokens.cache_key(task, model_name, max_length, source_name, data_hash,
                           architecture=architecture)
    if tokens.cache_is_current(out_dir, key):
        log.info("%s: token cache in %s is up to date", task, out_dir)
        return Path(out_dir)
    examples = read_hub(task, raw) if source == HUB else read_local(task, Path(source))
    tokenizer = tokens.tokenizer_for(model_name)
    tensors = {s: tokenize_examples(task, examples[s], tokenizer, max_length, architecture)
               for s in SPLITS}
    return tokens.write_cache(out_dir, tensors, key, {s: len(examples[s]) for s in SPLITS})


def load_data(task: str, prepared_dir: str | os.PathLike[str], batch_size: int, seed: int,
              eval_batch_size: int = 64, architecture: str | None = None) -> TaskData:
    """Loaders over the token cache: train shuffled by its own generator, val/test in order.

    With ``architecture``, a COPA or WSC cache tokenised for the other one is refused (a cache
    that records none is ``first-token``'s: it was written before the choice existed).
    """
    _format(task)
    splits, meta = tokens.read_cache(task, prepared_dir)
    made_for = meta.get("architecture", LEGACY_ARCHITECTURE)
    if architecture is not None and task in ARCHITECTURE_TOKENS and made_for != architecture:
        raise TaskError(f"{prepared_dir}: {task} was tokenised for architecture {made_for!r} "
                        f"(its {'question' if task == 'copa' else 'span rule'} differs), not "
                        f"{architecture!r}; run `bayestune prepare --task {task} "
                        f"--architecture {architecture}` again")
    return tokens.text_loaders(splits, batch_size, seed, eval_batch_size)


def build_model(task: str, model_name: str, seed: int,
                architecture: str = DEFAULT_ARCHITECTURE) -> TaskModel:
    """Pretrained encoder ``model_name`` with the task's head, seeded by ``seed``."""
    fmt = _format(task)
    return build_text_model(model_name, fmt.head, fmt.num_labels, seed, architecture)

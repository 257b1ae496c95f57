"""How many bytes each file of a run will take, from the file formats and the model's parameter
shapes alone (no weights, no download): what ``bayestune plan`` adds up.

Mask and delta sizes come from the same per-tensor rules that ``files.save_mask`` and
``files.save_delta`` apply, with the budget spread evenly over the tensors (a concentrated
mask, as BayesTune's, packs into fewer bytes) and every selected scalar changed by fine-tuning.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from bayestune import files
from bayestune.errors import ConfigError
from bayestune.models.base import DEFAULT_ARCHITECTURE, is_head

Shapes = dict[str, tuple[int, ...]]
Counts = dict[str, int]

FLOAT_BYTES = 4              # scale files and deltas hold fp32 values
# The sampler's checkpoint, in model-sized fp32 buffers once samples are recorded: theta, its
# two AdamW moments, lambda, its two Adam moments and the running mean (theta0 is rebuilt from
# the model source). checkpoint_precision bf16 halves all but the non-sampled weights: 3.5.
# The running mean of lambda sits in a scratch file of one more while stage 1 runs (two with
# the sampler's `variance`).
CHECKPOINT_MODELS = 7
CHECKPOINT_MODELS_BF16 = 3.5
RUNNING_STATS_MODELS = 1
SMALL_FILE_BYTES = 100_000   # a table or figure: at most this
METRICS_BYTES = 5_000        # one run's metrics.json with its validation curve
TEXT_HEAD = ("classification", 2)
VISION_CLASSES = 100         # heads differ per task by a few thousand scalars at most
PREPARED_FIELDS = 3          # token ids, attention mask and token types (int32) per position


def checkpoint_models(sampler: Mapping) -> float:
    """Model sizes of the largest sampler checkpoint, for a config's sampler section."""
    bf16 = sampler.get("checkpoint_precision") == "bf16"
    models = CHECKPOINT_MODELS_BF16 if bf16 else CHECKPOINT_MODELS
    return models + (0.5 if bf16 else 1) * bool(sampler.get("variance"))


def running_stats_models(sampler: Mapping) -> int:
    """Model sizes of the running statistics' scratch file (M2 only with `variance`)."""
    return RUNNING_STATS_MODELS + bool(sampler.get("variance"))


def model_shapes(model_name: str, benchmark: str, known: Mapping[str, Mapping],
                 architecture: str = DEFAULT_ARCHITECTURE) -> tuple[Shapes, str]:
    """Parameter shapes of ``model_name`` with a task head, and where they came from
    (``architecture``: a text model's, which decides whether the pooler is counted).

    Built on the meta device from the model's config (found locally, or rebuilt from
    ``known[...]["config"]``), or from timm's architecture for a vision model; failing both,
    one tensor of ``known[...]["scalars"]``.
    """
    entry = known_model(model_name, known)
    try:
        with torch.device("meta"):
            model = _meta_model(model_name, benchmark, entry, architecture)
    except (OSError, ValueError, RuntimeError) as err:
        if entry is None or "scalars" not in entry:
            raise ConfigError(f"cannot tell how many scalars {model_name!r} has ({err}); add it "
                              "with its scalar count to config/costs.yaml") from err
        return {"(all scalars)": (int(entry["scalars"]),)}, "scalar count from the cost table"
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    return shapes, "shapes built on the meta device, no weights loaded"


def with_vocabulary(shapes: Shapes, rows: int) -> Shapes:
    """``shapes`` with the word embeddings cut to ``rows`` tokens (the vocabulary cut)."""
    names = [name for name in shapes if name.endswith("word_embeddings.weight")]
    if len(names) != 1:
        raise ConfigError(f"cannot find the one word-embedding matrix among {len(shapes)} "
                          "parameters to size the vocabulary cut")
    return {**shapes, names[0]: (rows, *shapes[names[0]][1:])}


def vocabulary_cut_shapes(root: Path, config: Mapping, shapes: Shapes,
                          note: str) -> tuple[Shapes, str]:
    """``shapes`` after the workflow's vocabulary cut (config ``model_vocabulary: tasks``): the
    cut model's once it is written (<prepared_dir>/model), else the tokens of the tasks' data
    counted; the full vocabulary, said so in the note, where neither can be read."""
    from bayestune.data_source import HUB, data_dir
    from bayestune.errors import DataError
    from bayestune.models.derive import kept_token_count
    from bayestune.models.text import resolve_model_path
    from bayestune.tasks import used_token_ids

    cut = Path(root, config["prepared_dir"], "model/config.json")
    if cut.is_file():
        rows = int(json.loads(cut.read_text())["vocab_size"])
        return with_vocabulary(shapes, rows), f"{note}; vocabulary cut: {rows} tokens ({cut})"
    folder = data_dir(config, base=root)
    try:
        used = used_token_ids(config["tasks"], config["model"],
                              Path(folder) if folder and folder != HUB else None,
                              architecture=config.get("architecture") or DEFAULT_ARCHITECTURE)
        rows = kept_token_count(resolve_model_path(config["model"]), used)
    except (DataError, OSError) as err:
        return shapes, (f"{note}; the vocabulary cut not counted ({err}): sizes for the full "
                        "vocabulary, an upper bound")
    return with_vocabulary(shapes, rows), f"{note}; vocabulary cut: {rows} tokens (counted)"


def known_model(model_name: str, known: Mapping[str, Mapping]) -> Mapping | None:
    for entry in known.values():
        if model_name in entry.get("names", []):
            return entry
    return None


def _meta_model(model_name: str, benchmark: str, entry: Mapping | None,
                architecture: str) -> torch.nn.Module:
    if benchmark == "vtab":
        from bayestune.models.vision import build_vision_model

        joiner = "&" if "?" in model_name else "?"
        return build_vision_model(f"{model_name}{joiner}pretrained=false", VISION_CLASSES, 0)
    from transformers import AutoConfig

    from bayestune.models.text import build_text_model_from_config, resolve_model_path

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(model_name), local_files_only=True)
    except OSError:
        if entry is None or "config" not in entry:
            raise
        config = AutoConfig.for_model(**entry["config"])
    return build_text_model_from_config(config, *TEXT_HEAD, seed=0, architecture=architecture)


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _header_bytes(keys: list[str], extra_json: int = 0) -> int:
    # safetensors' JSON header: one entry of dtype, shape and offsets per key, plus our metadata
    return 8 + sum(len(key) + 70 for key in keys) + 600 + extra_json


def scale_file_bytes(shapes: Shapes) -> int:
    return sum(numel(s) for s in shapes.values()) * FLOAT_BYTES + _header_bytes(list(shapes))


def model_bytes(shapes: Shapes) -> int:
    return sum(numel(s) for s in shapes.values()) * FLOAT_BYTES


def selected_counts(shapes: Shapes, method: str, budget: float, keep_head: bool = False) -> Counts:
    """Scalars a method's mask selects per tensor: every bias and the head for bitfit, the
    budget's share of every tensor otherwise (the whole head with ``keep_head``)."""
    counts = {}
    for name, shape in shapes.items():
        if method == "bitfit":
            whole, share = name.endswith(".bias") or is_head(name), 0.0
        else:
            whole, share = keep_head and is_head(name), budget
        counts[name] = numel(shape) if whole else round(share * numel(shape))
    return counts


def mask_file_bytes(shapes: Shapes, selected: Counts) -> int:
    payload = sum(files.mask_entry_bytes(numel(s), selected[n]) for n, s in shapes.items())
    shapes_json = sum(len(n) + 20 for n in shapes)
    return payload + _header_bytes(list(shapes), shapes_json)


def delta_file_bytes(shapes: Shapes, changed: Counts) -> int:
    payload, keys = 0, []
    for name, shape in shapes.items():
        if changed.get(name):
            payload += files.delta_entry_bytes(numel(shape), changed[name], FLOAT_BYTES)
            keys.append(f"{name}::values")
            if not files.delta_is_dense(numel(shape), changed[name], FLOAT_BYTES):
                keys.append(f"{name}::indices")
    return payload + _header_bytes(keys)


def full_changes(shapes: Shapes) -> Counts:
    return {name: numel(shape) for name, shape in shapes.items()}


def lora_changes(shapes: Shapes, target_modules: str, train_head: bool = True) -> Counts:
    """Merged LoRA changes its target layers' weights (module names or name suffixes, as peft
    matches them) and, when it trains, the head: every scalar of them."""
    targets = {t.strip() for t in target_modules.split(",") if t.strip()}

    def changes(name: str, shape: tuple[int, ...]) -> bool:
        if is_head(name):
            return train_head
        module, _, kind = name.rpartition(".")
        if kind != "weight" or len(shape) != 2:
            return False
        if "all-linear" in targets:
            return "embeddings" not in module
        return any(module == t or module.endswith("." + t) for t in targets)

    return {n: numel(s) for n, s in shapes.items() if changes(n, s)}


def prepared_bytes(data_dir: str | None, task: str, max_length: int) -> int | None:
    """Tokenised splits of a text task, from the local data's row counts (None: unknown)."""
    if data_dir is None or not (Path(data_dir) / task).is_dir():
        return None
    rows = 0
    for split in ("train", "val", "test"):
        path = Path(data_dir) / task / f"{split}.jsonl"
        if path.is_file():
            with open(path, "rb") as handle:
                rows += sum(1 for _ in handle)
    return rows * PREPARED_FIELDS * max_length * 4

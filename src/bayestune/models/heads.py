"""The task heads of the text models, for both architectures (``models.text``).

``jiant`` (the paper's: jiant 2.2's ``heads.py``, which BayesTune and the SAM repository ran):

* classification / regression: :class:`ClassificationHead` on the pooled output (jiant's
  ``ClassificationHead`` / ``RegressionHead``: dropout, dense, tanh, dropout, out_proj);
* ``copa``: the regression head (out_proj to one score) on each choice's pooled output, the two
  scores being the logits (jiant's multiple-choice model);
* ``wsc``: :class:`SpanAttentionHead`, jiant's ``SpanComparisonHead``: a self-attentive span
  extractor over the last hidden states for each of the two spans, ``[s1, s2]`` through dropout
  into a linear classifier.

``first-token`` (this project's earlier heads, kept as a named option): the same classification
head on the first token's state, :class:`ChoiceScorer` for COPA and :class:`SpanPoolingHead`
(mean-pooled spans, ``[s1, s2, s1 * s2]``) for WSC.

Every head is plain ``nn.Linear`` with PyTorch's default initialisation, as jiant never
re-initialises its heads; the caller seeds the RNG. Parameter names follow jiant's modules, so
a head's names and shapes read the same as in jiant's task model (under ``head.``).
"""

from __future__ import annotations

import torch
from torch import nn


class ClassificationHead(nn.Module):
    """dropout -> dense -> tanh -> dropout -> out_proj on one vector per example.

    jiant's ``ClassificationHead`` (``num_outputs`` labels) and ``RegressionHead`` (one output)
    are this module on the pooled output; RoBERTa's own head is the same on the first token.
    """

    def __init__(self, hidden: int, num_outputs: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden, num_outputs)

    def forward(self, vector: torch.Tensor) -> torch.Tensor:
        x = self.dropout(vector)
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)


class ChoiceScorer(nn.Module):
    """first-token COPA: one linear score per (premise + question, choice) pair."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        # No bias: it adds the same to both choices, so the loss never moves it.
        self.scorer = nn.Linear(hidden, 1, bias=False)

    def forward(self, vector: torch.Tensor) -> torch.Tensor:
        return self.scorer(self.dropout(vector)).squeeze(-1)


class SpanPoolingHead(nn.Module):
    """first-token WSC: mean-pool the two spans, classify ``[s1, s2, s1 * s2]``."""

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


class TimeDistributed(nn.Module):
    """A holder with jiant's (AllenNLP's) name for the attention layer, ``_module``: the
    parameter is then ``..._global_attention._module.weight`` as in jiant. ``nn.Linear``
    already maps every position, so no reshaping is needed."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self._module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._module(x)


class SelfAttentiveSpanExtractor(nn.Module):
    """jiant's vendored AllenNLP extractor: one attention logit per token from a Linear(h, 1)
    over the whole sequence, softmax-normalised within each span, weighted sum of the states.

    Spans come as boolean masks over the positions (True inside the span) rather than jiant's
    inclusive (start, end) pairs: for a contiguous span the two select the same tokens, and a
    mask is what the token cache stores. AllenNLP divides by the masked sum plus 1e-13; an exact
    masked softmax differs from it by that 1e-13 only.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self._global_attention = TimeDistributed(nn.Linear(hidden, 1))

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = self._global_attention(states).squeeze(-1)            # (B, L)
        logits = logits.masked_fill(~mask.bool(), torch.finfo(logits.dtype).min)
        weights = torch.softmax(logits.float(), dim=-1).to(states.dtype)
        weights = weights * mask.to(states.dtype)  # an empty span (cannot occur) gives zeros
        return torch.einsum("bl,blh->bh", weights, states)


class SpanAttentionHead(nn.Module):
    """jiant's ``SpanComparisonHead`` for two spans: extract each, concatenate ``[s1, s2]``,
    dropout once, then a linear classifier (no dense layer, no tanh)."""

    def __init__(self, hidden: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.span_attention_extractor = SelfAttentiveSpanExtractor(hidden)
        self.classifier = nn.Linear(2 * hidden, num_labels)

    def forward(self, states: torch.Tensor, span1: torch.Tensor,
                span2: torch.Tensor) -> torch.Tensor:
        s1 = self.span_attention_extractor(states, span1)
        s2 = self.span_attention_extractor(states, span2)
        return self.classifier(self.dropout(torch.cat([s1, s2], dim=-1)))


def make_head(architecture: str, kind: str, hidden: int, num_labels: int,
              dropout: float) -> nn.Module:
    """The head of ``kind`` for ``architecture``; the caller has seeded the RNG."""
    jiant = architecture == "jiant"
    if kind == "classification":
        return ClassificationHead(hidden, num_labels, dropout)
    if kind == "regression":
        return ClassificationHead(hidden, 1, dropout)
    if kind == "copa":  # jiant scores each choice with its RegressionHead
        return ClassificationHead(hidden, 1, dropout) if jiant else ChoiceScorer(hidden, dropout)
    return SpanAttentionHead(hidden, num_labels, dropout) if jiant else \
        SpanPoolingHead(hidden, num_labels, dropout)

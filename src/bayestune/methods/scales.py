"""bayestune: the top-k of the posterior-mean scales lambda of a stage-1 scale file.

By default the ranking is global and the head competes like any scalar; config keys (e.g.
``keep_head``) change that and the mask files record what was used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from bayestune.masks import masks_from_scores
from bayestune.methods.common import check_scores_fit
from bayestune.methods.config import Batches, LossFn, Masks, MethodConfig, ranking_options
from bayestune.methods.registry import MethodError


def bayestune_masks(model: nn.Module, batches: Batches | None, loss_fn: LossFn,
                    budgets: Sequence[float], seed: int, config: MethodConfig, *,
                    scores: Mapping[str, Tensor] | None = None) -> Masks:
    if scores is None:
        raise MethodError("method 'bayestune' ranks the posterior-mean scales of stage 1; pass "
                          "them as scores (--scores results/.../scales/.../seed<S>.safetensors)")
    check_scores_fit("bayestune", model, scores)
    return Masks(masks_from_scores(scores, budgets, **ranking_options("bayestune", config)))

"""What stage 1 returns: the posterior mean (and variance) of the scales, and the scale file
that records it with every resolved setting."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from bayestune import files
from bayestune.sampler.config import SamplerConfig, preset_overrides


@dataclass
class ScaleResult:
    mean: dict[str, Tensor]   # posterior mean of max(lambda, floor), per parameter tensor
    var: dict[str, Tensor] | None  # unbiased sample variance (zeros with a single sample);
    #                                 None unless the config asked for the variance
    n_samples: int
    steps: int
    steps_per_epoch: int | None = None   # the schedule's, when one was given
    best_val: float | None = None        # the length rule's best validation score

    def metadata(self, config: SamplerConfig, *, seed: int, model_id: str) -> dict[str, Any]:
        """What the scale file records besides the tensors (bayestune.files adds the version): the
        preset, every resolved setting and which of them override the preset."""
        extra = {k: v for k, v in (("steps_per_epoch", self.steps_per_epoch),
                                   ("best_val", self.best_val)) if v is not None}
        return {**dataclasses.asdict(config), "overrides": preset_overrides(config),
                "model_id": model_id, "seed": seed, "n_samples": self.n_samples,
                "steps_limit": config.steps, "steps": self.steps, **extra}


def write_scale_file(path: str | Path, result: ScaleResult, config: SamplerConfig, *,
                     seed: int, model_id: str, provenance: dict | None = None,
                     accepted_problems: Sequence[str] = (),
                     extra: Mapping[str, Any] | None = None) -> None:
    """``accepted_problems``: what the scale checks found and the user accepted
    (--allow-degenerate-scales); readers of the file accept those, and refuse any other.
    ``extra`` adds what else identifies the model (its architecture)."""
    meta = {**result.metadata(config, seed=seed, model_id=model_id), **(extra or {})}
    if accepted_problems:
        meta["accepted_problems"] = list(accepted_problems)
    files.save_scales(path, result.mean, meta, provenance)

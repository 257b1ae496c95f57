"""Stage 1 of BayesTune: SGLD on (theta, lambda), posterior mean of the scales lambda.

Phases, in optimiser steps s = 0, 1, ... (docs/ALGORITHM.md):

* ``s < warmup_steps``: plain fine-tuning of theta; no prior, no noise, lambda fixed.
* ``s >= warmup_steps``: SGLD on (theta, lambda). The noisy gradient of
  U = L + U_prior is ``grad + sqrt(2 / (N eta)) * xi``; ``variant="adamw"`` hands it to AdamW
  (theta) and Adam (lambda), ``"hf-adamw"`` to the authors' transformers AdamW instead,
  ``"sgld"`` takes a plain step ``x <- x - eta * grad``.
* ``s >= burnin_steps`` and ``(s - burnin_steps) % thinning == 0``: after the update,
  max(lambda, floor) enters a running mean (and M2 with ``variance``; Welford, each sample
  once; off the GPU they live in a scratch file, see :class:`RunningStats`).
  ``sample_rule="authors"`` counts as the authors' code does instead (see
  :class:`SamplerConfig`).

Named presets (:data:`PRESETS`, :func:`sampler_config`) bundle the settings: ``exact`` (the
maths above with constant rates), ``cold`` (no noise, for short chains) and ``reference`` (the
authors' code step for step, with its schedule and its early-stopping length rule).

Two implementations of a step. The fused one (``exact``, ``cold``) works on whole lists of
tensors (``torch._foreach_*``, fused optimisers): theta0 and lambda are flat buffers cut into
pieces (``prior.FlatLayout``), the parameters and their gradients are cut the same way, and the
noise comes from one generator; no step loops over parameters in Python. The per-tensor one
(anything the fused step does not offer: the authors' optimiser, schedule or bookkeeping) goes
parameter by parameter as the authors' code does, and draws its noise through a replaceable
function, so that a test can feed the same draws to a transcription of their equations. The
sampler knows nothing of tasks: it sees a model, a batch stream, a loss function and, for the
length rule, a validation callback.

The package, one module per concern: ``config`` (presets and :class:`SamplerConfig`), ``chain``
(:class:`Sampler`, the state and its step), ``checkpoint`` (saving and resuming that state),
``result`` (the posterior mean and the scale file) and ``run`` (:func:`sample_scales`, the
loop). Every name is re-exported here.
"""

from bayestune.sampler.chain import (
    CPU_BLOCK,
    CPU_PIECE,
    GPU_BLOCK,
    LOG_QUANTILE_ENTRIES,
    ChainMonitor,
    NoiseFn,
    Sampler,
)
from bayestune.sampler.checkpoint import CHECKPOINT_VERSION
from bayestune.sampler.config import (
    CHECKPOINT_PRECISIONS,
    NO_GRAD_RULES,
    PRESETS,
    SAMPLE_RULES,
    SCHEDULES,
    VARIANTS,
    SamplerConfig,
    SamplerConfigError,
    SamplingDivergedError,
    preset_overrides,
    sampler_config,
    sampler_config_from_section,
)
from bayestune.sampler.result import ScaleResult, write_scale_file
from bayestune.sampler.run import sample_scales

__all__ = [
    "CHECKPOINT_PRECISIONS", "CHECKPOINT_VERSION", "CPU_BLOCK", "CPU_PIECE", "GPU_BLOCK",
    "LOG_QUANTILE_ENTRIES", "NO_GRAD_RULES", "PRESETS", "SAMPLE_RULES", "SCHEDULES", "VARIANTS",
    "ChainMonitor", "NoiseFn", "Sampler", "SamplerConfig", "SamplerConfigError",
    "SamplingDivergedError", "ScaleResult", "preset_overrides", "sample_scales",
    "sampler_config", "sampler_config_from_section", "write_scale_file",
]

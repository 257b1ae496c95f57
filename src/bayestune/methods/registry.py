"""Every method's name in one place: what kind it is, what it reads, its head default, and the
published row that has the same definition and was trained with the same stage-2 settings.

The workflow rules (which jobs exist, which need data or a GPU), the tables (row order, which
rows have no budget, which published row stands beside which method) and the config check all
read this table; nothing else lists method names. It imports nothing heavy, so Snakemake can
read it cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from bayestune.errors import ConfigError

BUDGETED = "budgeted"  # one mask per budget, cut from one ranking (nested)
FIXED = "fixed"  # one mask fixed by the architecture, whatever the budget
UNMASKED = "unmasked"  # no mask file: every scalar, or an adapter


class MethodError(ConfigError):
    """An unknown method name, or settings a method cannot take."""


@dataclass(frozen=True)
class Ranking:
    """How a method's scores become masks (the options of ``masks.masks_from_scores``)."""

    per_tensor: bool  # the top p of each tensor instead of the top p of all scalars
    keep_head: bool  # the task head always trains (it is not ranked)
    head_counts_toward_budget: bool  # a kept head spends part of the budget (global ranking)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: str
    definition: str  # what the method is, and whose definition it follows
    needs_data: bool = False  # reads training batches (a gradient or training phase: a GPU)
    needs_scores: bool = False  # reads a stage-1 scale file
    writes_start: bool = False  # stage 2 goes on from weights the mask stage trained
    ranking: Ranking | None = None  # the default; config keys override it
    published: str | None = None  # label of the published row with this definition
    # Settings a run must have had for its numbers to stand beside that published row: the
    # definition (ranking options, the method's own settings, the model architecture) ...
    published_when: Mapping[str, object] = field(default_factory=dict)
    # ... and stage 2 (FinetuneConfig fields and the batch size), as the source trained it.
    published_stage2: Mapping[str, object] = field(default_factory=dict)


# The SAM repo trains the head in every mode and ranks encoder tensors one by one (the pooler
# is an encoder tensor there: masked like the rest).
_SAM_REPO = Ranking(per_tensor=True, keep_head=True, head_counts_toward_budget=False)
# BayesTune ranks every scalar of the task model, head and pooler included (the authors'
# sampler holds a lambda for each of jiant_model.named_parameters(), and stage 2 masks them all).
_GLOBAL = Ranking(per_tensor=False, keep_head=False, head_counts_toward_budget=True)
# composable-sft: the head is not maskable and trains fully; k is p times the maskable count.
_LT_SFT = Ranking(per_tensor=False, keep_head=True, head_counts_toward_budget=False)

# The published rows (the SAM paper's Table 2) were run with jiant's model and heads.
_JIANT = {"architecture": "jiant"}
# The SAM repository's one script, scripts/train.sh: stage 2 of every published row is taken
# to be trained as it trains (no other command is published): --learning_rate 1e-4,
# --train_batch_size 16, --num_train_epochs 10000 (jiant's ramp over 10% of it),
# --min_train_steps 20000, --eval_every_steps 500, --no_improvements_for_n_evals 40, jiant's
# selection on the first 500 validation examples; our `reference` schedule is that loop.
SAM_REPO_STAGE2: Mapping[str, object] = MappingProxyType({
    "schedule": "reference", "lr": 1e-4, "batch_size": 16, "epochs": 10000,
    "warmup_ratio": 0.1, "max_steps": 0, "min_steps": 20000, "eval_every": 500,
    "patience": 40, "val_subset": 500})

_SPECS = (  # in table order
    MethodSpec("full", UNMASKED, "every scalar trains",
               ranking=Ranking(False, True, True), published="full fine-tuning",
               published_when=_JIANT, published_stage2=SAM_REPO_STAGE2),
    MethodSpec("lora", UNMASKED, "low-rank adapters through peft (settings: lora.preset)",
               published="LoRA", published_when={"lora_preset": "sam", **_JIANT},
               published_stage2=SAM_REPO_STAGE2),
    MethodSpec("bitfit", FIXED, "every bias and the head (BitFit)",
               ranking=Ranking(False, True, True), published="BitFit",
               published_when=_JIANT, published_stage2=SAM_REPO_STAGE2),
    MethodSpec("random", BUDGETED, "each encoder scalar kept with probability p; head trains "
               "(the SAM repo's randmask)",
               ranking=Ranking(False, True, False), published="random mask",
               published_when={"keep_head": True, "head_counts_toward_budget": False, **_JIANT},
               published_stage2=SAM_REPO_STAGE2),
    MethodSpec("magnitude", BUDGETED, "top p of |theta| per encoder tensor after full "
               "fine-tuning, which goes on from there; head trains (the SAM repo's magprun)",
               needs_data=True, writes_start=True, ranking=_SAM_REPO,
               published="magnitude pruning",
               # magprun's code default (no script gives it), at train.sh's rate and ramp
               published_when={"per_tensor": True, "keep_head": True, "magnitude_steps": 500,
                               "magnitude_lr": 1e-4, "magnitude_warmup_epochs": 1000.0,
                               "grad_clip": 1.0, **_JIANT},
               published_stage2=SAM_REPO_STAGE2),
    MethodSpec("lt-sft", BUDGETED, "global top-k of |theta - theta0| over the encoder after "
               "full fine-tuning, then a restart from theta0; head not maskable, trains fully, "
               "k = p x the encoder's scalars (LT-SFT, composable-sft)",
               needs_data=True, ranking=_LT_SFT),
    MethodSpec("fisher", BUDGETED, "global top-k of summed squared per-example gradients at "
               "theta0; the head trains inside the budget (FISH mask)",
               needs_data=True, ranking=Ranking(False, True, True)),
    MethodSpec("sam", BUDGETED, "top p of |sum of clipped batch gradients| per encoder tensor "
               "at theta0; head trains (the SAM repo's bsearch)",
               needs_data=True, ranking=_SAM_REPO, published="SAM",
               # scripts/train.sh: --user_mode bsearch=0.005,burnin=600 (the code default is 500)
               published_when={"per_tensor": True, "keep_head": True, "sam_steps": 600,
                               "grad_clip": 1.0, **_JIANT},
               published_stage2=SAM_REPO_STAGE2),
    MethodSpec("bayestune", BUDGETED, "top-k of the posterior-mean scales of stage 1",
               needs_scores=True, ranking=_GLOBAL),
)
REGISTRY: Mapping[str, MethodSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})


def method_names(kind: str | None = None) -> list[str]:
    """Every method name in table order, or those of one kind (``BUDGETED``, ...)."""
    return [name for name, spec in REGISTRY.items() if kind is None or spec.kind == kind]


def get_spec(name: str) -> MethodSpec:
    if name not in REGISTRY:
        raise MethodError(f"unknown method {name!r}; known methods: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def _same(value: object, wanted: object) -> bool:
    if isinstance(wanted, float) and isinstance(value, int | float) \
            and not isinstance(value, bool):
        return math.isclose(float(value), wanted, rel_tol=1e-9)
    return value == wanted


def published_differences(name: str, settings: Mapping[str, object],
                          stage2: Mapping[str, object] | None = None) -> list[str]:
    """Why a run of ``name`` may not stand beside its published row, one phrase per setting
    that differs from the source's (empty when it may, or when the method has no such row).

    ``settings`` are what the run recorded about its definition (ranking options, the method's
    settings, ``lora_preset``, ``architecture``); ``stage2`` its stage-2 settings (FinetuneConfig
    fields and ``batch_size``), None where they are not known yet (the mask stage).
    """
    spec = get_spec(name)
    if spec.published is None:
        return []
    found = [f"{key} {settings.get(key)!r}, published {value!r}"
             for key, value in spec.published_when.items()
             if not _same(settings.get(key), value)]
    if stage2 is not None:
        found += [f"stage-2 {key} {stage2.get(key)!r}, published {value!r}"
                  for key, value in spec.published_stage2.items()
                  if not _same(stage2.get(key), value)]
    return found


def published_label(name: str, settings: Mapping[str, object],
                    stage2: Mapping[str, object] | None = None) -> str | None:
    """The published row a run of ``name`` with these settings may stand beside, if any.

    A run whose definition or (when given) stage-2 settings differ from the source's gets no
    published row: :func:`published_differences` says why.
    """
    spec = get_spec(name)
    if spec.published is None or published_differences(name, settings, stage2):
        return None
    return spec.published

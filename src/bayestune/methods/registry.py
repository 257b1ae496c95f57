"""Every method's name in one place: what kind it is, what it reads, its head default, and the
published row that has the same definition.

The workflow rules (which jobs exist, which need data or a GPU), the tables (row order, which
rows have no budget, which published row stands beside which method) and the config check all
read this table; nothing else lists method names. It imports nothing heavy, so Snakemake can
read it cheaply.
"""

from __future__ import annotations

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
    # Settings a run must have had for its numbers to stand beside that published row.
    published_when: Mapping[str, object] = field(default_factory=dict)


# The SAM repo trains the head in every mode and ranks encoder tensors one by one.
_SAM_REPO = Ranking(per_tensor=True, keep_head=True, head_counts_toward_budget=False)
_GLOBAL = Ranking(per_tensor=False, keep_head=False, head_counts_toward_budget=True)

_SPECS = (  # in table order
    MethodSpec("full", UNMASKED, "every scalar trains",
               ranking=Ranking(False, True, True), published="full fine-tuning"),
    MethodSpec("lora", UNMASKED, "low-rank adapters through peft (settings: lora.preset)",
               published="LoRA", published_when={"lora_preset": "sam"}),
    MethodSpec("bitfit", FIXED, "every bias and the head (BitFit)",
               ranking=Ranking(False, True, True), published="BitFit"),
    MethodSpec("random", BUDGETED, "each encoder scalar kept with probability p; head trains "
               "(the SAM repo's randmask)",
               ranking=Ranking(False, True, False), published="random mask",
               published_when={"keep_head": True, "head_counts_toward_budget": False}),
    MethodSpec("magnitude", BUDGETED, "top p of |theta| per encoder tensor after full "
               "fine-tuning, which goes on from there; head trains (the SAM repo's magprun)",
               needs_data=True, writes_start=True, ranking=_SAM_REPO,
               published="magnitude pruning",
               published_when={"per_tensor": True, "keep_head": True}),
    MethodSpec("lt-sft", BUDGETED, "global top-k of |theta - theta0| after full fine-tuning, "
               "then a restart from theta0 (LT-SFT, composable-sft)",
               needs_data=True, ranking=_GLOBAL),
    MethodSpec("fisher", BUDGETED, "global top-k of summed squared per-example gradients at "
               "theta0; the head trains inside the budget (FISH mask)",
               needs_data=True, ranking=Ranking(False, True, True)),
    MethodSpec("sam", BUDGETED, "top p of |sum of clipped batch gradients| per encoder tensor "
               "at theta0; head trains (the SAM repo's bsearch)",
               needs_data=True, ranking=_SAM_REPO, published="SAM",
               published_when={"per_tensor": True, "keep_head": True}),
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


def published_label(name: str, settings: Mapping[str, object]) -> str | None:
    """The published row a run of ``name`` with these settings may stand beside, if any.

    ``settings`` are what the run recorded (ranking options, ``lora_preset``); a run whose
    settings differ from the published definition gets no published row.
    """
    spec = get_spec(name)
    if spec.published is None:
        return None
    if any(settings.get(key) != value for key, value in spec.published_when.items()):
        return None
    return spec.published

"""LoRA through peft, with two named settings: ours (``default``) and the SAM repo's (``sam``).

``sam`` is what the SAM repo's ``--user_mode lora=R`` builds (main_runscript.py, loralib):
every one of the six linear layers of each block (query, key, value, attention output,
intermediate, output) gets a loralib ``Linear`` with ``lora_alpha`` left at loralib's default 1
(scale 1/r) and no dropout; ``lora_B`` is re-initialised Kaiming-uniform like ``lora_A``, so the
adapter is not a no-op at the start; ``mark_only_lora_as_trainable`` then freezes everything
else, the task head included. The repo's scripts do not give R: 4 makes the adapters 0.53% of
RoBERTa-base, the nearest rank to the table's 0.5% budget. It trained at the run's
``--learning_rate`` (1e-4 in its script), which is the ``finetune_by_method: lora: lr`` key here.

A field set explicitly (config key or flag) overrides the preset's value; a run records the
preset only when nothing was overridden (else ``custom``), and only ``sam`` runs get the
published LoRA row. The settings (:class:`LoraSettings`, the presets) are in
:mod:`bayestune.methods.config`, with every method's, and re-exported here: the command line
reads them for every fine-tuning job, while this module runs in LoRA jobs only.
"""

from __future__ import annotations

import copy
import warnings

from torch import nn

from bayestune.methods.config import LORA_INITS, LORA_PRESETS, LoraSettings
from bayestune.methods.registry import MethodError
from bayestune.models.base import TaskModel, is_head

__all__ = ["LORA_INITS", "LORA_PRESETS", "LoraSettings", "lora_trainable_fraction", "merge_lora",
           "wrap_lora"]


def _lora_config(values: dict[str, object]):
    from peft import LoraConfig

    targets = str(values["target_modules"]).strip()
    # peft reads a plain string as a regular expression; a list means module-name suffixes.
    modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    return LoraConfig(r=int(values["rank"]), lora_alpha=float(values["alpha"]),
                      lora_dropout=float(values["dropout"]), target_modules=modules, bias="none",
                      init_lora_weights=values["init"] == "zero")


def wrap_lora(model: TaskModel, settings: LoraSettings) -> TaskModel:
    """A copy of ``model`` with LoRA on ``model.encoder``; only LoRA (and, if the settings
    say so, head) parameters train.

    The copy keeps the TaskModel class, so it is still called as ``model(batch)``; the given
    model is untouched (it stays theta0).
    """
    from peft import get_peft_model

    values = settings.resolved()
    wrapped = copy.deepcopy(model)
    try:
        with warnings.catch_warnings():  # transformers' deprecation notice, raised inside peft
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            wrapped.encoder = get_peft_model(wrapped.encoder, _lora_config(values))
    except ValueError as err:
        raise MethodError(f"LoRA could not adapt {values['target_modules']!r} ({err}); set "
                          "target_modules to linear layer names of this encoder") from err
    for name, param in wrapped.named_parameters():
        param.requires_grad_("lora_" in name or (bool(values["train_head"]) and is_head(name)))
    return wrapped


def merge_lora(model: TaskModel) -> TaskModel:
    """A plain TaskModel with the LoRA updates merged in and the original parameter names."""
    from peft import PeftModel

    if not isinstance(getattr(model, "encoder", None), PeftModel):
        raise MethodError("merge_lora expects a model made by wrap_lora (its encoder is a "
                          "peft model)")
    merged = copy.deepcopy(model)
    merged.encoder = merged.encoder.merge_and_unload()
    return merged.requires_grad_(True)


def lora_trainable_fraction(model: nn.Module, base_total: int) -> float:
    """Trainable LoRA + head scalars over D, the scalar count of the model before wrapping."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / base_total

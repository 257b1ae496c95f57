"""timm image encoders with a fresh linear head, as the VTAB-1k tasks use them.

A model is named by a string that the command line, the workflow config and the file metadata
can all carry::

    NAME[?key=value&key=value...]

``NAME`` is a timm model name, with its pretrained tag (the paper's encoder is
``vit_base_patch16_224.augreg_in21k``). Options:

* ``checkpoint=PATH``: load the encoder weights from a local ``.safetensors``/``.pth``/``.bin``/
  ``.npz`` file instead of the hub (timm's ``pretrained_cfg_overlay=dict(file=PATH)``, so timm's
  own checkpoint filters apply: classifier dropped, position embeddings resampled);
* ``pretrained=false``: random encoder weights (tests, smoke runs);
* ``img_size=N``: input resolution (the data preprocessing follows it; a convolutional network
  takes any size, so for it only the preprocessing changes);
* any other ``key=value`` is passed to ``timm.create_model`` (e.g. ``depth=2``,
  ``patch_size=8``), values parsed as int, float or bool where they look like one.

Example of the tiny encoder the tests use:
``vit_tiny_patch16_224?pretrained=false&img_size=32&patch_size=8&depth=2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config
from torch import nn

from bayestune.errors import ConfigError
from bayestune.models.base import TaskModel, TaskOutput

# A randomly initialised encoder stands in for a pretrained one, so every stage (sample, mask,
# finetune, apply-delta) must rebuild the same theta0: its init seed is fixed, unlike the head's.
ENCODER_INIT_SEED = 0
_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


class ModelLoadError(ConfigError):
    """A vision model cannot be built as named: unknown name, bad option, weights unreachable."""


@dataclass
class VisionModelSpec:
    """A parsed model string (see the module docstring)."""

    name: str
    pretrained: bool = True
    checkpoint: str | None = None
    img_size: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def _literal(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def parse_model_name(model_name: str) -> VisionModelSpec:
    """Split ``NAME?key=value&...`` into a :class:`VisionModelSpec`."""
    name, _, query = model_name.partition("?")
    if not name:
        raise ModelLoadError(f"model {model_name!r}: no timm model name before '?'")
    options = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not (key and eq):
            raise ModelLoadError(f"model {model_name!r}: option {item!r} is not key=value")
        options[key] = _literal(value)
    spec = VisionModelSpec(name=name)
    if "pretrained" in options:
        if not isinstance(options["pretrained"], bool):
            raise ModelLoadError(f"model {model_name!r}: pretrained must be true or false")
        spec.pretrained = options.pop("pretrained")
    if "checkpoint" in options:
        spec.checkpoint = str(options.pop("checkpoint"))
    if "img_size" in options:
        spec.img_size = options.pop("img_size")
        if not isinstance(spec.img_size, int) or spec.img_size <= 0:
            raise ModelLoadError(f"model {model_name!r}: img_size must be a positive integer")
    spec.kwargs = options
    return spec


def _check_known(spec: VisionModelSpec) -> None:
    arch = spec.name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise ModelLoadError(f"unknown timm model {spec.name!r}; list names with "
                             f"timm.list_models('{arch[:3]}*')")


def vision_data_config(model_name: str) -> dict[str, Any]:
    """Input size, interpolation, mean and std the encoder was pretrained with.

    Read from timm's pretrained config without building the model, so ``prepare`` stays cheap;
    a model without one gets ImageNet statistics at 224 pixels.
    """
    spec = parse_model_name(model_name)
    _check_known(spec)
    try:
        cfg = timm.models.get_pretrained_cfg(spec.name)
    except RuntimeError as err:  # timm: "Invalid pretrained tag"
        raise ModelLoadError(f"model {spec.name!r}: {err}") from err
    if cfg is None:
        config = {"input_size": (3, 224, 224), "interpolation": "bicubic",
                  "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
    else:
        config = resolve_data_config(pretrained_cfg=cfg.to_dict())
    if spec.img_size is not None:
        config["input_size"] = (3, spec.img_size, spec.img_size)
    return {"input_size": [int(v) for v in config["input_size"]],
            "interpolation": str(config["interpolation"]),
            "mean": [float(v) for v in config["mean"]],
            "std": [float(v) for v in config["std"]]}


def _weights_kwargs(spec: VisionModelSpec) -> dict[str, Any]:
    if spec.checkpoint is None:
        return {"pretrained": spec.pretrained}
    path = Path(spec.checkpoint).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path}: no such file; pass checkpoint= a local "
                             f"{'/'.join(_CHECKPOINT_SUFFIXES)} file of {spec.name}")
    if path.suffix not in _CHECKPOINT_SUFFIXES:
        raise ModelLoadError(f"checkpoint {path}: expected a file ending in "
                             f"{', '.join(_CHECKPOINT_SUFFIXES)}")
    overlay: dict[str, Any] = {"file": str(path.resolve())}
    if path.suffix == ".npz":  # original JAX weights: the architecture's own loader reads them
        overlay["custom_load"] = True
    return {"pretrained": True, "pretrained_cfg_overlay": overlay}


def _create_seeded(name: str, kwargs: dict[str, Any]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ENCODER_INIT_SEED)
        try:
            return timm.create_model(name, **kwargs)
        except TypeError as err:
            if "img_size" not in kwargs or "img_size" not in str(err):
                raise
    # A convolutional network takes any input size and no img_size: it then sets only the
    # preprocessing (vision_data_config).
    return _create_seeded(name, {k: v for k, v in kwargs.items() if k != "img_size"})


def create_encoder(spec: VisionModelSpec) -> nn.Module:
    """The timm model as a feature extractor (``num_classes=0``), weights as the spec says."""
    _check_known(spec)
    kwargs = dict(spec.kwargs, num_classes=0, **_weights_kwargs(spec))
    if spec.img_size is not None:
        kwargs["img_size"] = spec.img_size
    try:
        return _create_seeded(spec.name, kwargs)
    except TypeError as err:  # an option the architecture does not take
        raise ModelLoadError(f"model {spec.name!r} rejects an option: {err}") from err
    except OSError as err:  # hub unreachable and nothing cached (LocalEntryNotFoundError, ...)
        raise ModelLoadError(
            f"cannot download the pretrained weights of {spec.name!r} ({err}). Offline, point at a "
            f"local checkpoint: model '{spec.name}?checkpoint=/path/to/model.safetensors' (timm's "
            "pretrained_cfg_overlay=dict(file=...)), or fill the Hugging Face cache on a machine "
            "with internet and set HF_HUB_OFFLINE=1.") from err
    except SafetensorError as err:  # its message names no file
        where = spec.checkpoint or f"the Hugging Face cache of {spec.name!r}"
        raise ModelLoadError(f"{where}: not a readable safetensors file ({err}); download "
                             "the weights again") from err


class VisionClassifier(TaskModel):
    """``encoder``: timm features (pooled); ``head``: a linear layer over them."""

    def __init__(self, encoder: nn.Module, num_classes: int, seed: int, model_id: str = ""):
        super().__init__()
        self.encoder = encoder
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = nn.Linear(encoder.num_features, num_classes)
        self.model_id = model_id

    def forward(self, batch: dict[str, torch.Tensor]) -> TaskOutput:
        logits = self.head(self.encoder(batch["pixel_values"]))
        labels = batch.get("labels")
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return TaskOutput(loss=loss, logits=logits)


def build_vision_model(model_name: str, num_classes: int, seed: int,
                       pretrained: bool | None = None, checkpoint: str | None = None,
                       img_size: int | None = None) -> TaskModel:
    """Encoder named by ``model_name`` plus a linear head seeded by ``seed``.

    The keyword arguments override the options in the model string. The encoder's weights do
    not depend on ``seed``; the same seed gives the same head.
    """
    if num_classes < 1:
        raise ModelLoadError(f"num_classes must be positive, got {num_classes}")
    spec = parse_model_name(model_name)
    if pretrained is not None:
        spec.pretrained = pretrained
    if checkpoint is not None:
        spec.checkpoint = checkpoint
    if img_size is not None:
        spec.img_size = img_size
    if spec.checkpoint is not None and not spec.pretrained:
        raise ModelLoadError(f"model {model_name!r}: pretrained=false contradicts checkpoint=; "
                             "drop one of them")
    return VisionClassifier(create_encoder(spec), num_classes, seed, model_id=model_name)

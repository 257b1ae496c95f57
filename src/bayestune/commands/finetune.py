"""``bayestune finetune``: stage 2, fine-tune the masked scalars (or every scalar, or LoRA).

Each candidate of the fair protocol (``--candidates``) trains in turn from the same weights;
the best on validation is kept and only it is scored on test. The job writes the sparse delta
against theta0 and ``metrics.json``, the run's commit marker, last.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bayestune import commands
from bayestune.cli.flags import add_config_flags, config_from_args, from_args
from bayestune.commands.common import RunSettings, made_with, run_flags
from bayestune.errors import ConfigError
from bayestune.finetune import FinetuneConfig
from bayestune.methods.config import LoraSettings
from bayestune.selection import MASK_KEY, PRESET_KEY, parse_candidates

HELP = "stage 2: fine-tune the masked scalars only"
log = logging.getLogger("bayestune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    run_flags(parser)
    parser.add_argument("--mask", type=Path, default=None, help="mask file; omit for --method")
    parser.add_argument("--method", default=None, choices=["full", "lora"],
                        help="without --mask: full fine-tuning (the default) or LoRA")
    parser.add_argument("--start", type=Path, default=None,
                        help="weights to start from instead of theta0 (the start file `mask` "
                             "writes for magnitude); the delta stays against theta0")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--candidates", default=None,
                        help="JSON list of candidate settings trained in turn, e.g. "
                             "'[{\"lr\": 1e-3}, {\"lr\": 3e-3}]' (each may also name a \"mask\" "
                             "file and its stage-1 \"preset\"); the best on validation is kept "
                             "and only it is scored on test (default: one candidate, the flags "
                             "as given)")
    add_config_flags(parser, FinetuneConfig)
    add_config_flags(parser, LoraSettings, prefix="lora_")


@dataclass(frozen=True, kw_only=True)
class Settings(RunSettings):
    mask: Path | None
    method: str | None
    start: Path | None
    out_dir: Path
    finetune: FinetuneConfig  # the flags; a candidate's settings replace some of them
    candidates: list[dict[str, Any]]  # [{}]: one candidate, the flags as given
    lora: LoraSettings | None  # LoRA runs only


def settings(args: argparse.Namespace) -> Settings:
    """The run's settings, every candidate's checked before anything is read or trained."""
    if args.mask is not None and args.method is not None:
        raise ConfigError(f"--mask and --method {args.method} both given: a mask run trains the "
                          f"mask's scalars, {args.method} is another method; drop one of them")
    base = config_from_args(args, FinetuneConfig)
    candidates = parse_candidates(args.candidates) if args.candidates else [{}]
    if args.mask is None and any(MASK_KEY in c for c in candidates):
        raise ConfigError("a candidate names a mask but the run has no --mask: give the mask "
                          "method's --mask (candidates then replace it)")
    for candidate in candidates:
        dataclasses.replace(base, **stage2_settings(candidate))
    lora = (config_from_args(args, LoraSettings, prefix="lora_")
            if (args.method or "full") == "lora" and args.mask is None else None)
    return from_args(Settings, args, finetune=base, candidates=candidates, lora=lora)


def stage2_settings(candidate: Mapping[str, Any]) -> dict[str, Any]:
    """A candidate's FinetuneConfig fields (without its mask and stage-1 preset)."""
    return {k: v for k, v in candidate.items() if k not in (MASK_KEY, PRESET_KEY)}


def run(settings: Settings) -> None:
    from bayestune.guards import check_distinct

    outputs = {name: Path(settings.out_dir) / name
               for name in ("delta.safetensors", "metrics.json")}
    named = {f"--out-dir's {name}": path for name, path in outputs.items()}
    masks_read = {f"candidate mask {c[MASK_KEY]}": c[MASK_KEY] for c in settings.candidates
                  if MASK_KEY in c}
    check_distinct(named, {"--mask": settings.mask, "--start": settings.start,
                           "--data": settings.data, **masks_read})
    # through the module: a test counts how often the data is read
    spec, model, data = commands.common.model_and_data(settings)
    theta0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    moved = _load_start(settings, model) if settings.start is not None else None
    tried, chosen, best_model = _train_candidates(settings, spec, model, data, theta0)
    _write_outputs(settings, outputs, spec, data, theta0, moved, tried, chosen, best_model)


def _train_candidates(settings: Settings, spec, model, data, theta0: Mapping) -> tuple:
    """Each candidate from the same weights (theta0, or the start file's) with the same seed
    and data order, so that only its settings differ; the tries, the index of the best on
    validation and its model."""
    import copy

    from bayestune.finetune import finetune
    from bayestune.selection import choose, describe

    masks: dict = {}
    tried, chosen, best_model = [], 0, None
    for number, candidate in enumerate(settings.candidates):
        config = dataclasses.replace(settings.finetune, **stage2_settings(candidate))
        mask = mask_meta = None
        if settings.mask is not None:
            mask, mask_meta = _candidate_mask(Path(candidate.get(MASK_KEY, settings.mask)),
                                              masks, theta0, settings, model)
        trained = copy.deepcopy(model)
        if settings.lora is not None:
            # by name: the LoRA module runs in LoRA jobs only (and keys only their reruns)
            from bayestune.methods import wrap_lora

            trained = wrap_lora(trained, settings.lora)
        if len(settings.candidates) > 1:
            log.info("%s candidate %d/%d: %s", settings.task, number + 1,
                     len(settings.candidates), describe(candidate))
        result = finetune(trained, data, spec, config, mask=mask, seed=settings.seed,
                          device=settings.device, progress=not settings.quiet, score_test=False,
                          log_every=settings.log_every)
        tried.append({"candidate": candidate, "config": config, "result": result,
                      "mask": mask, "mask_meta": mask_meta})
        chosen = choose([t["result"].val_score for t in tried])
        if chosen == number:
            best_model = trained
        del trained
    return tried, chosen, best_model


def _write_outputs(settings: Settings, outputs: Mapping[str, Path], spec, data,
                   theta0: Mapping, moved: dict | None, tried: list[dict], chosen: int,
                   best_model) -> None:
    from bayestune import __version__, convergence, files
    from bayestune.commands.common import stage_provenance
    from bayestune.delta import make_delta
    from bayestune.masks import mask_fraction
    from bayestune.models.base import resolve_device
    from bayestune.provenance import upstream
    from bayestune.selection import describe
    from bayestune.tasks.base import evaluate

    config, result, mask, mask_meta = (tried[chosen][k]
                                       for k in ("config", "result", "mask", "mask_meta"))
    # Test is scored once, for the candidate validation chose.
    result.test_score = evaluate(best_model, data.test, spec, resolve_device(settings.device))
    method = budget = settings.method or "full"
    chain, lora, lora_preset = {}, settings.lora, None
    if mask_meta is not None:
        method, budget = mask_meta.get("method", "mask"), mask_meta.get("budget")
        chain = upstream(mask_meta, "mask")
    stage2 = {**dataclasses.asdict(config), "batch_size": settings.batch_size,
              "eval_batch_size": settings.eval_batch_size}
    model = best_model
    if lora is not None:
        from bayestune.methods import merge_lora

        lora_preset = lora.effective_preset()
        model = merge_lora(best_model)
    delta = make_delta(model.cpu(), theta0)
    made_by = stage_provenance(settings, {"method": method, "finetune": stage2,
                                          **({"lora": dataclasses.asdict(lora)} if lora else {})})
    # metrics.json is the run's commit marker, written last (the report reads only runs that
    # have one): an earlier run's goes first, so a run killed after its delta never leaves
    # the new delta beside the old run's scores.
    files.remove_output(outputs["metrics.json"])
    files.save_delta(outputs["delta.safetensors"], delta,
                     {"task": settings.task, "model": model.model_id, **made_with(model),
                      "seed": settings.seed, "method": method, "budget": budget,
                      "upstream": chain}, made_by)
    published_as, published_differs = _published(method, mask_meta, lora_preset, model, stage2)
    # With a start, every scalar the start moved is trained as much as the masked ones: the
    # trainable fraction counts both, and the changed fraction says what differs from theta0.
    changed = sum(int((p.detach() != theta0[n].to(p.device)).sum())
                  for n, p in model.named_parameters())
    trainable = result.trainable_fraction
    if moved is not None and mask is not None:
        trainable = mask_fraction({n: moved[n] | mask[n] for n in moved})
    selection = {"chosen": chosen, "candidates": [{
        "settings": {k: v for k, v in t["candidate"].items() if k != MASK_KEY},
        "mask": t["candidate"].get(MASK_KEY),
        "val_score": t["result"].val_score, "best_step": t["result"].best_step,
        "steps": t["result"].steps, "wall_seconds": t["result"].wall_seconds,
        "history": convergence.history_records(t["result"].history),
        "stop_reason": convergence.stop_reason(t["result"].history, t["result"].best_step,
                                               t["config"].patience),
    } for t in tried]}
    files.write_json(outputs["metrics.json"], {
        "method": method, "budget": budget, "task": settings.task, "seed": settings.seed,
        "model": model.model_id, **made_with(model), "metric": spec.metric_name,
        "test_score": result.test_score, "val_score": result.val_score,
        "trainable_fraction": trainable, "mask_fraction": result.trainable_fraction,
        "changed_fraction": changed / result.n_total,
        "n_trainable": result.n_trainable, "n_total": result.n_total,
        "published_as": published_as, "published_differs": published_differs,
        "lora_preset": lora_preset,
        "start": None if settings.start is None else str(settings.start),
        "best_step": result.best_step, "steps": result.steps,
        "wall_seconds": sum(t["result"].wall_seconds for t in tried),
        "bayestune_version": __version__,
        "history": convergence.history_records(result.history),
        "stop_reason": convergence.stop_reason(result.history, result.best_step, config.patience),
        "chosen": selection["candidates"][chosen]["settings"], "selection": selection,
        "finetune": stage2, **({"lora": dataclasses.asdict(lora)} if lora else {}),
        "upstream": chain,
    }, provenance=made_by)
    log.info("%s %s: chose %s on validation; test %s = %.4f", settings.task, method,
             describe(settings.candidates[chosen]), spec.metric_name, result.test_score)


def _load_start(settings: Settings, model) -> dict:
    """Write the start file's weights into ``model``; return where they differ from theta0."""
    import torch

    from bayestune import files
    from bayestune.file_origin import check_architecture

    path = settings.start
    start, meta = files.load_model_state(path)
    params = dict(model.named_parameters())
    check_architecture(meta, path, "start", model.architecture)
    files.check_matches_model(start, {n: p.shape for n, p in params.items()}, path, "start")
    expected = {"task": settings.task, "seed": settings.seed, "model": model.model_id}
    wrong = {k: meta[k] for k, v in expected.items() if k in meta and meta[k] != v}
    if wrong:
        raise files.FileFormatError(f"{path}: start file made for {wrong}, not for this run "
                                    f"({expected}); pass the start file of the same task, seed "
                                    "and model")
    moved = {}
    with torch.no_grad():
        for name, param in params.items():
            value = start[name].to(param.device, param.dtype)
            moved[name] = (value != param).cpu()
            param.copy_(value)
    return moved


def _published(method: str, mask_meta: dict | None, lora_preset: str | None, model,
               stage2: Mapping) -> tuple[str | None, list[str]]:
    """The published row this run may stand beside (recorded per run for the tables), and why
    not where it may not: its definition (the mask file's ranking options and method settings,
    the LoRA preset, the architecture) and its stage-2 settings against the source's."""
    from bayestune.methods.registry import published_differences, published_label

    described = {**(mask_meta or {}), "lora_preset": lora_preset, **made_with(model)}
    return (published_label(method, described, stage2),
            published_differences(method, described, stage2))


def _candidate_mask(path: Path, cache: dict, theta0: Mapping, settings: Settings,
                    model) -> tuple:
    """A mask file's mask and metadata, checked against the run and read once per job."""
    from bayestune import files
    from bayestune.file_origin import check_made_for

    if path not in cache:
        mask, meta = files.load_mask(path)
        check_made_for(meta, path, "mask", task=settings.task, model=model.model_id,
                       architecture=model.architecture)
        files.check_matches_model(mask, {n: t.shape for n, t in theta0.items()}, path, "mask")
        if meta.get("start") and settings.start is None:
            raise ConfigError(f"{path}: method {meta.get('method')} trains before it ranks and "
                              "stage 2 goes on from those weights; pass --start with the start "
                              "file its mask job wrote (mask --start-out)")
        cache[path] = (mask, meta)
    return cache[path]

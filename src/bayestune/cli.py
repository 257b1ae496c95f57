"""The one command line: ``bayestune <subcommand>``; each Snakemake rule calls one subcommand.

Options of the sampler, the fine-tuning and the mask methods are generated from the fields of
their config dataclasses, so a config key, a flag and a field always share one name.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from bayestune import __version__
from bayestune.errors import BayesTuneError, ConfigError
from bayestune.guards import accept_negative_numbers, nonnegative_int, positive_int

if TYPE_CHECKING:
    from torch import Tensor

    from bayestune.sampler import SamplerConfig

log = logging.getLogger("bayestune")
LOG_EVERY = 100  # steps between the log lines of sample and finetune jobs
Config = TypeVar("Config")


# --- flags generated from config dataclasses ------------------------------------------------
def add_config_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "", *,
                     given_only: bool = False) -> None:
    """One flag per field. With ``given_only`` a flag left out sets nothing on the namespace,
    so that a preset can fill it (the help then names the ``exact`` default)."""
    group = parser.add_argument_group(f"{cls.__name__} options")
    for field in dataclasses.fields(cls):
        flag = "--" + (prefix + field.name).replace("_", "-")
        # A field whose default is None (unset: a preset or method default decides) names its
        # type in the field metadata. With given_only a flag left out sets nothing.
        default = argparse.SUPPRESS if given_only else field.default
        shown = "preset's value; exact: " if given_only and field.name != "preset" else ""
        help_text = field.metadata.get("help", "") + (
            "" if field.default is None else f" (default: {shown}{field.default})")
        kind = field.metadata.get("type", type(field.default))
        if kind is bool:
            group.add_argument(flag, dest=prefix + field.name, default=default,
                               action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag, dest=prefix + field.name, default=default,
                               type=kind, help=help_text, choices=field.metadata.get("choices"))


def config_from_args(args: argparse.Namespace, cls: type[Config], prefix: str = "") -> Config:
    values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls)}
    return cls(**values)


def parse_budgets(text: str) -> list[float]:
    from bayestune.masks import check_budget

    try:
        budgets = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"budgets must be comma-separated numbers: {text!r}") from err
    for budget in budgets:
        try:
            check_budget(budget)
        except ValueError as err:  # argparse shows its own text for a ValueError, not err's
            raise argparse.ArgumentTypeError(str(err)) from err
    return budgets


def _provenance(args: argparse.Namespace, config: object) -> dict:
    """The provenance record of this command's outputs: ``config`` is what it ran with."""
    from bayestune.models.base import resolve_device
    from bayestune.provenance import collect

    return collect(args.command, config, resolve_device(args.device))


# --- subcommands ----------------------------------------------------------------------------
def declared_tasks(args: argparse.Namespace) -> dict:
    """The tasks of ``--task-file`` (none without one), by name."""
    from bayestune.tasks.custom import read_task_file

    return read_task_file(args.task_file) if args.task_file is not None else {}


def cmd_prepare(args: argparse.Namespace) -> None:
    from bayestune.guards import check_outside, raw_task_folder
    from bayestune.tasks import prepare_task

    declared = declared_tasks(args)
    check_outside("--out-dir", args.out_dir, "the task's raw data folder",
                  raw_task_folder(args.task, args.data_dir, declared))
    prepare_task(args.task, args.model, args.out_dir, args.data_dir, args.max_length,
                 custom_tasks=declared, architecture=args.architecture)


def made_with(model) -> dict:
    """What the files of a run record about its model besides the name: a text model's
    architecture (nothing for a model without the choice)."""
    return {} if model.architecture is None else {"architecture": model.architecture}


def cmd_cut_vocabulary(args: argparse.Namespace) -> None:
    from bayestune import files
    from bayestune.models.derive import restrict_vocabulary
    from bayestune.models.text import resolve_model_path
    from bayestune.tasks import used_token_ids

    used = used_token_ids(args.tasks, args.model, args.data_dir, declared_tasks(args),
                          args.architecture)
    files.replace_folder(args.out_dir, lambda tmp: restrict_vocabulary(
        resolve_model_path(args.model), used, tmp))
    log.info("%s: %s with the %d tokens of %s", args.out_dir, args.model, len(used),
             ", ".join(args.tasks))


def _model_and_data(args: argparse.Namespace):
    from bayestune.tasks import build_task_model, get_task, load_task_data

    if args.data is None:
        raise ConfigError(f"{args.command} trains on the task's data: pass --data, the folder "
                          f"`bayestune prepare --task {args.task} --out-dir ...` wrote")

    declared = declared_tasks(args)
    spec = get_task(args.task, declared)
    model = build_task_model(args.task, args.model, args.seed, declared, args.architecture)
    data = load_task_data(args.task, args.data, args.batch_size, args.seed, args.eval_batch_size,
                          declared, args.architecture)
    return spec, model, data


def sampler_config_from_args(args: argparse.Namespace):
    """The preset (``--preset``, default exact) with the sampler flags given on top."""
    from bayestune.sampler import SamplerConfig, sampler_config

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplerConfig)
             if hasattr(args, f.name)}
    return sampler_config(**given)


def cmd_sample(args: argparse.Namespace) -> None:
    from bayestune import files
    from bayestune.diagnostics import ChainMonitor, rank_agreement, write_chain_diagnostics
    from bayestune.guards import check_distinct, prepared_fingerprint
    from bayestune.liveness import exclusive_lock
    from bayestune.models.base import resolve_device, task_loss
    from bayestune.sampler import sample_scales, write_scale_file
    from bayestune.scale_checks import weight_scale
    from bayestune.tasks.base import val_scorer

    config = sampler_config_from_args(args)
    outputs = dict(zip(("--out", "its diagnostics", "its traces"),
                       (args.out, *files.diagnostics_paths(args.out)), strict=True))
    check_distinct(outputs, {"--checkpoint": args.checkpoint, "--data": args.data})
    with (exclusive_lock(args.checkpoint, "checkpoint") if args.checkpoint is not None
          else contextlib.nullcontext()):
        spec, model, data = _model_and_data(args)
        largest_weight = weight_scale(model)  # before sampling moves theta away from theta0
        fisher = _fisher_at_start(args, model, data)
        monitor = ChainMonitor()
        # What the task gives the sampler: the epoch's length (jiant schedule) and a validation
        # score on the first val_subset examples (the length rule).
        validate = (val_scorer(data, spec, config.val_subset, resolve_device(args.device))
                    if config.patience > 0 else None)
        inputs = {"task": args.task, "data": prepared_fingerprint(args.data),
                  "batch_size": args.batch_size, "steps_per_epoch": len(data.train)}
        result = sample_scales(model, data.train_epoch, task_loss, config, seed=args.seed,
                               device=args.device, checkpoint_path=args.checkpoint,
                               progress=not args.quiet, steps_per_epoch=len(data.train),
                               validate=validate, log_every=args.log_every,
                               chain_monitor=monitor, inputs=inputs)
        accepted = _check_scales(args, config, result.mean, largest_weight)
        run = _provenance(args, {"sampler": config, "batch_size": args.batch_size})
        agreement = rank_agreement(monitor.final_scores(model, result.mean, fisher))
        # The scale file is written last, after the old diagnostics are gone: a run killed
        # between the writes never leaves new scales beside an older run's diagnostics.
        for path in outputs.values():
            files.remove_output(path)
        write_chain_diagnostics(args.out, monitor, agreement, run={
            "task": args.task, "seed": args.seed, "preset": config.preset,
            "model_id": model.model_id, **made_with(model), "steps": result.steps,
            "n_samples": result.n_samples,
            "fisher_examples": args.diagnostics_fisher_examples if fisher is not None else 0})
        write_scale_file(args.out, result, config, seed=args.seed, model_id=model.model_id,
                         provenance=run, accepted_problems=accepted,
                         extra=made_with(model))
        if args.checkpoint is not None:
            # The scale file is the product; a finished run's checkpoint is only dead weight.
            files.remove_output(args.checkpoint)
    log.info("wrote %s (%d samples averaged)", args.out, result.n_samples)


def _fisher_at_start(args: argparse.Namespace, model, data) -> dict[str, Tensor] | None:
    """Fisher scores at theta0 for the chain diagnostics (None when turned off)."""
    from bayestune.methods import MethodConfig
    from bayestune.methods.fisher import fisher_scores
    from bayestune.models.base import resolve_device, task_loss

    if args.diagnostics_fisher_examples == 0:
        return None
    model.to(resolve_device(args.device))
    settings = MethodConfig(fisher_examples=args.diagnostics_fisher_examples)
    return fisher_scores(model, data.train_epoch, task_loss, args.seed, settings)


def cmd_diagnose(args: argparse.Namespace) -> None:
    from bayestune.chain_report import describe, format_summary

    for k, path in enumerate(args.files):
        summary = describe(path)
        print(("\n" if k else "") + (json.dumps(summary, indent=2) if args.json
                                     else format_summary(summary)))
    if args.figures_dir is not None:
        _chain_figures(args)


def _chain_figures(args: argparse.Namespace) -> None:
    """The traces of the first scale file; with several seeds, their agreement."""
    from bayestune import files, reports
    from bayestune.chain_report import seed_agreement

    scales = [p for p in args.files if p.suffix == ".safetensors"]
    if not scales:
        raise ConfigError("--figures-dir draws scale files' diagnostics; give at least one "
                          "scale file (.safetensors)")
    out = Path(args.figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    traces_path = files.diagnostics_paths(scales[0])[1]
    traces, meta = files.load_traces(traces_path)
    reports.plot_lambda_traces(traces, meta, out / "lambda_traces.png")
    table = seed_agreement(scales, args.masks)
    reports.write_table_csv(table, out / "seed_agreement.csv")
    reports.plot_seed_agreement(table, out / "seed_agreement.png")
    log.info("wrote %s", ", ".join(str(out / n) for n in (
        "lambda_traces.png", "seed_agreement.csv", "seed_agreement.png")))


def _check_scales(args: argparse.Namespace, config: SamplerConfig, scales: Mapping[str, Tensor],
                  largest_weight: float) -> list[str]:
    """Fail the job on a degenerate chain, unless --allow-degenerate-scales; return the
    problems so accepted (the scale file records them, and `mask` reads them as accepted)."""
    from bayestune.scale_checks import DegenerateScalesError, scale_problems

    problems = scale_problems(scales, floor=config.lambda_floor, largest_weight=largest_weight,
                              lr_lambda=config.lr_lambda)
    if not problems:
        return []
    run = f"stage 1 of {args.task}, seed {args.seed} ({args.out})"
    if args.allow_degenerate_scales:
        log.warning("%s: degenerate scales kept (--allow-degenerate-scales): %s", run,
                    "; ".join(problems))
        return problems
    restart = (f"; delete the checkpoint {args.checkpoint} before rerunning with other settings"
               if args.checkpoint is not None else "")
    raise DegenerateScalesError(f"{run}: {'; '.join(problems)}{restart}. To keep these scales "
                                "anyway, rerun with --allow-degenerate-scales")


def cmd_mask(args: argparse.Namespace) -> None:
    from bayestune import files
    from bayestune.file_origin import check_made_for
    from bayestune.guards import check_distinct
    from bayestune.masks import START_FILE_NAME, check_selects_some, mask_file_name, mask_metadata
    from bayestune.methods import (
        MethodConfig,
        method_settings,
        published_differences,
        published_label,
        ranking_options,
        select_masks,
    )
    from bayestune.methods.registry import REGISTRY
    from bayestune.models.base import resolve_device, task_loss
    from bayestune.provenance import upstream
    from bayestune.tasks import build_task_model, load_task_data

    config = config_from_args(args, MethodConfig)
    out_dir = Path(args.out_dir)
    targets = {f"--out-dir's {mask_file_name(b)}": out_dir / mask_file_name(b)
               for b in args.budgets}
    if REGISTRY[args.method].writes_start:
        targets["--start-out"] = args.start_out or out_dir / START_FILE_NAME
    check_distinct(targets, {"--scores": args.scores, "--data": args.data})
    declared = declared_tasks(args)
    model = build_task_model(args.task, args.model, args.seed, declared, args.architecture)
    model.to(resolve_device(args.device))  # the gradient methods' passes run where it sits
    shapes = {name: p.shape for name, p in model.named_parameters()}
    scores, chain = None, {}
    if args.scores is not None:
        scores, score_meta = files.load_scores(args.scores)
        # the architecture first: its message names the fix, a shape mismatch would not
        check_made_for(score_meta, args.scores, "score", model=model.model_id,
                       architecture=model.architecture)
        files.check_matches_model(scores, shapes, args.scores, "score")
        if score_meta.get("kind") == "scales":
            from bayestune.scale_checks import check_scale_file, weight_scale

            accepted = check_scale_file(scores, score_meta, args.scores, weight_scale(model))
            if accepted:
                log.warning("%s: degenerate scales used as accepted by stage 1: %s",
                            args.scores, "; ".join(accepted))
        chain = upstream(score_meta, "scales")
    batches = None
    if args.data is not None:
        batches = load_task_data(args.task, args.data, args.batch_size, args.seed,
                                 args.eval_batch_size, declared, args.architecture).train_epoch
    masks = select_masks(args.method, model, batches, task_loss, args.budgets, args.seed, config,
                         scores=scores)
    for budget, mask in masks.items():  # here, not when fine-tuning finds nothing to train
        check_selects_some(mask, budget, per_tensor=config.per_tensor)
    options = ranking_options(args.method, config)
    run = {"task": args.task, "seed": args.seed, "model": model.model_id, **made_with(model)}
    made_by = _provenance(args, {"method": args.method, "mask": config,
                                 "batch_size": args.batch_size})
    # Every file of an earlier run goes before the first new one is written, so that a run
    # killed between its writes leaves files of one run only (and the missing ones to redo).
    for path in targets.values():
        files.remove_output(path)
    out_dir = Path(args.out_dir)
    settings = {**options, **method_settings(config), **made_with(model)}
    for budget, mask in masks.items():
        meta = mask_metadata(mask, budget, method=args.method, **options, **run,
                             published_as=published_label(args.method, settings),
                             published_differs=published_differences(args.method, settings),
                             start=masks.start is not None, **method_settings(config))
        files.save_mask(out_dir / mask_file_name(budget), mask, {**meta, "upstream": chain},
                        made_by)
    if masks.start is not None:
        start_path = targets.get("--start-out", args.start_out or out_dir / START_FILE_NAME)
        files.save_model_state(start_path, masks.start,
                               {"method": args.method, "start_of": "stage 2", **run,
                                **method_settings(config), "upstream": chain}, made_by)


def _load_start(path: Path, model, args: argparse.Namespace) -> dict:
    """Write a start file's weights into ``model``; return where they differ from theta0."""
    import torch

    from bayestune import files
    from bayestune.file_origin import check_architecture

    start, meta = files.load_model_state(path)
    params = dict(model.named_parameters())
    check_architecture(meta, path, "start", model.architecture)
    files.check_matches_model(start, {n: p.shape for n, p in params.items()}, path, "start")
    expected = {"task": args.task, "seed": args.seed, "model": model.model_id}
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
    from bayestune.methods import published_differences, published_label

    settings = {**(mask_meta or {}), "lora_preset": lora_preset, **made_with(model)}
    return (published_label(method, settings, stage2),
            published_differences(method, settings, stage2))


def _candidate_mask(path: Path, cache: dict, theta0: Mapping, args: argparse.Namespace,
                    model) -> tuple:
    """A mask file's mask and metadata, checked against the run and read once per job."""
    from bayestune import files
    from bayestune.file_origin import check_made_for

    if path not in cache:
        mask, meta = files.load_mask(path)
        check_made_for(meta, path, "mask", task=args.task, model=model.model_id,
                       architecture=model.architecture)
        files.check_matches_model(mask, {n: t.shape for n, t in theta0.items()}, path, "mask")
        if meta.get("start") and args.start is None:
            raise ConfigError(f"{path}: method {meta.get('method')} trains before it ranks and "
                              "stage 2 goes on from those weights; pass --start with the start "
                              "file its mask job wrote (mask --start-out)")
        cache[path] = (mask, meta)
    return cache[path]


def cmd_finetune(args: argparse.Namespace) -> None:
    import copy

    from bayestune import convergence, files
    from bayestune.delta import make_delta
    from bayestune.finetune import FinetuneConfig, finetune
    from bayestune.guards import check_distinct
    from bayestune.masks import mask_fraction
    from bayestune.models.base import resolve_device
    from bayestune.provenance import upstream
    from bayestune.selection import MASK_KEY, PRESET_KEY, choose, describe, parse_candidates
    from bayestune.tasks.base import evaluate

    if args.mask is not None and args.method is not None:
        raise ConfigError(f"--mask and --method {args.method} both given: a mask run trains the "
                          f"mask's scalars, {args.method} is another method; drop one of them")
    base = config_from_args(args, FinetuneConfig)
    candidates = parse_candidates(args.candidates) if args.candidates else [{}]
    if args.mask is None and any(MASK_KEY in c for c in candidates):
        raise ConfigError("a candidate names a mask but the run has no --mask: give the mask "
                          "method's --mask (candidates then replace it)")
    for candidate in candidates:  # each candidate's settings checked before any training
        dataclasses.replace(base, **{k: v for k, v in candidate.items()
                                     if k not in (MASK_KEY, PRESET_KEY)})
    outputs = {name: Path(args.out_dir) / name for name in ("delta.safetensors", "metrics.json")}
    named = {f"--out-dir's {name}": path for name, path in outputs.items()}
    masks_read = {f"candidate mask {c[MASK_KEY]}": c[MASK_KEY] for c in candidates
                  if MASK_KEY in c}
    check_distinct(named, {"--mask": args.mask, "--start": args.start, "--data": args.data,
                             **masks_read})
    spec, model, data = _model_and_data(args)
    theta0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    masks: dict = {}
    moved = _load_start(args.start, model, args) if args.start is not None else None
    lora = None
    if (args.method or "full") == "lora" and args.mask is None:
        from bayestune.methods import LoraSettings

        lora = config_from_args(args, LoraSettings, prefix="lora_")
    # Each candidate starts from the same weights (theta0, or the start file's) with the same
    # seed and data order, so that only its settings differ; the best on validation is kept.
    tried, chosen, best_model = [], 0, None
    for number, candidate in enumerate(candidates):
        stage2 = {k: v for k, v in candidate.items() if k not in (MASK_KEY, PRESET_KEY)}
        config = dataclasses.replace(base, **stage2)
        mask = mask_meta = None
        if args.mask is not None:
            mask, mask_meta = _candidate_mask(Path(candidate.get(MASK_KEY, args.mask)), masks,
                                              theta0, args, model)
        trained = copy.deepcopy(model)
        if lora is not None:
            from bayestune.methods import wrap_lora

            trained = wrap_lora(trained, lora)
        if len(candidates) > 1:
            log.info("%s candidate %d/%d: %s", args.task, number + 1, len(candidates),
                     describe(candidate))
        result = finetune(trained, data, spec, config, mask=mask, seed=args.seed,
                          device=args.device, progress=not args.quiet, score_test=False,
                          log_every=args.log_every)
        tried.append({"candidate": candidate, "config": config, "result": result,
                      "mask": mask, "mask_meta": mask_meta})
        chosen = choose([t["result"].val_score for t in tried])
        if chosen == number:
            best_model = trained
        del trained
    config, result, mask, mask_meta = (tried[chosen][k]
                                       for k in ("config", "result", "mask", "mask_meta"))
    # Test is scored once, for the candidate validation chose.
    result.test_score = evaluate(best_model, data.test, spec, resolve_device(args.device))
    method, budget, chain, lora_preset = args.method or "full", args.method or "full", {}, None
    if mask_meta is not None:
        method, budget = mask_meta.get("method", "mask"), mask_meta.get("budget")
        chain = upstream(mask_meta, "mask")
    settings = {**dataclasses.asdict(config), "batch_size": args.batch_size,
                "eval_batch_size": args.eval_batch_size}
    model = best_model
    if lora is not None:
        from bayestune.methods import merge_lora

        lora_preset = lora.effective_preset()
        model = merge_lora(best_model)
    delta = make_delta(model.cpu(), theta0)
    made_by = _provenance(args, {"method": method, "finetune": settings,
                                 **({"lora": dataclasses.asdict(lora)} if lora else {})})
    # metrics.json is the run's commit marker, written last (the report reads only runs that
    # have one): an earlier run's goes first, so a run killed after its delta never leaves
    # the new delta beside the old run's scores.
    files.remove_output(outputs["metrics.json"])
    files.save_delta(outputs["delta.safetensors"], delta,
                     {"task": args.task, "model": model.model_id, **made_with(model),
                      "seed": args.seed, "method": method, "budget": budget, "upstream": chain},
                     made_by)
    published_as, published_differs = _published(method, mask_meta, lora_preset, model, settings)
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
        "method": method, "budget": budget, "task": args.task, "seed": args.seed,
        "model": model.model_id, **made_with(model), "metric": spec.metric_name,
        "test_score": result.test_score, "val_score": result.val_score,
        "trainable_fraction": trainable, "mask_fraction": result.trainable_fraction,
        "changed_fraction": changed / result.n_total,
        "n_trainable": result.n_trainable, "n_total": result.n_total,
        "published_as": published_as, "published_differs": published_differs,
        "lora_preset": lora_preset, "start": None if args.start is None else str(args.start),
        "best_step": result.best_step, "steps": result.steps,
        "wall_seconds": sum(t["result"].wall_seconds for t in tried),
        "bayestune_version": __version__,
        "history": convergence.history_records(result.history),
        "stop_reason": convergence.stop_reason(result.history, result.best_step, config.patience),
        "chosen": selection["candidates"][chosen]["settings"], "selection": selection,
        "finetune": settings, **({"lora": dataclasses.asdict(lora)} if lora else {}),
        "upstream": chain,
    }, provenance=made_by)
    log.info("%s %s: chose %s on validation; test %s = %.4f", args.task, method,
             describe(candidates[chosen]), spec.metric_name, result.test_score)


def cmd_apply_delta(args: argparse.Namespace) -> None:
    from bayestune import files
    from bayestune.delta import apply_delta
    from bayestune.file_origin import (
        check_architecture,
        check_made_for,
        recorded_architecture,
        recorded_seed,
    )
    from bayestune.guards import check_distinct
    from bayestune.tasks import build_task_model

    check_distinct({"--out": args.out}, {"--delta": args.delta})
    delta, meta = files.load_delta(args.delta)
    # The delta holds only the scalars that changed: a frozen head (and a drawn pooler) must be
    # rebuilt from the run's own seed and architecture, or the model silently gets other ones.
    architecture = args.architecture or recorded_architecture(meta)
    check_architecture(meta, args.delta, "delta", architecture)
    model = build_task_model(args.task, args.model, recorded_seed(meta, args.delta, args.seed),
                             declared_tasks(args), architecture)
    check_made_for(meta, args.delta, "delta", task=args.task, model=model.model_id,
                   architecture=model.architecture)
    apply_delta(model, delta, source=str(args.delta))
    files.save_model_state(args.out, model.state_dict(), {**meta, "delta": str(args.delta)})


def cmd_report(args: argparse.Namespace) -> None:
    from bayestune import reports

    scores = reports.collect_scores(args.metrics)
    reports.write_tables(scores, args.out_dir, args.benchmark, args.model,
                         reference=args.reference, main_budget=format(args.main_budget, "g"))
    reports.write_provenance(args.metrics, args.out_dir, args.benchmark)
    reports.write_selection(args.metrics, args.out_dir, args.benchmark)
    reports.write_table_html(args.out_dir, args.benchmark)


def cmd_figures(args: argparse.Namespace) -> None:
    from bayestune import reports

    reports.write_figures(args.out_dir, scales=args.scales, masks=args.masks,
                          scores_csv=args.scores_csv, metrics=args.metrics,
                          paired_csv=args.paired_csv)


def cmd_bench(args: argparse.Namespace) -> None:
    from bayestune.bench import print_table, run_bench

    print_table(run_bench(args.out, model=args.model, steps=args.steps, device=args.device))


def cmd_plan(args: argparse.Namespace) -> None:
    from bayestune.plan import format_plan, make_plan

    print(format_plan(make_plan(args.configfile, args.directory, costs_file=args.costs,
                                remaining=args.remaining)))


def cmd_sweep(args: argparse.Namespace) -> None:
    from bayestune import sweep

    config = sweep.read_yaml(args.config)
    for key, value in (("model", args.model), ("prepared_dir", args.prepared_dir)):
        if value is not None:
            config[key] = value
    jobs = sweep.grid_jobs(sweep.read_yaml(args.grid), args.tasks or config["tasks"],
                           args.seeds or config["seeds"])
    table = sweep.run_sweep(config, jobs, args.out, device=args.device, workers=args.workers)
    print(sweep.summarise(table).to_string())
    if len(table):
        from bayestune.reports import plot_sweep

        log.info("wrote %s", plot_sweep(table, Path(args.out).with_suffix(".png")))


def cmd_render_jobs(args: argparse.Namespace) -> None:
    from bayestune import jobs

    listed = jobs.render_jobs(args.configfile, args.directory)
    jobs.write_job_list(args.out, listed, args.configfile)
    log.info("wrote %d jobs of %s to %s", len(listed), args.configfile, args.out)


def cmd_carry_model(args: argparse.Namespace) -> None:
    from bayestune import jobs

    log.info("wrote %s", jobs.carry_model(args.model, args.out))


def cmd_run_jobs(args: argparse.Namespace) -> None:
    import pandas as pd

    from bayestune import files, jobs

    listed = jobs.read_job_list(args.jobs)
    state = args.state or Path(jobs.STATE_FOLDER) / args.jobs.stem
    started = time.monotonic()
    outcomes = jobs.run_jobs(listed, args.slots, state)
    rows = pd.DataFrame(jobs.summary_rows(outcomes))
    summary = args.summary or state / "jobs.csv"
    with files.atomic_output(summary) as tmp:
        rows.to_csv(tmp, index=False)
    ran = rows[rows.status == "done"]
    print(f"run-jobs: {len(ran)} ran, {int((rows.status == 'skipped').sum())} done before, "
          f"{len(rows) - len(ran) - int((rows.status == 'skipped').sum())} failed or blocked, "
          f"{time.monotonic() - started:.0f} s wall, at most "
          f"{int(ran.running_at_start.max()) if len(ran) else 0} at once ({args.slots} slots)")
    for rule, group in ran[ran.steps > 0].groupby("rule"):
        print(f"  {rule}: {len(group)} jobs, median {group.seconds.median():.1f} s, "
              f"{group.seconds.sum() / group.steps.sum():.4f} s per step (wall, start-up "
              "included, jobs sharing the device)")
    print(f"  per-job times: {summary}")
    jobs.check_outcomes(outcomes)


# --- parser ---------------------------------------------------------------------------------
def _task_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True,
                        help="task name: built in (cola, vtab-cifar, ...) or declared in "
                             "--task-file")
    parser.add_argument("--task-file", type=Path, default=None,
                        help="YAML with a top-level custom_tasks: mapping that declares tasks "
                             "(a run config that declares them will do)")


def _architecture_flag(parser: argparse.ArgumentParser, recorded: str = "") -> None:
    """--architecture; with ``recorded`` (apply-delta) it defaults to what the file records."""
    from bayestune.models.base import ARCHITECTURES, DEFAULT_ARCHITECTURE

    parser.add_argument(
        "--architecture", choices=ARCHITECTURES, default=None if recorded else DEFAULT_ARCHITECTURE,
        help="text models: jiant (the paper's: the encoder's pooler, trained and ranked, and "
             "jiant's heads) or first-token (heads on the first token, no pooler; files that "
             "record no architecture were made by it). Image models ignore it (default: "
             f"{recorded or DEFAULT_ARCHITECTURE})")


def _common(parser: argparse.ArgumentParser, *, data: bool = True, seed_default: int | None = 0,
            seed_help: str = "seed of the head and data order",
            architecture_help: str = "") -> None:
    _task_flags(parser)
    parser.add_argument("--model", required=True,
                        help="Hugging Face name or local path (roberta-base, all-MiniLM-L6-v2) "
                             "or timm model name")
    parser.add_argument("--seed", type=int, default=seed_default, help=seed_help)
    _architecture_flag(parser, recorded=architecture_help)
    if data:
        parser.add_argument("--data", type=Path, help="prepared task folder (bayestune prepare)")
        parser.add_argument("--batch-size", type=positive_int, default=16)
        parser.add_argument("--eval-batch-size", type=positive_int, default=64)
        parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
        parser.add_argument("--gpu-slots", type=Path, default=None,
                            help="folder of GPU slot locks shared by a run's jobs: with several "
                                 "GPUs visible, auto and cuda take a free slot's GPU")
        # From the environment too: the workflow sets it outside the rules' commands, so that
        # changing it reruns nothing.
        parser.add_argument("--jobs-per-gpu", type=positive_int,
                            default=int(os.environ.get("BAYESTUNE_JOBS_PER_GPU") or 1),
                            help="with --gpu-slots: jobs that may share one GPU (default from "
                                 "$BAYESTUNE_JOBS_PER_GPU, else 1)")


def build_parser() -> argparse.ArgumentParser:
    from bayestune.finetune import FinetuneConfig
    from bayestune.methods import METHODS, LoraSettings, MethodConfig
    from bayestune.sampler import SamplerConfig

    parser = argparse.ArgumentParser(prog="bayestune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"bayestune {__version__}")
    # The workflow switches progress bars with the environment, not a flag: a flag in the
    # rules' commands would rerun every job when config key `progress` changes.
    parser.add_argument("-q", "--quiet", action="store_true",
                        default=os.environ.get("BAYESTUNE_QUIET", "") not in ("", "0"),
                        help="no progress bars (default from $BAYESTUNE_QUIET)")
    parser.add_argument("--log-every", type=nonnegative_int, metavar="N",
                        default=int(os.environ.get("BAYESTUNE_LOG_EVERY") or LOG_EVERY),
                        help="sample and finetune log a line (step, loss, ...) every N steps "
                             f"and at each validation; 0: none (default from "
                             f"$BAYESTUNE_LOG_EVERY, else {LOG_EVERY})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="read, check and tokenise a task's splits")
    _task_flags(p)
    p.add_argument("--model", required=True, help="model whose tokenizer/preprocessing to use")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=None,
                   help="local data of a built-in task (default: $BAYESTUNE_GLUE_DIR / "
                        "$BAYESTUNE_VTAB_DIR); a declared task names its own")
    p.add_argument("--max-length", type=positive_int, default=128)
    _architecture_flag(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("cut-vocabulary", help="a text model with only the tokens that tasks' "
                                              "data uses (smaller embeddings, same splits)")
    p.add_argument("--tasks", nargs="+", required=True, metavar="TASK")
    p.add_argument("--task-file", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", required=True, help="model name, alias or folder to cut")
    p.add_argument("--out-dir", type=Path, required=True, help="model folder to write")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="local task data (default: $BAYESTUNE_GLUE_DIR)")
    _architecture_flag(p)
    p.set_defaults(func=cmd_cut_vocabulary)

    p = sub.add_parser("sample", help="stage 1: SGLD sampling of the scales lambda")
    _common(p)
    p.add_argument("--out", type=Path, required=True, help="scale file to write (.safetensors)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="resumable state; an existing one is resumed from")
    p.add_argument("--allow-degenerate-scales", action="store_true",
                   help="write the scale file even when the scales are degenerate (NaN, far "
                        "above any plausible size, or all equal), which otherwise fails the job")
    p.add_argument("--diagnostics-fisher-examples", type=nonnegative_int, default=32,
                   metavar="N",
                   help="chain diagnostics: training examples of the Fisher score the posterior "
                        "mean is compared with (0: no Fisher comparison)")
    add_config_flags(p, SamplerConfig, given_only=True)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("diagnose", help="summary of scale files (with their chain diagnostics) "
                                        "and sampler checkpoints")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE",
                   help="scale file (.safetensors) or stage-1 checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--figures-dir", type=Path, default=None, metavar="DIR",
                   help="also draw lambda_traces.png (first scale file) and, across the scale "
                        "files (the seeds of one task) and --masks, seed_agreement.csv/.png")
    p.add_argument("--masks", nargs="+", type=Path, default=[], metavar="MASK",
                   help="bayestune mask files of those seeds (any budgets), for the Jaccard "
                        "overlaps in seed_agreement")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("mask", help="masks at several budgets from a selection method")
    _common(p)
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument("--budgets", type=parse_budgets, required=True, help="e.g. 0.001,0.005")
    p.add_argument("--scores", type=Path, default=None, help="scale or score file (bayestune)")
    p.add_argument("--start-out", type=Path, default=None,
                   help="where a method that trains before it ranks (magnitude) writes stage "
                        "2's start weights (default: OUT_DIR/start.safetensors)")
    p.add_argument("--out-dir", type=Path, required=True)
    add_config_flags(p, MethodConfig)
    p.set_defaults(func=cmd_mask)

    p = sub.add_parser("finetune", help="stage 2: fine-tune the masked scalars only")
    _common(p)
    p.add_argument("--mask", type=Path, default=None, help="mask file; omit for --method")
    p.add_argument("--method", default=None, choices=["full", "lora"],
                   help="without --mask: full fine-tuning (the default) or LoRA")
    p.add_argument("--start", type=Path, default=None,
                   help="weights to start from instead of theta0 (the start file `mask` writes for "
                        "magnitude); the delta stays against theta0")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--candidates", default=None,
                   help="JSON list of candidate settings trained in turn, e.g. '[{\"lr\": 1e-3}, "
                        "{\"lr\": 3e-3}]' (each may also name a \"mask\" file and its stage-1 "
                        "\"preset\"); the best on validation is kept and only it is scored on "
                        "test (default: one candidate, the flags as given)")
    add_config_flags(p, FinetuneConfig)
    add_config_flags(p, LoraSettings, prefix="lora_")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("apply-delta", help="base model + sparse delta -> fine-tuned weights")
    _common(p, data=False, seed_default=None,
            seed_help="seed of the run that wrote the delta (default: the one it records; "
                      "needed only for deltas that record none)",
            architecture_help="the one the delta records; first-token for a delta that "
                              "records none")
    p.add_argument("--delta", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="state dict to write (.safetensors)")
    p.set_defaults(func=cmd_apply_delta)

    p = sub.add_parser("report", help="score tables from metrics.json files")
    p.add_argument("--benchmark", choices=["glue", "vtab"], required=True)
    p.add_argument("--metrics", type=Path, nargs="+", required=True)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--model", default="", help="adds published rows when roberta-base")
    p.add_argument("--reference", default="bayestune",
                   help="method whose paired differences against every other are tabulated")
    p.add_argument("--main-budget", type=float, default=0.005,
                   help="budget of the reference when compared with full, lora and bitfit")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("figures", help="figures of scales, masks and scores")
    p.add_argument("--scales", type=Path, nargs="*", default=[])
    p.add_argument("--masks", type=Path, nargs="*", default=[])
    p.add_argument("--scores-csv", type=Path, default=None)
    p.add_argument("--metrics", type=Path, nargs="*", default=[],
                   help="metrics.json files: validation curves, one figure per task")
    p.add_argument("--paired-csv", type=Path, default=None,
                   help="<benchmark>_paired.csv: forest plot of the paired differences")
    p.add_argument("--out-dir", type=Path, required=True)
    p.set_defaults(func=cmd_figures)

    p = sub.add_parser("bench", help="step time and memory against plain AdamW")
    p.add_argument("--out", type=Path, default=Path("results/bench/bench.json"))
    p.add_argument("--model", default="minilm", help="minilm or roberta-base-random")
    p.add_argument("--steps", type=positive_int, default=12)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="jobs, device-hours and disk of a workflow config, before "
                                    "running it (from a Snakemake dry run)")
    p.add_argument("--configfile", required=True, help="workflow config, e.g. config/config.yaml")
    p.add_argument("--directory", type=Path, default=Path("."),
                   help="repository root holding the Snakefile (default: here)")
    p.add_argument("--costs", type=Path, default=None,
                   help="seconds per step table (default: config/costs.yaml)")
    p.add_argument("--remaining", action="store_true",
                   help="only the jobs still to run (default: the whole run)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("render-jobs", help="a workflow config's jobs as a JSON job list (from "
                                           "a Snakemake dry run), for run-jobs")
    p.add_argument("--configfile", required=True, help="workflow config, e.g. config/gpu.yaml")
    p.add_argument("--directory", type=Path, default=Path("."),
                   help="repository root holding the Snakefile (default: here)")
    p.add_argument("--out", type=Path, required=True, help="job list to write (.json)")
    p.set_defaults(func=cmd_render_jobs)

    p = sub.add_parser("carry-model", help="a text model in fp16 with its tokenizer, as a "
                                           "folder to carry to an offline machine")
    p.add_argument("--model", default="minilm", help="model name, alias or folder")
    p.add_argument("--out", type=Path, required=True, help="folder to write, e.g. .carry/minilm")
    p.set_defaults(func=cmd_carry_model)

    p = sub.add_parser("run-jobs", help="run a job list without Snakemake: dependency order, "
                                        "N at once, resumable, a log per job")
    p.add_argument("--jobs", type=Path, required=True, help="job list (bayestune render-jobs)")
    p.add_argument("--slots", type=positive_int, default=1, help="jobs run at once (they share the "
                   "device: several small jobs fill one GPU)")
    p.add_argument("--state", type=Path, default=None,
                   help="folder of the run's success markers (default: .run_jobs/<list name>)")
    p.add_argument("--summary", type=Path, default=None,
                   help="CSV of every job's wall time and seconds per step (default: in --state)")
    p.set_defaults(func=cmd_run_jobs)

    p = sub.add_parser("sweep", help="validation scores of a grid of stage-1 settings (and of "
                                     "the other methods) through mask and stage 2")
    p.add_argument("--config", type=Path, required=True, help="workflow config, e.g. "
                   "config/cpu.yaml: model, prepared data, main budget, mask and stage-2 settings")
    p.add_argument("--grid", type=Path, required=True, help="YAML list of runs (config/sweeps/)")
    p.add_argument("--out", type=Path, required=True, help="CSV of validation scores (resumed)")
    p.add_argument("--tasks", nargs="*", help="default: the config's tasks")
    p.add_argument("--seeds", nargs="*", type=int, help="default: the config's seeds")
    p.add_argument("--model", help="replace the config's model (e.g. a local folder)")
    p.add_argument("--prepared-dir", help="replace the config's prepared_dir")
    p.add_argument("--workers", type=positive_int, default=1, help="jobs run at once")
    p.add_argument("--device", default="cpu", help="cpu or cuda (workers share one GPU)")
    p.set_defaults(func=cmd_sweep)
    accept_negative_numbers([parser, *sub.choices.values()])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    started = time.time()
    if getattr(args, "device", "cpu") != "cuda":
        from bayestune.devices import keep_freed_memory

        keep_freed_memory()
    from bayestune.liveness import PARENT_GONE, watch_parent

    watched = None
    try:
        watched = watch_parent()  # a workflow's job stops when its Snakemake is gone
        if getattr(args, "gpu_slots", None) is not None:
            from bayestune.devices import assign_device

            args.device = str(assign_device(args.device, args.gpu_slots, args.jobs_per_gpu))
        args.func(args)
    except BayesTuneError as err:
        # Bad input and failed runs end with one clear line; anything else is a bug or a failure
        # of the machine (out of memory, ...) and keeps its traceback.
        print(f"bayestune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if watched is None or not PARENT_GONE.is_set():
            raise
        print(f"bayestune {args.command}: stopped: the process that started it (pid {watched}, "
              "$BAYESTUNE_WATCH_PID) is gone; rerun the workflow to go on (a sampler resumes "
              "from its checkpoint)", file=sys.stderr)
        return 130
    log.info("%s done in %.1f s", args.command, time.time() - started)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

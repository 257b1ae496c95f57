"""``bayestune mask``: masks at several budgets from one selection method (and, for a method
that trains before it ranks, the weights stage 2 starts from)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from bayestune.cli.flags import add_config_flags, config_from_args, from_args
from bayestune.commands.common import (
    RunSettings,
    declared_tasks,
    made_with,
    run_flags,
    stage_provenance,
)
from bayestune.methods import METHODS
from bayestune.methods.config import MethodConfig

HELP = "masks at several budgets from a selection method"


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    run_flags(parser)
    parser.add_argument("--method", required=True, choices=sorted(METHODS))
    parser.add_argument("--budgets", type=parse_budgets, required=True, help="e.g. 0.001,0.005")
    parser.add_argument("--scores", type=Path, default=None,
                        help="scale or score file (bayestune)")
    parser.add_argument("--start-out", type=Path, default=None,
                        help="where a method that trains before it ranks (magnitude) writes "
                             "stage 2's start weights (default: OUT_DIR/start.safetensors)")
    parser.add_argument("--out-dir", type=Path, required=True)
    add_config_flags(parser, MethodConfig)


@dataclass(frozen=True, kw_only=True)
class Settings(RunSettings):
    method: str
    budgets: list[float]
    scores: Path | None
    start_out: Path | None
    out_dir: Path
    config: MethodConfig  # the ranking options and the method's own settings


def settings(args: argparse.Namespace) -> Settings:
    return from_args(Settings, args, config=config_from_args(args, MethodConfig))


def run(settings: Settings) -> None:
    from bayestune import files
    from bayestune.guards import check_distinct
    from bayestune.masks import START_FILE_NAME, check_selects_some, mask_file_name, mask_metadata
    from bayestune.methods import (
        method_settings,
        published_differences,
        published_label,
        ranking_options,
        select_masks,
    )
    from bayestune.methods.registry import REGISTRY
    from bayestune.models.base import resolve_device, task_loss
    from bayestune.tasks import build_task_model, load_task_data

    config, method = settings.config, settings.method
    out_dir = Path(settings.out_dir)
    targets = {f"--out-dir's {mask_file_name(b)}": out_dir / mask_file_name(b)
               for b in settings.budgets}
    if REGISTRY[method].writes_start:
        targets["--start-out"] = settings.start_out or out_dir / START_FILE_NAME
    check_distinct(targets, {"--scores": settings.scores, "--data": settings.data})
    declared = declared_tasks(settings)
    model = build_task_model(settings.task, settings.model, settings.seed, declared,
                             settings.architecture)
    model.to(resolve_device(settings.device))  # the gradient methods' passes run where it sits
    scores, chain = _read_scores(settings, model) if settings.scores is not None else (None, {})
    batches = None
    if settings.data is not None:
        batches = load_task_data(settings.task, settings.data, settings.batch_size,
                                 settings.seed, settings.eval_batch_size, declared,
                                 settings.architecture).train_epoch
    masks = select_masks(method, model, batches, task_loss, settings.budgets, settings.seed,
                         config, scores=scores)
    for budget, mask in masks.items():  # here, not when fine-tuning finds nothing to train
        check_selects_some(mask, budget, per_tensor=config.per_tensor)
    options = ranking_options(method, config)
    run_record = {"task": settings.task, "seed": settings.seed, "model": model.model_id,
                  **made_with(model)}
    made_by = stage_provenance(settings, {"method": method, "mask": config,
                                          "batch_size": settings.batch_size})
    # Every file of an earlier run goes before the first new one is written, so that a run
    # killed between its writes leaves files of one run only (and the missing ones to redo).
    for path in targets.values():
        files.remove_output(path)
    described = {**options, **method_settings(config), **made_with(model)}
    for budget, mask in masks.items():
        meta = mask_metadata(mask, budget, method=method, **options, **run_record,
                             published_as=published_label(method, described),
                             published_differs=published_differences(method, described),
                             start=masks.start is not None, **method_settings(config))
        files.save_mask(out_dir / mask_file_name(budget), mask, {**meta, "upstream": chain},
                        made_by)
    if masks.start is not None:
        start_path = targets.get("--start-out", settings.start_out or out_dir / START_FILE_NAME)
        files.save_model_state(start_path, masks.start,
                               {"method": method, "start_of": "stage 2", **run_record,
                                **method_settings(config), "upstream": chain}, made_by)


def _read_scores(settings: Settings, model) -> tuple[dict, dict]:
    """The scale or score file, checked against the model; its provenance chain."""
    import logging

    from bayestune import files
    from bayestune.file_origin import check_made_for
    from bayestune.provenance import upstream

    shapes = {name: p.shape for name, p in model.named_parameters()}
    scores, score_meta = files.load_scores(settings.scores)
    # the architecture first: its message names the fix, a shape mismatch would not
    check_made_for(score_meta, settings.scores, "score", model=model.model_id,
                   architecture=model.architecture)
    files.check_matches_model(scores, shapes, settings.scores, "score")
    if score_meta.get("kind") == "scales":
        from bayestune.scale_checks import check_scale_file, weight_scale

        accepted = check_scale_file(scores, score_meta, settings.scores, weight_scale(model))
        if accepted:
            logging.getLogger("bayestune").warning(
                "%s: degenerate scales used as accepted by stage 1: %s", settings.scores,
                "; ".join(accepted))
    return scores, upstream(score_meta, "scales")

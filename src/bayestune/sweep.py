"""Choose stage-1 settings on the validation split.

A sweep runs a grid of sampler settings (and, for reference, the other mask methods) through
the same path as the workflow: stage 1 -> mask at the main budget -> stage 2, with the
workflow config's mask and fine-tuning settings. It records validation scores only, one CSV
row per (setting, task, seed), so that choosing a setting never looks at test. Rows already in
the CSV are skipped: an interrupted sweep resumes where it stopped.

The grid is a YAML file: ``runs`` is a list of ``{name, method, sampler?, mask?}``; ``sampler``
and ``mask`` override the workflow config's sections for that run.
"""

from __future__ import annotations

import concurrent.futures as futures
import logging
import multiprocessing
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from tqdm.auto import tqdm

from bayestune import files

log = logging.getLogger(__name__)

KEY = ("name", "task", "seed")
COLUMNS = (*KEY, "method", "val_score", "trainable_fraction", "n_samples", "wall_seconds")


@dataclass(frozen=True)
class SweepJob:
    name: str
    method: str
    task: str
    seed: int
    sampler: Mapping[str, Any] = field(default_factory=dict)
    mask: Mapping[str, Any] = field(default_factory=dict)


def read_yaml(path: str | Path) -> dict[str, Any]:
    with open(path) as handle:
        return yaml.safe_load(handle) or {}


LOADER_KEYS = {"batch_size", "eval_batch_size"}  # config keys that are not dataclass fields


def _check_run(run: Mapping[str, Any]) -> None:
    from bayestune.methods import METHODS, MethodConfig
    from bayestune.sampler import SamplerConfig

    name, method = run["name"], run.get("method", "bayestune")
    if method not in (*METHODS, "lora"):
        raise ValueError(f"sweep run {name!r}: unknown method {method!r}; known: "
                         f"{', '.join(sorted((*METHODS, 'lora')))}")
    for section, cls in (("sampler", SamplerConfig), ("mask", MethodConfig)):
        unknown = set(run.get(section) or {}) - {f.name for f in fields(cls)} - LOADER_KEYS
        if unknown:
            raise ValueError(f"sweep run {name!r}: unknown {section} setting(s) "
                             f"{', '.join(sorted(unknown))}; see `bayestune sample --help`")


def grid_jobs(grid: Mapping[str, Any], tasks: Sequence[str],
              seeds: Sequence[int]) -> list[SweepJob]:
    """Every (run, task, seed) of a grid, seed by seed (a sweep cut short then holds whole
    seeds); run names must be unique and settings known."""
    runs = grid.get("runs") or []
    names = [run.get("name") for run in runs]
    if not runs or None in names or len(set(names)) != len(names):
        raise ValueError("a sweep grid needs a non-empty list 'runs' of entries with unique "
                         f"'name's; got names {names}")
    for run in runs:
        _check_run(run)
    return [SweepJob(run["name"], run.get("method", "bayestune"), task, int(seed),
                     run.get("sampler") or {}, run.get("mask") or {})
            for seed in seeds for run in runs for task in tasks]


def _dataclass_part(cls: type, section: Mapping[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in section.items() if k in known})


def _scores_and_masks(job: SweepJob, config: Mapping[str, Any], device: str):
    from bayestune.methods import MethodConfig, select_masks
    from bayestune.models.base import resolve_device, task_loss
    from bayestune.sampler import SamplerConfig, sample_scales
    from bayestune.tasks import build_task_model, load_task_data

    budget = float(config["main_budget"])
    mask_section = {**config.get("mask", {}), **job.mask}
    if job.method in ("full", "lora"):
        return None, 0
    model = build_task_model(job.task, config["model"], job.seed)
    scores, n_samples = None, 0
    if job.method == "bayestune":
        section = {**config.get("sampler", {}), **job.sampler}
        data = load_task_data(job.task, Path(config["prepared_dir"]) / job.task,
                              int(section.get("batch_size", 16)), job.seed)
        result = sample_scales(model, data.train_epoch, task_loss,
                               _dataclass_part(SamplerConfig, section), seed=job.seed,
                               device=device, progress=False)
        scores, n_samples = result.mean, result.n_samples
        model = build_task_model(job.task, config["model"], job.seed)  # stage 1 moved theta
    data = load_task_data(job.task, Path(config["prepared_dir"]) / job.task,
                          int(mask_section.get("batch_size", 16)), job.seed)
    masks = select_masks(job.method, model.to(resolve_device(device)), data.train_epoch,
                         task_loss, [budget], job.seed, _dataclass_part(MethodConfig, mask_section),
                         scores=scores)
    return {name: m.cpu() for name, m in masks[budget].items()}, n_samples


def run_job(job: SweepJob, config: Mapping[str, Any], device: str) -> dict[str, Any]:
    """Stage 1 (bayestune) or the method's ranking, mask, stage 2; the validation score."""
    from bayestune.finetune import FinetuneConfig, finetune
    from bayestune.methods import LoraSettings, wrap_lora
    from bayestune.tasks import build_task_model, get_task, load_task_data

    start = time.perf_counter()
    mask, n_samples = _scores_and_masks(job, config, device)
    section = {**config.get("finetune", {}),
               **config.get("finetune_by_method", {}).get(job.method, {})}
    model = build_task_model(job.task, config["model"], job.seed)
    if job.method == "lora":
        model = wrap_lora(model, _dataclass_part(LoraSettings, config.get("lora", {})))
    data = load_task_data(job.task, Path(config["prepared_dir"]) / job.task,
                          int(section.get("batch_size", 16)), job.seed)
    result = finetune(model, data, get_task(job.task), _dataclass_part(FinetuneConfig, section),
                      mask=mask, seed=job.seed, device=device, progress=False)
    return {"name": job.name, "task": job.task, "seed": job.seed, "method": job.method,
            "val_score": result.val_score, "trainable_fraction": result.trainable_fraction,
            "n_samples": n_samples, "wall_seconds": round(time.perf_counter() - start, 2)}


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # the workers share the machine's cores


def _done(out: Path) -> set[tuple]:
    if not out.exists():
        return set()
    table = pd.read_csv(out)
    return {(r.name, r.task, int(r.seed)) for r in table.itertuples()}


def _attempt(function, job: SweepJob, *args) -> dict[str, Any] | BaseException:
    try:
        return function(job, *args)
    except Exception as error:  # one failed setting must not stop the grid
        return error


def _record(results, out: Path, total: int) -> None:
    for job, row in tqdm(results, total=total, desc="sweep"):
        if isinstance(row, BaseException):
            log.error("sweep job %s/%s/seed%d failed: %s", job.name, job.task, job.seed, row)
        else:
            files.append_csv_row(out, row, COLUMNS)


def run_sweep(config: Mapping[str, Any], jobs: Sequence[SweepJob], out: str | Path, *,
              device: str = "cpu", workers: int = 1) -> pd.DataFrame:
    """Run the jobs not yet in ``out`` (a CSV, appended row by row); return the whole table."""
    out = Path(out)
    done = _done(out)
    todo = [j for j in jobs if (j.name, j.task, j.seed) not in done]
    log.info("sweep: %d jobs, %d already in %s", len(jobs), len(jobs) - len(todo), out)
    if workers <= 1:  # in this process: simplest to debug
        results = ((job, _attempt(run_job, job, config, device)) for job in todo)
        _record(results, out, len(todo))
    else:
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        with futures.ProcessPoolExecutor(workers, mp_context=context,
                                         initializer=_worker_init) as pool:
            pending = {pool.submit(_attempt, run_job, job, config, device): job for job in todo}
            _record(((pending[f], f.result()) for f in futures.as_completed(pending)), out,
                    len(todo))
    return pd.read_csv(out) if out.exists() else pd.DataFrame(columns=COLUMNS)


def complete_seeds(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the seeds that every run finished for every task (all rows if none did)."""
    expected = table["name"].nunique() * table["task"].nunique()
    per_seed = table.groupby("seed").apply(lambda rows: len(rows.drop_duplicates(["name", "task"])),
                                           include_groups=False)
    seeds = per_seed[per_seed == expected].index
    return table[table["seed"].isin(seeds)] if len(seeds) else table


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean validation score (x100) per run and task, their average, sorted best first."""
    table = table.assign(task=table["task"].astype(str))
    per_task = table.pivot_table(index="name", columns="task", values="val_score",
                                 aggfunc="mean") * 100
    counts = table.groupby("name")["seed"].nunique().rename("seeds")
    summary = per_task.assign(avg=per_task.mean(axis=1)).join(counts)
    return summary.sort_values("avg", ascending=False).round(2)


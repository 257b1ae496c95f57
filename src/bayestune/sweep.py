"""Choose stage-1 settings on the validation split.

A sweep runs a grid of sampler settings (and, for reference, the other mask methods) through
the same path as the workflow: stage 1 -> mask at the main budget -> stage 2, with the
workflow config's mask and fine-tuning settings. It records validation scores only, one CSV
row per (setting, task, seed), so that choosing a setting never looks at test. Rows already in
the CSV are skipped: an interrupted sweep resumes where it stopped.

The grid is a YAML file: ``runs`` is a list of ``{name, method, sampler?, mask?}``; ``sampler``
and ``mask`` override the workflow config's sections for that run. Those sections are resolved
for each job as the workflow resolves them (:func:`bayestune.settings.resolve`: the sampler's
``sampler_by_preset`` and ``sampler_by_seed``, the methods' ``mask_by_method`` and
``finetune_by_method``), the run's own settings on top.
"""

from __future__ import annotations

import concurrent.futures as futures
import copy
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
from bayestune.errors import ConfigError
from bayestune.settings import from_section, preset_of, resolve

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
        raise ConfigError(f"sweep run {name!r}: unknown method {method!r}; known: "
                          f"{', '.join(sorted((*METHODS, 'lora')))}")
    for section, cls in (("sampler", SamplerConfig), ("mask", MethodConfig)):
        unknown = set(run.get(section) or {}) - {f.name for f in fields(cls)} - LOADER_KEYS
        if unknown:
            raise ConfigError(f"sweep run {name!r}: unknown {section} setting(s) "
                              f"{', '.join(sorted(unknown))}; see `bayestune sample --help`")


def grid_jobs(grid: Mapping[str, Any], tasks: Sequence[str],
              seeds: Sequence[int]) -> list[SweepJob]:
    """Every (run, task, seed) of a grid, seed by seed (a sweep cut short then holds whole
    seeds); run names must be unique and settings known."""
    runs = grid.get("runs") or []
    names = [run.get("name") for run in runs]
    if not runs or None in names or len(set(names)) != len(names):
        raise ConfigError("a sweep grid needs a non-empty list 'runs' of entries with unique "
                          f"'name's; got names {names}")
    for run in runs:
        _check_run(run)
    return [SweepJob(run["name"], run.get("method", "bayestune"), task, int(seed),
                     run.get("sampler") or {}, run.get("mask") or {})
            for seed in seeds for run in runs for task in tasks]


def architecture_of(config: Mapping[str, Any]) -> str:
    """The config's text-model architecture (key ``architecture``; the package default)."""
    from bayestune.models.base import DEFAULT_ARCHITECTURE

    return str(config.get("architecture") or DEFAULT_ARCHITECTURE)


def stage1_settings(config: Mapping[str, Any], job: SweepJob) -> dict[str, Any]:
    """The sampler section a bayestune job runs with: the config's, resolved for the job's
    stage-1 preset (the run's, else the config's) and seed as the workflow's sample rule
    resolves it, with the run's own settings on top."""
    preset = job.sampler.get("preset") or preset_of(config)
    return {**resolve(config, "sampler", preset=preset, seed=job.seed), **job.sampler}


def stage1_config(config: Mapping[str, Any], job: SweepJob):
    """:func:`stage1_settings` as the sampler's config (a SamplerConfig)."""
    from bayestune.sampler.config import sampler_config_from_section

    return sampler_config_from_section(stage1_settings(config, job))


def _task_data_cache(job: SweepJob, config: Mapping[str, Any], declared: Mapping[str, Any]):
    """Task data by loader setting: the stages of a job share one load when their batch sizes
    agree (``train_epoch(e)`` yields the same batches however often it is called)."""
    from bayestune.tasks import load_task_data

    loaded: dict[tuple[int, int], Any] = {}

    def data(section: Mapping[str, Any]):
        sizes = (int(section.get("batch_size", 16)), int(section.get("eval_batch_size", 64)))
        if sizes not in loaded:
            loaded[sizes] = load_task_data(job.task, Path(config["prepared_dir"]) / job.task,
                                           sizes[0], job.seed, sizes[1], declared,
                                           architecture_of(config))
        return loaded[sizes]
    return data


def _mask(job: SweepJob, config: Mapping[str, Any], model, data, device: str, spec):
    """The job's mask at the main budget (None for full and lora) and the number of lambda
    samples behind it. Stage 1 runs on a copy: ``model`` stays at theta0 for stage 2."""
    from bayestune.methods import MethodConfig, select_masks
    from bayestune.models.base import resolve_device, task_loss
    from bayestune.sampler.run import sample_scales
    from bayestune.tasks.base import val_scorer

    if job.method in ("full", "lora"):
        return None, 0
    scores, n_samples = None, 0
    if job.method == "bayestune":
        section = stage1_settings(config, job)
        sampler = stage1_config(config, job)
        loaded = data(section)
        validate = (val_scorer(loaded, spec, sampler.val_subset,
                               resolve_device(device)) if sampler.patience > 0 else None)
        result = sample_scales(copy.deepcopy(model), loaded.train_epoch, task_loss, sampler,
                               seed=job.seed, device=device, progress=False,
                               steps_per_epoch=len(loaded.train), validate=validate,
                               train_size=len(loaded.train.dataset))
        scores, n_samples = result.mean, result.n_samples
    section = {**resolve(config, "mask", method=job.method), **job.mask}
    budget = float(config["main_budget"])
    masks = select_masks(job.method, model.to(resolve_device(device)), data(section).train_epoch,
                         task_loss, [budget], job.seed, from_section(MethodConfig, section),
                         scores=scores)
    if masks.start is not None:  # magnitude: stage 2 goes on from the weights it ranked
        model.load_state_dict(masks.start, strict=False)
    return {name: m.cpu() for name, m in masks[budget].items()}, n_samples


def run_job(job: SweepJob, config: Mapping[str, Any], device: str) -> dict[str, Any]:
    """Stage 1 (bayestune) or the method's ranking, mask, stage 2; the validation score."""
    from bayestune.finetune import FinetuneConfig, finetune
    from bayestune.methods import LoraSettings, wrap_lora
    from bayestune.tasks import build_task_model, get_task
    from bayestune.tasks.custom import parse_custom_tasks

    start = time.perf_counter()
    declared = parse_custom_tasks(config.get("custom_tasks"))
    spec = get_task(job.task, declared)
    data = _task_data_cache(job, config, declared)
    model = build_task_model(job.task, config["model"], job.seed, declared,
                             architecture_of(config))
    mask, n_samples = _mask(job, config, model, data, device, spec)
    section = resolve(config, "finetune", method=job.method)
    if job.method == "lora":
        model = wrap_lora(model, from_section(LoraSettings, resolve(config, "lora")))
    result = finetune(model, data(section), spec,
                      from_section(FinetuneConfig, section), mask=mask, seed=job.seed,
                      device=device, progress=False)
    return {"name": job.name, "task": job.task, "seed": job.seed, "method": job.method,
            "val_score": result.val_score, "trainable_fraction": result.trainable_fraction,
            "n_samples": n_samples, "wall_seconds": round(time.perf_counter() - start, 2)}


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # the workers share the machine's cores


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
    done = {(r.name, r.task, int(r.seed))
            for r in files.read_csv_table(out, COLUMNS).itertuples()}
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
    return files.read_csv_table(out, COLUMNS)


def complete_seeds(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the seeds that every run finished for every task (all rows if none did)."""
    expected = table["name"].nunique() * table["task"].nunique()
    per_seed = table.drop_duplicates(list(KEY)).groupby("seed").size()
    seeds = per_seed[per_seed == expected].index
    return table[table["seed"].isin(seeds)] if len(seeds) else table


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean validation score (x100) per run and task, their average, sorted best first."""
    per_task = table.pivot_table(index="name", columns="task", values="val_score",
                                 aggfunc="mean") * 100
    counts = table.groupby("name")["seed"].nunique().rename("seeds")
    summary = per_task.assign(avg=per_task.mean(axis=1)).join(counts)
    return summary.sort_values("avg", ascending=False).round(2)


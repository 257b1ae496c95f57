"""``bayestune plan``: what a workflow config costs before it runs.

The jobs come from Snakemake itself: a dry run of the workflow with the config (``snakemake -n
-p --forceall``, from the repository root) lists every job with its outputs and the exact
``bayestune`` command it would run, so the plan follows the rules as they are. Each command is
parsed into the settings it would run with by the real command line
(:func:`bayestune.cli.parse_command`); its steps (sampler steps, fine-tuning ``max_steps``, the
baselines' scoring steps) times the measured seconds per step (``config/costs.yaml``) give
device-hours, and the file formats with the model's shapes give the disk of every output.
``dvc.yaml`` says which outputs DVC also copies into its cache.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from bayestune import sizes
from bayestune.errors import ConfigError
from bayestune.settings import resolve

VISION_TOKENS = 197  # ViT-B/16 at 224 px: 14 x 14 patches and the class token
# Scoring steps of the gradient-based mask methods, in AdamW-step equivalents: the option
# that counts them and how many forward-backward passes each costs. Each of fisher's examples
# is a pass of its own (batch size 1), counted as a whole step: an upper bound.
SCORING_STEPS = {"magnitude": ("magnitude_steps", 1), "lt-sft": ("lt_sft_steps", 1),
                 "fisher": ("fisher_examples", 1), "sam": ("sam_steps", 1)}


class PlanError(ConfigError):
    """The plan cannot be made: no workflow here, a failed dry run, no cost for the model."""


@dataclass
class DryRunJob:
    rule: str
    outputs: list[str] = field(default_factory=list)
    wildcards: dict[str, str] = field(default_factory=dict)
    command: list[str] | None = None  # argv after ``bayestune``
    inputs: list[str] = field(default_factory=list)
    log: str | None = None
    threads: int = 1


@dataclass
class PlannedFile:
    path: str
    kind: str
    bytes: int
    cached: bool = False


@dataclass
class PlannedJob:
    rule: str
    command: list[str] | None = None  # argv after ``bayestune``
    steps: int = 0
    hours: float = 0.0
    files: list[PlannedFile] = field(default_factory=list)
    threads: int = 1


@dataclass
class Plan:
    configfile: str
    device: str
    model: str
    n_scalars: int
    job_counts: dict[str, int]
    jobs: list[PlannedJob]
    notes: list[str]
    dvc_stage: str | None
    uncached_outs: list[str]
    checkpoint_bytes: int
    running_stats_bytes: int
    jobs_per_gpu: int

    def by_rule(self) -> pd.DataFrame:
        rows = defaultdict(lambda: {"steps": 0, "hours": 0.0, "results": 0, "cache": 0})
        for job in self.jobs:
            row = rows[job.rule]
            row["steps"] += job.steps
            row["hours"] += job.hours
            row["results"] += sum(f.bytes for f in job.files)
            row["cache"] += sum(f.bytes for f in job.files if f.cached)
        return pd.DataFrame([{"rule": rule, "jobs": count, **rows[rule]}
                             for rule, count in self.job_counts.items() if rule != "total"])

    def by_kind(self) -> pd.DataFrame:
        rows = defaultdict(lambda: {"files": 0, "results": 0, "cache": 0})
        for f in (f for job in self.jobs for f in job.files):
            rows[f.kind]["files"] += 1
            rows[f.kind]["results"] += f.bytes
            rows[f.kind]["cache"] += f.bytes if f.cached else 0
        return pd.DataFrame([{"kind": kind, **row} for kind, row in rows.items()])

    def wall_hours(self, cores: int) -> float:
        """Hours on ``cores`` cores with the jobs packed by their threads: a lower bound."""
        return sum(job.hours * job.threads for job in self.jobs) / cores

    @property
    def cache_bytes(self) -> int:
        return sum(f.bytes for job in self.jobs for f in job.files if f.cached)


# --- the dry run --------------------------------------------------------------------------------
def dry_run(configfile: str, root: Path, remaining: bool = False) -> tuple[dict[str, int],
                                                                          list[DryRunJob]]:
    """Job counts per rule ("Job stats") and every job of ``snakemake -n -p`` on ``configfile``."""
    command = [sys.executable, "-m", "snakemake", "-n", "-p", "--nolock", "--cores", "1",
               "--configfile", configfile]
    if not remaining:
        command.append("--forceall")
    env = {k: v for k, v in os.environ.items() if k != "SNAKEMAKE_PROFILE"}
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env)
    output = result.stdout + "\n" + result.stderr
    if result.returncode != 0:
        raise PlanError(f"snakemake dry run of {configfile} failed: "
                        f"{result.stderr.strip()[-2000:] or result.stdout.strip()[-2000:]}")
    return parse_job_stats(output), parse_jobs(output)


def parse_job_stats(output: str) -> dict[str, int]:
    """The "Job stats" table of a dry run: rule -> jobs, and "total" (empty: nothing to do)."""
    if "Job stats:" not in output:
        return {}
    counts = {}
    for line in output.split("Job stats:", 1)[1].splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


_RULE = re.compile(r"^(?:local)?rule (\S+):$")
_FIELD = re.compile(r"^\s+(input|output|log|wildcards): (.*)$")
_THREADS = re.compile(r"\bOMP_NUM_THREADS=(\d+)\b")


def parse_jobs(output: str) -> list[DryRunJob]:
    jobs: list[DryRunJob] = []
    for line in output.splitlines():
        if match := _RULE.match(line):
            jobs.append(DryRunJob(rule=match.group(1)))
        elif jobs and (match := _FIELD.match(line)):
            items = [item.strip() for item in match.group(2).split(", ")]
            if match.group(1) == "output":
                jobs[-1].outputs = items
            elif match.group(1) == "input":
                jobs[-1].inputs = items
            elif match.group(1) == "log":
                jobs[-1].log = items[0]
            else:
                jobs[-1].wildcards = dict(item.split("=", 1) for item in items if "=" in item)
        elif jobs and line.startswith("Shell command: "):
            jobs[-1].command = bayestune_argv(line.removeprefix("Shell command: "))
            if threads := _THREADS.search(line):
                jobs[-1].threads = int(threads.group(1))
    return jobs


def bayestune_argv(shell: str) -> list[str] | None:
    """The arguments after ``bayestune`` in a rule's shell command (None: not a bayestune call)."""
    try:
        argv = shlex.split(shell.split(" > ", 1)[0])
    except ValueError:
        return None
    if "bayestune" not in argv:
        return None
    argv = argv[argv.index("bayestune") + 1:]
    return [a for a in argv if a not in ("-q", "--quiet")]


# --- costs --------------------------------------------------------------------------------------
@dataclass
class StepCosts:
    """Seconds per step of each kind for this run's model, device and batch shape."""

    seconds: dict[str, float]
    note: str

    def hours(self, kind: str, steps: int, batch_size: int, tokens: int,
              reference: dict) -> float:
        scale = batch_size * tokens / (reference["batch_size"] * reference["tokens"])
        return self.seconds[kind] * steps * scale / 3600


def step_costs(costs: dict, model: str, device: str, n_scalars: int) -> StepCosts:
    entry = sizes.known_model(model, costs["models"])
    measured = (entry or {}).get("seconds_per_step", {}).get(device)
    if measured:
        return StepCosts(dict(measured), f"measured for {model} on {device}")
    for name, other in costs["models"].items():
        seconds = other.get("seconds_per_step", {}).get(device)
        if seconds and other.get("scalars"):
            ratio = n_scalars / other["scalars"]
            return StepCosts({k: v * ratio for k, v in seconds.items()},
                             f"no measurement for {model} on {device}: {name}'s, scaled by "
                             f"scalar count (x{ratio:.2f})")
    raise PlanError(f"config/costs.yaml has no step cost on {device} for any model; measure one "
                    f"with bayestune bench --device {device} and add it")


def job_steps(command: str, settings: Any) -> list[tuple[str, int]]:
    """(kind of step, steps) that one bayestune command runs, from its settings."""
    if command == "sample":
        config = settings.sampler  # the preset with the flags on top
        return [("stage1", config.steps if config.patience == 0 else config.shortest_run)]
    if command == "finetune":
        # every candidate of the fair protocol trains in turn in the one job
        steps = 0
        for candidate in settings.candidates:
            most, least = (candidate.get(k, getattr(settings.finetune, k))
                           for k in ("max_steps", "min_steps"))
            steps += most or least + 1  # no cap: the least the run can take
        return [("stage2" if settings.mask is not None else "adamw", steps)]
    if command == "mask" and settings.method in SCORING_STEPS:
        option, passes = SCORING_STEPS[settings.method]
        return [("adamw", getattr(settings.config, option) * passes)]
    return []


# --- disk ---------------------------------------------------------------------------------------
def dvc_outs(root: Path, configfile: str) -> tuple[str | None, list[tuple[str, bool]]]:
    """The dvc.yaml stage that runs ``configfile`` and its outputs as (path, cached)."""
    path = root / "dvc.yaml"
    if not path.is_file():
        return None, []
    wanted = os.path.normpath(os.path.relpath(Path(root, configfile), root))
    for name, stage in (yaml.safe_load(path.read_text()).get("stages") or {}).items():
        body = stage.get("do", stage)
        for key, item in (stage.get("foreach") or {None: {}}).items():
            def fill(text: str, item=item) -> str:
                return re.sub(r"\$\{item\.(\w+)\}", lambda m: str(item[m.group(1)]), text)

            argv = shlex.split(fill(body.get("cmd", "")))
            if "--configfile" not in argv or argv.index("--configfile") + 1 >= len(argv):
                continue
            if os.path.normpath(argv[argv.index("--configfile") + 1]) != wanted:
                continue
            outs = []
            for out in body.get("outs", []):
                out_path, options = next(iter(out.items())) if isinstance(out, dict) else (out, {})
                outs.append((fill(out_path).rstrip("/"), (options or {}).get("cache", True)))
            return (name if key is None else f"{name}@{key}"), outs
    return None, []


def _under(path: str, out: str) -> bool:
    return path == out or path.startswith(out + "/")


class _FileSizes:
    """Bytes of each output of one job, by the command that writes it."""

    def __init__(self, shapes: sizes.Shapes, max_length: int, benchmark: str):
        self.shapes, self.max_length, self.benchmark = shapes, max_length, benchmark
        self.unsized_tasks: list[str] = []  # no local copy of their data to count rows in

    def files(self, job: DryRunJob, parsed: tuple[str, Any] | None) -> list[PlannedFile]:
        if parsed is None:
            return [PlannedFile(p, "tables and figures", sizes.SMALL_FILE_BYTES)
                    for p in job.outputs]
        command, args = parsed
        if command == "prepare" and self.benchmark == "vtab":  # image lists, no pixels
            return [PlannedFile(p, "prepared data", sizes.SMALL_FILE_BYTES) for p in job.outputs]
        if command == "prepare":
            size = sizes.prepared_bytes(args.data_dir and str(args.data_dir), args.task,
                                        self.max_length)
            if size is None:
                self.unsized_tasks.append(args.task)
            return [PlannedFile(p, "prepared data", size or 0) for p in job.outputs]
        if command == "sample":  # the scale file, then its small diagnostics sidecars
            return [PlannedFile(p, "scale files", sizes.scale_file_bytes(self.shapes))
                    if Path(p) == Path(args.out)
                    else PlannedFile(p, "chain diagnostics", sizes.SMALL_FILE_BYTES)
                    for p in job.outputs]
        if command == "mask":
            return [self._mask(p, args) for p in job.outputs]
        if command == "finetune":
            return [self._finetune(p, args, job) for p in job.outputs]
        return [PlannedFile(p, "tables and figures", sizes.SMALL_FILE_BYTES) for p in job.outputs]

    def _mask(self, path: str, args: Any) -> PlannedFile:
        from bayestune.masks import START_FILE_NAME
        from bayestune.methods import ranking_options

        start = args.start_out or Path(args.out_dir) / START_FILE_NAME
        if Path(path) == Path(start):  # magnitude's start weights: a whole model
            return PlannedFile(path, "start weights", sizes.delta_file_bytes(
                self.shapes, sizes.full_changes(self.shapes)))
        budget = _budget_of(path)
        keep_head = ranking_options(args.method, args.config)["keep_head"]
        selected = sizes.selected_counts(self.shapes, args.method, budget, keep_head)
        return PlannedFile(path, "masks", sizes.mask_file_bytes(self.shapes, selected))

    def _finetune(self, path: str, args: Any, job: DryRunJob) -> PlannedFile:
        if not path.endswith(".safetensors"):
            return PlannedFile(path, "metrics", sizes.METRICS_BYTES)
        if args.mask is not None and args.start is not None:  # the start moved everything
            changed, kind = sizes.full_changes(self.shapes), "deltas, masked"
        elif args.mask is not None:
            method = job.wildcards.get("method", "")
            changed = sizes.selected_counts(self.shapes, method, _budget_of(str(args.mask)))
            kind = "deltas, masked"
        elif args.lora is not None:
            lora = args.lora.resolved()
            changed = sizes.lora_changes(self.shapes, str(lora["target_modules"]),
                                         bool(lora["train_head"]))
            kind = "deltas, lora"
        else:
            changed = sizes.full_changes(self.shapes)
            kind = "deltas, full"
        return PlannedFile(path, kind, sizes.delta_file_bytes(self.shapes, changed))


def _budget_of(mask_path: str) -> float:
    stem = Path(mask_path).stem  # p0.005: the package's mask file name (masks.mask_file_name)
    try:
        return float(stem.removeprefix("p"))
    except ValueError as err:
        raise PlanError(f"cannot read a budget from mask file {mask_path}") from err


# --- the plan -----------------------------------------------------------------------------------
def read_config(root: Path, configfile: str) -> dict:
    """The config with the schema's top-level defaults filled in, as Snakemake validates it."""
    config = yaml.safe_load(Path(root, configfile).read_text()) or {}
    schema_path = root / "workflow/schemas/config.schema.yaml"
    if schema_path.is_file():
        schema = yaml.safe_load(schema_path.read_text())
        for key, spec in schema.get("properties", {}).items():
            if "default" in spec:
                config.setdefault(key, spec["default"])
    return config


def make_plan(configfile: str, root: str | os.PathLike[str] = ".", *,
              costs_file: str | os.PathLike[str] | None = None,
              remaining: bool = False) -> Plan:
    from bayestune.cli import build_parser

    root = Path(root).resolve()
    if not (root / "Snakefile").is_file():
        raise PlanError(f"no Snakefile in {root}: run bayestune plan from the "
                        "repository root (or give --directory)")
    if not Path(root, configfile).is_file():
        raise PlanError(f"{configfile}: no such config file (paths are relative to {root})")
    config = read_config(root, configfile)
    costs_path = Path(costs_file) if costs_file else root / "config/costs.yaml"
    if not costs_path.is_file():
        raise PlanError(f"{costs_path}: no cost table; give one with --costs")
    costs = yaml.safe_load(costs_path.read_text())
    device = "cpu" if config.get("device") == "cpu" else "cuda"
    benchmark = config.get("benchmark", "glue")
    shapes, shapes_note = sizes.model_shapes(config["model"], benchmark, costs["models"],
                                             config.get("architecture") or "jiant")
    if config.get("model_vocabulary") == "tasks" and benchmark != "vtab":
        shapes, shapes_note = sizes.vocabulary_cut_shapes(root, config, shapes, shapes_note)
    n_scalars = sum(sizes.numel(s) for s in shapes.values())
    per_step = step_costs(costs, config["model"], device, n_scalars)
    tokens = VISION_TOKENS if benchmark == "vtab" else int(config["max_length"])
    notes = [f"model {config['model']}: {n_scalars / 1e6:.1f}M scalars ({shapes_note})",
             f"seconds per step {per_step.note} at batch {costs['reference']['batch_size']} x "
             f"{costs['reference']['tokens']} tokens, scaled linearly to each job's batch x "
             f"{tokens} tokens"]

    counts, dry_jobs = dry_run(configfile, root, remaining)
    stage, outs = dvc_outs(root, configfile)
    parser = build_parser()
    file_sizes = _FileSizes(shapes, int(config["max_length"]), benchmark)
    jobs, samplers = [], []
    for dry in dry_jobs:
        parsed = _parse(parser, dry)
        if parsed is not None and parsed[0] == "sample":  # its chain as the job resolves it
            samplers.append(dataclasses.asdict(parsed[1].sampler))
        job = PlannedJob(rule=dry.rule, command=dry.command, files=file_sizes.files(dry, parsed),
                         threads=dry.threads)
        for kind, steps in job_steps(*parsed) if parsed is not None else []:
            job.steps += steps
            job.hours += per_step.hours(kind, steps, parsed[1].batch_size, tokens,
                                        costs["reference"])
        for f in job.files:
            f.cached = any(cached and _under(f.path, out) for out, cached in outs)
        jobs.append(job)
    if file_sizes.unsized_tasks:
        notes.append(f"prepared data not estimated (no local copy to count rows in): "
                     f"{', '.join(sorted(file_sizes.unsized_tasks))}")
    model = sizes.model_bytes(shapes)
    # the largest stage-1 job: each sample job's settings (preset, sampler_by_preset,
    # sampler_by_seed resolved); the config's own section when none is left to run
    samplers = samplers or [resolve(config, "sampler")]
    return Plan(configfile=configfile, device=device, model=config["model"], n_scalars=n_scalars,
                job_counts=counts, jobs=jobs, notes=notes, dvc_stage=stage,
                uncached_outs=[out for out, cached in outs if not cached],
                checkpoint_bytes=int(max(map(sizes.checkpoint_models, samplers)) * model),
                running_stats_bytes=max(map(sizes.running_stats_models, samplers)) * model,
                jobs_per_gpu=int(config.get("jobs_per_gpu", 1)))


def _parse(parser, job: DryRunJob) -> tuple[str, Any] | None:
    """(subcommand, settings) of a job's command, as the command line resolves them."""
    from bayestune.cli import parse_command

    if job.command is None:
        return None
    try:
        return parse_command(job.command, parser)
    except SystemExit as err:
        raise PlanError(f"rule {job.rule}: its command does not parse with this bayestune: "
                        f"{shlex.join(job.command)}") from err


# --- printing -----------------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_plan(plan: Plan) -> str:
    unit = "GPU-hours" if plan.device == "cuda" else "CPU-hours"
    total_jobs = plan.job_counts.get("total", 0)
    lines = [f"plan for {plan.configfile}: {total_jobs} jobs (snakemake dry run)"]
    lines += [f"  {note}" for note in plan.notes]
    if not plan.jobs:
        return "\n".join([*lines, "nothing to run"])
    table = plan.by_rule()
    table.loc[len(table)] = {"rule": "total", "jobs": total_jobs, "steps": table.steps.sum(),
                             "hours": table.hours.sum(), "results": table.results.sum(),
                             "cache": table.cache.sum()}
    lines += ["", _show(table.rename(columns={"hours": unit}), unit)]
    kinds = plan.by_kind().sort_values("results", ascending=False)
    lines += ["", "disk by kind of file:", _show(kinds, unit)]
    cache = "DVC cache"
    if plan.dvc_stage is None:
        lines.append(f"{cache}: no stage of dvc.yaml runs this config (snakemake only)")
    else:
        lines.append(f"{cache}: stage {plan.dvc_stage} copies its cached outputs into "
                     ".dvc/cache beside the results (unless cache.type links them)"
                     + (f"; tracked, not cached: {', '.join(plan.uncached_outs)}"
                        if plan.uncached_outs else ""))
    if plan.job_counts.get("sample"):
        lines.append(f"stage 1 scratch per running sample job: checkpoint up to "
                     f"{human_bytes(plan.checkpoint_bytes)} (removed at the end), running "
                     f"statistics {human_bytes(plan.running_stats_bytes)} in the temporary folder")
    lines.append("not counted: evaluation passes (unless the measured cost includes them: "
                 "config/costs.yaml says), job start-up, early stopping (max_steps is an upper "
                 "bound; a run stopped by early stopping alone, as the reference preset and "
                 "schedule, is counted at its least length, min_steps + 1), logs; LoRA counted "
                 "as AdamW steps")
    if plan.device == "cpu":
        cores = os.cpu_count() or 1
        lines.append(f"wall time on this machine's {cores} cores, jobs packed by their threads "
                     f"(a lower bound): {plan.wall_hours(cores) * 60:.0f} min")
    elif plan.device == "cuda":
        lines.append(f"local run on a machine with G GPUs: snakemake --cores all --resources "
                     f"gpu=<G x {plan.jobs_per_gpu}> (jobs_per_gpu {plan.jobs_per_gpu})")
    return "\n".join(lines)


def _show(table: pd.DataFrame, unit: str) -> str:
    shown = table.copy()
    for column in ("results", "cache"):
        shown[column] = shown[column].map(human_bytes)
    shown = shown.rename(columns={"cache": "DVC cache"})
    formatters = {unit: "{:.2f}".format} if unit in shown else {}
    return shown.to_string(index=False, formatters=formatters)

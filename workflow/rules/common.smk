"""Paths, input functions and command-line flags shared by every rule file.

All knowledge of the file layout lives here, so the rule files only wire files to
`bayestune` subcommands:

    {prepared_dir}/{task}/                                       prepared task data
    {results_dir}/scales/{preset}/{task}/seed{S}.safetensors     posterior-mean lambda
    {results_dir}/scales/{preset}/{task}/seed{S}.ckpt            sampler checkpoint (resume)
        (or under scales_dir, when the run borrows another run's chains)
    {results_dir}/masks/{method}/{task}/seed{S}/p{budget}.safetensors
    {results_dir}/masks/bayestune/{preset}/{task}/seed{S}/p{budget}.safetensors
    {results_dir}/finetune/{method}/{task}/{label}/seed{S}/{metrics.json,delta.safetensors}
    {results_dir}/{benchmark}_scores.csv, _table.csv, _table.md, _paired.csv, figures/

{preset} is a stage-1 preset: the sampler's own, and every other one a candidate of the `tuning`
grid names (bayestune.selection). {label} is p{budget} for mask methods (bitfit's fixed mask is filed under main_budget),
`all` for full fine-tuning and `lora` for LoRA.

Tasks declared under `custom_tasks` reach the command line as `--task-file <the config file>`;
their declaration is a param of every rule that reads it, so an edit reruns those jobs.
"""

import functools
import json
import os
import re
import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod

from bayestune.masks import mask_file_name
from bayestune.methods.registry import BUDGETED as _BUDGETED, FIXED as _FIXED, REGISTRY
from bayestune.provenance import folder_fingerprint, job_code_hash
from bayestune.settings import preset_of as config_preset, resolve, to_flags
from bayestune.selection import (
    MASK_KEY, PRESET_KEY, candidate_presets, check_equal_counts, method_grid,
)
from bayestune.tasks import check_task_names
from bayestune.tasks.base import TaskError
from bayestune.tasks.custom import parse_custom_tasks, read_task_file

RES = config["results_dir"].rstrip("/")
# scales_dir: read the stage-1 chains another run made (its results_dir's scales/) instead of
# sampling them again; this run then has no sample job and never writes that folder.
SCALES = (config.get("scales_dir") or f"{RES}/scales").rstrip("/")
BORROWED_SCALES = SCALES != f"{RES}/scales"
PREP = config["prepared_dir"].rstrip("/")
BENCH = config["benchmark"]
TASKS = list(config["tasks"])
SEEDS = list(config["seeds"])
# The seeds with a stage-1 chain (config key sampler_seeds): stage 2's i-th seed ranks its
# bayestune mask with the chain of CHAIN_SEEDS[i mod n].
CHAIN_SEEDS = list(config.get("sampler_seeds") or SEEDS)


if not set(CHAIN_SEEDS) <= set(SEEDS):
    raise WorkflowError(f"sampler_seeds {CHAIN_SEEDS} must be among seeds {SEEDS}: a stage-1 "
                        "chain's seed is also the seed of a stage-2 run")


def chain_seed(seed):
    return CHAIN_SEEDS[SEEDS.index(int(seed)) % len(CHAIN_SEEDS)]


BUDGETS = list(config["budgets"])
MAIN_BUDGET = config["main_budget"]
METHODS = list(config["methods"])
# The model every job reads: the config's, or its cut to the tokens of the run's tasks (config
# key model_vocabulary), which rule cut_vocabulary writes once.
CUT_MODEL = f"{PREP}/model"
MODEL = CUT_MODEL if config["model_vocabulary"] == "tasks" else config["model"]
# The text models' architecture reaches every command that builds a model or tokenises
# (bayestune.models.text); as a param of those rules, a change reruns them.
ARCHITECTURE = config["architecture"]

# Method names come from the package's registry (bayestune.methods.registry), nowhere else.
BUDGETED = [m for m, spec in REGISTRY.items() if spec.kind == _BUDGETED]  # a mask per budget
FIXED = [m for m, spec in REGISTRY.items() if spec.kind == _FIXED]  # one mask, under main_budget
# No mask file; the folder label of their one run (full fine-tuning's is "all").
UNMASKED = {m: "all" if m == "full" else m for m in REGISTRY if m not in BUDGETED + FIXED}
GRADIENT = [m for m, spec in REGISTRY.items() if spec.needs_data]  # training data + a GPU
STARTED = [m for m, spec in REGISTRY.items() if spec.writes_start]  # stage 2 goes on from a start


def _check_method_names():
    """The schema cannot read the registry, so unknown method names are caught here."""
    named = {"methods": METHODS, "finetune_by_method": list(config["finetune_by_method"]),
             "mask_by_method": list(config["mask_by_method"])}
    for key, names in named.items():
        unknown = [m for m in names if m not in REGISTRY]
        if unknown:
            raise ValueError(f"config key {key}: unknown method(s) {', '.join(unknown)}; "
                             f"known methods: {', '.join(REGISTRY)}")


_check_method_names()

MASK_METHODS = [m for m in METHODS if m in BUDGETED + FIXED]

# The fair protocol: every method chooses among the same number of candidates on validation; a
# config that gives one method more is refused here, before any job starts.
TUNING = config.get("tuning") or {}
CANDIDATES = check_equal_counts(TUNING, METHODS)
# Stage-1 presets whose scales bayestune's candidates use (the sampler's own when none is named).
PRESETS = (candidate_presets(TUNING, config_preset(config)) if "bayestune" in METHODS else [])

# Every task must be known before any job starts: a typo fails here, not job by job.
CUSTOM_TASKS = parse_custom_tasks(config.get("custom_tasks"), where="config custom_tasks")
check_task_names(TASKS, CUSTOM_TASKS)
if BENCH == "vtab" and any(t in CUSTOM_TASKS for t in TASKS):
    raise ValueError("declared tasks need benchmark: glue (a table with one column per task); "
                     "benchmark vtab averages VTAB-1k's groups, which they are not part of")

# Locally `gpu` limits nothing unless --resources gpu=N; on SLURM gpu=1 becomes --gpus=1.
GPU = 0 if config["device"] == "cpu" else 1
# Snakemake counts GPUs but assigns none: a GPU job locks a free slot file here when it starts
# and runs on GPU slot // jobs_per_gpu (bayestune.devices); a job that sees one GPU skips it.
GPU_SLOTS = f"{RES}/.gpu_slots"

if MAIN_BUDGET not in BUDGETS and any(m in BUDGETED for m in METHODS):
    raise ValueError(
        f"main_budget {MAIN_BUDGET} is not one of budgets {BUDGETS}: the mask figures compare "
        "methods at main_budget; add it to budgets or set main_budget to one of them"
    )

_DEFAULT_RESOURCES = {
    # threads, mem_mb, runtime (minutes) at paper scale; config key `resources` overrides.
    "prepare": {"threads": 1, "mem_mb": 8000, "runtime": 60},
    "sample": {"threads": 4, "mem_mb": 32000, "runtime": 480},
    "mask": {"threads": 4, "mem_mb": 16000, "runtime": 60},
    "finetune": {"threads": 4, "mem_mb": 16000, "runtime": 240},
    "report": {"threads": 1, "mem_mb": 4000, "runtime": 30},
}


def res(rule_name, key):
    return config["resources"][rule_name].get(key, _DEFAULT_RESOURCES[rule_name][key])


def budget_label(budget):
    """The budget's folder/file stem, e.g. p0.005: the package names mask files."""
    return mask_file_name(budget).removesuffix(".safetensors")


def budgets_flag(budgets):
    return ",".join(format(b, "g") for b in budgets)


def gpu_slot_flags(uses_gpu=True):
    """--gpu-slots for a job that asks for a GPU, so that local jobs spread over the GPUs. How
    many jobs share a GPU (jobs_per_gpu) is in the shell prefix: it changes where a job runs,
    not what it computes."""
    if not (GPU and uses_gpu):
        return ""
    return f"--gpu-slots {shlex.quote(GPU_SLOTS)}"


# --- what decides a rerun ---------------------------------------------------------------------
# Snakemake reruns a job when its rule's shell text, its params, its input files or its software
# environment change. So the rules get a hash of the code their subcommand runs and a hash of
# the raw task files as params, while HOW a job runs (the interpreter's path, progress bars, log
# lines, the data folder's spelling or place) travels in the shell prefix and the environment,
# which Snakemake does not compare: moving the venv or turning on `progress` reruns nothing.
# A job's code hash covers what its subcommand runs and the modules it loads by name: its
# method's (a mask job's method, LoRA's adapter in a fine-tuning job) and its declared task's
# kind's (bayestune.code_hash). Cached: the files are read once per Snakemake run.
code_hash = functools.lru_cache(maxsize=None)(job_code_hash)


def code(command, method=None, task=None):
    """The code hash of one job (a param of every rule that runs a subcommand)."""
    kind = CUSTOM_TASKS[task].kind if task in CUSTOM_TASKS else None
    return code_hash(command, method=method, task_kind=kind)


_DATA_ENV, _DATA_KEY = (
    ("BAYESTUNE_VTAB_DIR", "vtab_dir") if BENCH == "vtab" else ("BAYESTUNE_GLUE_DIR", "glue_dir")
)
# The environment wins over the config; none (or "hub" for GLUE) reads the Hugging Face Hub.
DATA_DIR = os.environ.get(_DATA_ENV) or config.get(_DATA_KEY)
if DATA_DIR and DATA_DIR != "hub":
    DATA_DIR = os.path.abspath(DATA_DIR)


def data_source(task):
    """The task's raw files by content; DVC's stage `sources` records the same fingerprints."""
    from bayestune.data_source import task_source  # one definition for Snakemake and DVC

    return task_source(task, DATA_DIR, CUSTOM_TASKS)


def _find_task_file():
    """The config file that declares the run's custom tasks, as the command line reads it."""
    used = [t for t in TASKS if t in CUSTOM_TASKS]
    if not used:
        return None
    for path in reversed([os.path.abspath(f) for f in workflow.configfiles]):
        try:
            declared = read_task_file(path)
        except TaskError:
            continue
        if all(declared.get(t) == CUSTOM_TASKS[t] for t in used):
            return path
    raise ValueError(
        f"custom tasks {', '.join(used)} must be declared whole in one config file (the jobs "
        "read them from it with --task-file); move them out of --config into a --configfile")


TASK_FILE = _find_task_file()


def task_file_flag(task):
    return f"--task-file {shlex.quote(TASK_FILE)}" if task in CUSTOM_TASKS else ""


def task_declaration(task):
    """A declared task's content, a param of the rules that read it (an edit reruns them);
    '' for a built-in task."""
    return CUSTOM_TASKS[task].fingerprint() if task in CUSTOM_TASKS else ""


def _shell_prefix():
    exports = {"BAYESTUNE_QUIET": "0" if config["progress"] else "1",
               "BAYESTUNE_LOG_EVERY": str(config["log_every"]),
               "BAYESTUNE_JOBS_PER_GPU": str(config["jobs_per_gpu"]),
               # The job's shell runs under Snakemake: the job stops when that process is gone
               # (bayestune.liveness), so a killed Snakemake leaves no orphan writing files.
               "BAYESTUNE_WATCH_PID": "$PPID"}
    if DATA_DIR:
        exports[_DATA_ENV] = shlex.quote(DATA_DIR)
    if PACKAGE_SRC is not None:
        exports["PYTHONPATH"] = shlex.quote(str(PACKAGE_SRC)) + '${PYTHONPATH:+:"$PYTHONPATH"}'
    isolated = {DeploymentMethod.CONDA, DeploymentMethod.APPTAINER}
    if not isolated & set(workflow.deployment_settings.deployment_method):
        # `python` is the interpreter running Snakemake (no activated venv needed; cluster
        # jobs start the same one from the shared file system); a conda env or a container
        # brings its own.
        exports["PATH"] = shlex.quote(os.path.dirname(sys.executable)) + ':"$PATH"'
    text = " ".join(f"{name}={value}" for name, value in exports.items())
    return f"set -euo pipefail; export {text}; ".replace("{", "{{").replace("}", "}}")


shell.prefix(_shell_prefix())


# --- paths ------------------------------------------------------------------------------------
def prepared(task):
    return f"{PREP}/{task}"


def scale_file(preset, task, seed):
    return f"{SCALES}/{preset}/{task}/seed{seed}.safetensors"


def missing_borrowed_scales():
    """The scale files and chain diagnostics this run reads from scales_dir that are not
    there (none when the run samples its own)."""
    if not BORROWED_SCALES or "bayestune" not in METHODS:
        return []
    needed = [path for preset in PRESETS for task in TASKS for seed in CHAIN_SEEDS
              for path in (scale_file(preset, task, seed),
                           diagnostics_file(preset, task, seed, "diagnostics.json"),
                           diagnostics_file(preset, task, seed, "traces.safetensors"))]
    return [path for path in needed if not os.path.exists(path)]


def diagnostics_file(preset, task, seed, kind):
    """The chain diagnostics beside a scale file (kind: diagnostics.json, traces.safetensors)."""
    return f"{SCALES}/{preset}/{task}/seed{seed}.{kind}"


def checkpoint_file(preset, task, seed):
    return f"{SCALES}/{preset}/{task}/seed{seed}.ckpt"


def mask_file(method, task, seed, label, preset=None):
    """A mask; bayestune's sit under the stage-1 preset whose scales ranked them."""
    method = method if preset is None else f"{method}/{preset}"
    return f"{RES}/masks/{method}/{task}/seed{seed}/{label}.safetensors"


def preset_of(wildcards):
    return getattr(wildcards, "preset", None)


def sampler_flags(wildcards):
    """The sampler section under the preset's name, with the preset's own overrides
    (sampler_by_preset, e.g. a scaled-down reference chain), then those of the seed
    (sampler_by_seed, e.g. the paper's full-length chain for seed 0 only): bayestune.settings,
    as the sweep resolves it."""
    return to_flags(resolve(config, "sampler", preset=wildcards.preset, seed=wildcards.seed))


def start_file(method, task, seed):
    """Stage 2's start weights, written by the mask job of a method that trains before it
    ranks. A whole model per file: they sit with the fine-tuning runs, which DVC tracks
    without caching, not with the small masks."""
    return f"{RES}/finetune/{method}/{task}/start/seed{seed}.safetensors"


def run_dir(method, task, label, seed):
    return f"{RES}/finetune/{method}/{task}/{label}/seed{seed}"


def labels_of(method):
    if method in UNMASKED:
        return [UNMASKED[method]]
    if method in FIXED:
        return [budget_label(MAIN_BUDGET)]
    return [budget_label(b) for b in BUDGETS]


def mask_budgets(method):
    return [MAIN_BUDGET] if method in FIXED else BUDGETS


# --- input functions --------------------------------------------------------------------------
def mask_inputs(wildcards):
    """What a mask method reads: bayestune the scale file, gradient methods the task data."""
    inputs = {}
    if MODEL == CUT_MODEL:  # a method that reads no task data still builds the model
        inputs["model"] = CUT_MODEL
    if wildcards.method == "bayestune":
        inputs["scores"] = scale_file(wildcards.preset, wildcards.task,
                                      chain_seed(wildcards.seed))
    if wildcards.method in GRADIENT:
        inputs["data"] = prepared(wildcards.task)
    return inputs


def mask_options(wildcards):
    options = [f"--{kind} {shlex.quote(path)}" for kind, path in mask_inputs(wildcards).items()
               if kind != "model"]
    if wildcards.method in STARTED:
        start = start_file(wildcards.method, wildcards.task, wildcards.seed)
        options.append(f"--start-out {shlex.quote(start)}")
    return " ".join(options)


def mask_flags(wildcards):
    """The mask section with the method's own overrides (e.g. bayestune: {keep_head: true})."""
    return to_flags(resolve(config, "mask", method=wildcards.method))


def finetune_inputs(wildcards):
    inputs = {"data": prepared(wildcards.task)}
    if wildcards.method == "bayestune":
        inputs["mask"] = [mask_file("bayestune", wildcards.task, wildcards.seed, wildcards.label,
                                    preset) for preset in PRESETS]
    elif wildcards.method not in UNMASKED:
        inputs["mask"] = mask_file(wildcards.method, wildcards.task, wildcards.seed, wildcards.label)
    if wildcards.method in STARTED:
        inputs["start"] = start_file(wildcards.method, wildcards.task, wildcards.seed)
    return inputs


def finetune_source(wildcards):
    """--mask FILE (+ --start FILE) for mask methods, --method full|lora (+ LoRA flags)
    otherwise. A function of the wildcards alone: Snakemake does not compare params computed
    from the input files, and the LoRA settings must rerun LoRA when they change."""
    if wildcards.method == "lora":
        return f"--method lora {to_flags(resolve(config, 'lora'), prefix='lora_')}"
    if wildcards.method in UNMASKED:
        return f"--method {wildcards.method}"
    preset = PRESETS[0] if wildcards.method == "bayestune" else None
    mask = mask_file(wildcards.method, wildcards.task, wildcards.seed, wildcards.label, preset)
    if wildcards.method in STARTED:
        start = start_file(wildcards.method, wildcards.task, wildcards.seed)
        return f"--mask {shlex.quote(mask)} --start {shlex.quote(start)}"
    return f"--mask {shlex.quote(mask)}"


def finetune_flags(wildcards):
    """The finetune section with the method's own overrides (full fine-tuning wants a far
    smaller learning rate than a 0.5% mask)."""
    section = resolve(config, "finetune", method=wildcards.method)
    return f"{to_flags(section)}{candidates_flag(wildcards)}"


def candidates_flag(wildcards):
    """--candidates JSON: the method's grid, each bayestune preset replaced by its mask."""
    if not TUNING:
        return ""
    candidates = []
    for candidate in method_grid(TUNING, wildcards.method):
        if wildcards.method == "bayestune":
            preset = candidate.get(PRESET_KEY, PRESETS[0])
            candidate = {**candidate, PRESET_KEY: preset, MASK_KEY: mask_file(
                "bayestune", wildcards.task, wildcards.seed, wildcards.label, preset)}
        candidates.append(candidate)
    return f" --candidates {shlex.quote(json.dumps(candidates, separators=(',', ':')))}"


def all_metrics():
    return [
        f"{run_dir(method, task, label, seed)}/metrics.json"
        for method in METHODS
        for task in TASKS
        for label in labels_of(method)
        for seed in SEEDS
    ]


def figure_masks(wildcards):
    """Each mask method's mask at main_budget, first seed: what the mask figures compare."""
    return [mask_file(m, wildcards.task, SEEDS[0], budget_label(MAIN_BUDGET),
                      PRESETS[0] if m == "bayestune" else None) for m in MASK_METHODS]


def figure_scales(wildcards):
    return [scale_file(PRESETS[0], wildcards.task, CHAIN_SEEDS[0])] if "bayestune" in METHODS else []


def task_figures(task):
    names = []
    if "bayestune" in METHODS:
        names.append("lambda_histogram.png")
    if MASK_METHODS:
        names += ["mask_locations.png", "mask_overlap.png"]
    return [f"{RES}/figures/{task}/{name}" for name in names]


def figure_options(wildcards, input):
    """--scales/--masks/--scores-csv FILE... from the figure rules' named inputs."""
    options = []
    for name, paths in input.items():
        paths = [paths] if isinstance(paths, str) else list(paths)
        if paths:
            options.append(f"--{name.replace('_', '-')} " + " ".join(map(shlex.quote, paths)))
    return " ".join(options)


def table_files():
    names = ("scores.csv", "table.csv", "table.md", "table.html", "paired.csv")
    return [f"{RES}/{BENCH}_{name}" for name in names]


def curve_metrics(wildcards):
    """The task's runs whose validation curves are drawn: every seed, mask methods at
    main_budget (one curve per method, as the mask figures compare them)."""
    main = budget_label(MAIN_BUDGET)
    return [f"{run_dir(method, wildcards.task, label, seed)}/metrics.json"
            for method in METHODS for label in labels_of(method)
            if method not in BUDGETED or label == main
            for seed in SEEDS]


def convergence_figures():
    """Validation curves per task and, when BayesTune meets another method, the forest plot
    of its paired differences."""
    figures = [f"{RES}/figures/{task}/val_curves.png" for task in TASKS]
    if "bayestune" in METHODS and len(METHODS) > 1:
        figures.append(f"{RES}/figures/paired_differences.png")
    return figures


def provenance_file():
    return f"{RES}/{BENCH}_provenance.csv"


def chain_figures(task):
    """Per task, with bayestune in the run: its lambda traces and the agreement across seeds."""
    if "bayestune" not in METHODS:
        return []
    names = ("lambda_traces.png", "seed_agreement.csv", "seed_agreement.png")
    return [f"{RES}/figures/{task}/{name}" for name in names]


def chain_figure_inputs(wildcards):
    """Every seed's scale file and diagnostics, and bayestune's masks at every budget (the
    first stage-1 preset, as the other figures)."""
    preset = PRESETS[0]
    return {
        "scales": [scale_file(preset, wildcards.task, s) for s in CHAIN_SEEDS],
        "diagnostics": [
            diagnostics_file(preset, wildcards.task, s, kind)
            for s in CHAIN_SEEDS
            for kind in ("diagnostics.json", "traces.safetensors")
        ],
        "masks": [
            mask_file("bayestune", wildcards.task, s, label, preset)
            for s in CHAIN_SEEDS
            for label in labels_of("bayestune")
        ],
    }


def all_targets():
    figures = [f for task in TASKS for f in task_figures(task) + chain_figures(task)]
    return (table_files() + [provenance_file()] + figures
            + [f"{RES}/figures/score_vs_budget.png"] + convergence_figures())


wildcard_constraints:
    task="|".join(map(re.escape, TASKS)),
    seed=r"\d+",
    preset="|".join(map(re.escape, PRESETS or ["exact"])),
    method="|".join(map(re.escape, REGISTRY)),
    label=r"p[0-9.e+-]+|all|lora",

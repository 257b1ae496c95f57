# bayestune workflow: data prep -> stage-1 scales -> masks at budgets -> masked fine-tuning
# -> tables and figures. Every rule calls one `bayestune` subcommand; the file layout is in
# workflow/rules/common.smk. Run it from the repository root: `snakemake --cores all` finds
# this file there.

import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.0")

# Every path (config, data, results) is relative to the repository root; run from anywhere
# else, the run would read another config or none and find "nothing to be done".
REPO_ROOT = Path(workflow.current_basedir).resolve()
if Path.cwd().resolve() != REPO_ROOT:
    raise WorkflowError(
        f"run Snakemake from the repository root, {REPO_ROOT} (this run is in {Path.cwd()}): "
        f"cd {REPO_ROOT} and run it there (a --configfile is relative to the root too)"
    )


# The paper's config unless the command line names one: a --configfile replaces it rather
# than being merged over it, so a run is exactly what its own config file says.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")

# The package beside this workflow (src/ of the checkout) is the one read here and run by every
# job, so the code hashes that decide reruns describe the code the jobs run. A copy of the
# workflow without src/ uses the installed package.
PACKAGE_SRC = Path(workflow.basedir) / "src"
if (PACKAGE_SRC / "bayestune" / "__init__.py").is_file():
    sys.path.insert(0, str(PACKAGE_SRC))
else:
    PACKAGE_SRC = None

# A built image of containers/bayestune.def, for `--software-deployment-method apptainer`.
if config["container"]:

    container: config["container"]


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


# What the schema cannot check (values against each other, a NaN, the folders), before any job
# starts: every problem in one message naming its config key. A missing data folder only
# warns in a dry run, which reads no data (plan, render-jobs on a machine without it).
from bayestune.errors import ConfigError
from bayestune.run_checks import check_data_dir, check_run_config

_data_problem = (
    check_data_dir(DATA_DIR, env_name=_DATA_ENV, key=_DATA_KEY,
                   from_env=bool(os.environ.get(_DATA_ENV)))
    if any(t not in CUSTOM_TASKS for t in TASKS)
    else None
)
if _data_problem and (workflow.dryrun or getattr(workflow.output_settings, "dryrun", False)):
    print(f"warning: {_data_problem}", file=sys.stderr)
    _data_problem = None
try:
    check_run_config(config, presets=PRESETS, seeds=SEEDS, methods=METHODS,
                     candidates={m: method_grid(TUNING, m) for m in METHODS} if TUNING else {},
                     data_problem=_data_problem)
except ConfigError as err:
    raise WorkflowError(str(err)) from None
_missing_scales = missing_borrowed_scales()
if _missing_scales:
    raise WorkflowError(
        f"scales_dir {SCALES}: {len(_missing_scales)} scale file(s) this run reads are missing "
        f"(first: {_missing_scales[0]}). Run the config that samples them first, or remove "
        "scales_dir to sample them in this run.")


rule all:
    default_target: True
    input:
        all_targets(),


localrules:
    all,
    report,
    task_figures,
    score_figure,
    val_curves,
    paired_figure,
    chain_figures,


include: "workflow/rules/data.smk"
if not BORROWED_SCALES:

    include: "workflow/rules/scales.smk"

include: "workflow/rules/masks.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/diagnostics.smk"

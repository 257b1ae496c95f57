"""The Snakemake workflow, its SLURM profile and the DVC stages, run as a user runs them.

* dry runs of the paper's configs: job counts per rule, and every shell command the rules
  would run parses with the real `bayestune` command line (flags and CLI stay in step);
* the SLURM profile against stub `sbatch`/`sacctmgr`/... scripts: GPU rules ask for a GPU,
  which a CPU node cannot show (tests/test_slurm_cluster.py runs jobs on a real scheduler);
* the tiny config end to end through `dvc repro` (tables, figures, then nothing to redo);
* a stage-1 job killed mid-run resumes from its checkpoint when the command is rerun.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from shared_runs import (
    BIN,
    TINY_TUNING,
    copy_workflow,
    dvc,
    finished_run,
    run_env,
    tiny_encoder,
    write_config,
)

from bayestune.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
GLUE_TASKS = ["cola", "stsb", "mrpc", "rte", "cb", "copa", "wsc"]
ALL_METHODS = {"bayestune", "full", "random", "bitfit", "magnitude", "lt-sft", "fisher", "sam",
               "lora"}


def snakemake(cwd: Path, *args: str, env: dict[str, str] | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=cwd, env=env or run_env(),
                          capture_output=True, text=True, timeout=timeout)


def job_counts(output: str) -> dict[str, int]:
    """The "Job stats" table of a (dry) run: rule -> number of jobs (none when nothing is to
    be done)."""
    table = output.split("Job stats:", 1)[1] if "Job stats:" in output else ""
    counts = {}
    for line in table.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


# --- dry runs of the paper's configs -----------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("workflow"))


@pytest.fixture(scope="module")
def dry_run(workdir):
    """`snakemake -n -p` on a config, once per config for the whole module."""
    done: dict[str, str] = {}

    def run(config: str) -> str:
        if config not in done:
            result = snakemake(workdir, "-n", "-p", "--cores", "1", "--configfile", config)
            assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
            done[config] = result.stdout
        return done[config]

    return run


def bayestune_commands(output: str) -> dict[str, list[list[str]]]:
    """Every shell command of a dry run, as argv after `bayestune`, grouped by subcommand."""
    commands: dict[str, list[list[str]]] = {}
    for line in output.splitlines():
        if not line.startswith("Shell command: ") or "bayestune" not in line:
            continue
        argv = shlex.split(line.removeprefix("Shell command: ").split(" > ", 1)[0])
        argv = argv[argv.index("bayestune") + 1:]
        argv = [a for a in argv if a != "-q"]
        commands.setdefault(argv[0], []).append(argv)
    return commands


def test_schema_sections_are_the_dataclass_fields():
    """Config sections become flags: their keys must be exactly the dataclasses' fields."""
    import dataclasses

    from bayestune.finetune import FinetuneConfig
    from bayestune.methods import LORA_PRESETS, LoraSettings, MethodConfig
    from bayestune.methods.lora import LORA_INITS
    from bayestune.sampler import SamplerConfig

    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    sections = {
        "sampler": (schema["properties"]["sampler"], SamplerConfig, {"batch_size",
                                                                    "eval_batch_size"}),
        "mask": (schema["definitions"]["mask"], MethodConfig, {"batch_size"}),
        "finetune": (schema["definitions"]["finetune"], FinetuneConfig, {"batch_size",
                                                                         "eval_batch_size"}),
        "lora": (schema["properties"]["lora"], LoraSettings, set()),
    }
    for name, (section, cls, cli_only) in sections.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(section["properties"]) == fields | cli_only, name
        assert section["additionalProperties"] is False, name
    lora = schema["properties"]["lora"]["properties"]
    assert lora["preset"]["enum"] == list(LORA_PRESETS) and lora["init"]["enum"] == list(LORA_INITS)
    from bayestune.sampler.config import PRESETS
    assert schema["properties"]["sampler"]["properties"]["preset"]["enum"] == list(PRESETS)
    grid = schema["properties"]["tuning"]["properties"]["grid"]["additionalProperties"]
    assert set(grid["items"]["properties"]["preset"]["enum"]) == set(PRESETS)


def test_paper_config_is_the_paper():
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    assert config["model"] == "roberta-base" and config["tasks"] == GLUE_TASKS
    assert 0.005 in config["budgets"] and set(config["methods"]) == ALL_METHODS
    from bayestune.finetune import FinetuneConfig
    from bayestune.sampler import sampler_config, sampler_config_from_section

    assert sampler_config_from_section(config["sampler"]) == sampler_config(
        "reference", checkpoint_every=config["sampler"]["checkpoint_every"])
    finetune = FinetuneConfig(**{k: v for k, v in config["finetune"].items()
                                 if k != "batch_size"})
    assert (finetune.schedule, finetune.lr, finetune.min_steps, finetune.patience,
            finetune.eval_every, finetune.val_subset) == ("reference", 1e-3, 20000, 40, 500, 500)
    assert config["max_length"] == 256 and config["architecture"] == "jiant"
    # the methods beside a published row train stage 2 as the SAM repo's scripts/train.sh,
    # and SAM burns in for 600 steps as there
    from bayestune.methods import REGISTRY
    from bayestune.methods.registry import SAM_REPO_STAGE2

    for name in (n for n, spec in REGISTRY.items() if spec.published):
        section = {**config["finetune"], **config["finetune_by_method"].get(name, {})}
        assert {k: section.get(k) for k in SAM_REPO_STAGE2} == dict(SAM_REPO_STAGE2), name
    assert config["mask_by_method"]["sam"] == {"sam_steps": 600}


def test_paper_dry_run_job_counts(workdir, dry_run):
    config = yaml.safe_load((workdir / "config/config.yaml").read_text())
    tasks, seeds, budgets = len(config["tasks"]), len(config["seeds"]), len(config["budgets"])
    counts = job_counts(dry_run("config/config.yaml"))
    budgeted = len({"bayestune", "random", "magnitude", "lt-sft", "fisher", "sam"})
    runs_per_task_seed = budgeted * budgets + 3  # + bitfit, full, lora: one run each
    assert counts == {
        "prepare": tasks,
        "sample": tasks * seeds,
        "mask": (budgeted - 2) * tasks * seeds,    # one job writes every budget's mask
        "mask_bayestune": tasks * seeds,           # one per stage-1 preset the grid names
        "mask_started": tasks * seeds,             # magnitude: its masks and stage 2's start
        "mask_fixed": tasks * seeds,               # bitfit
        "finetune": runs_per_task_seed * tasks * seeds,
        "task_figures": tasks,
        "chain_figures": tasks,                    # lambda traces, agreement across seeds
        "report": 1,
        "score_figure": 1,
        "val_curves": tasks,
        "paired_figure": 1,
        "all": 1,
        "total": sum(counts.values()) - counts["total"],
    }
    assert (counts["sample"], counts["finetune"], counts["total"]) == (35, 735, 1047)


@pytest.mark.parametrize("config", ["config/config.yaml", "config/vtab.yaml",
                                    "config/demo.yaml", "config/cpu.yaml", "config/gpu.yaml",
                                    "config/gpu_smoke.yaml"])
def test_every_rule_command_parses_with_the_cli(workdir, dry_run, config):
    commands = bayestune_commands(dry_run(config))
    assert set(commands) == {"prepare", "sample", "mask", "finetune", "report", "figures",
                             "diagnose"}
    parser = build_parser()
    for argvs in commands.values():
        variants = {tuple(a for a in argv if a.startswith("-")): argv for argv in argvs}
        for argv in variants.values():  # one command of each flag set: every method, etc.
            parser.parse_args(argv)  # exits (fails the test) on an unknown or malformed flag
    ours = yaml.safe_load((workdir / config).read_text())["sampler"]
    # the chain of the sampler's own preset (a tuning grid may add chains of other presets)
    sample = next(args for args in map(parser.parse_args, commands["sample"])
                  if args.preset == ours.get("preset", "exact"))
    for key, value in ours.items():
        assert getattr(sample, key) == value, key
    assert str(sample.checkpoint).endswith(".ckpt")


def test_committed_gpu_job_list_is_the_workflows(workdir):
    """config/gpu_jobs.json runs on a machine without Snakemake: it must be what the workflow
    renders from config/gpu.yaml now (else: make gpu-jobs)."""
    from bayestune.jobs import read_job_list, render_jobs

    committed = read_job_list(REPO / "config/gpu_jobs.json")
    # Snakemake lists jobs in no fixed order: compare them by name
    rendered = {job.id: job for job in render_jobs("config/gpu.yaml", workdir)}
    assert rendered == {job.id: job for job in committed}, "run make gpu-jobs"
    bayestune_runs = [j for j in committed if j.rule == "sample" and "reference" in j.id]
    assert {j.argv[j.argv.index("--steps") + 1] for j in bayestune_runs} == {"20000", "2000"}


def test_dry_run_passes_method_settings_and_the_magnitude_start(workdir, dry_run):
    commands = bayestune_commands(dry_run("config/cpu.yaml"))
    magnitude = [a for a in commands["finetune"] if "results/cpu/masks/magnitude/" in " ".join(a)]
    assert magnitude and all("--start" in argv for argv in magnitude)
    start = magnitude[0][magnitude[0].index("--start") + 1]
    assert start.startswith("results/cpu/finetune/magnitude/") and "/start/seed" in start
    masks = [a for a in commands["mask"] if "--start-out" in a]
    assert {a[a.index("--method") + 1] for a in masks} == {"magnitude"}
    assert {a[a.index("--start-out") + 1] for a in masks} >= {start}
    assert not any("--start" in argv for argv in commands["finetune"] if argv not in magnitude)
    assert any("--method lt-sft" in " ".join(argv) for argv in commands["mask"])
    demo = bayestune_commands(dry_run("config/demo.yaml"))["mask"]
    by_method = {argv[argv.index("--method") + 1]: argv for argv in demo}
    assert "--keep-head" in by_method["bayestune"] and "--keep-head" not in by_method["random"]


def test_dry_run_names_an_unknown_method_and_the_known_ones(tmp_path, workdir):
    config = write_config(tmp_path / "bad.yaml", workdir / "tests/config/tiny.yaml",
                          methods=["bayestune", "magprune"])
    result = snakemake(workdir, "-n", "--cores", "1", "--configfile", str(config))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "unknown method(s) magprune; known methods: full, lora, bitfit" in output


def test_dry_run_refuses_unequal_candidate_counts(tmp_path, workdir):
    # bayestune's second preset is a third candidate: more selection than the other methods get
    unfair = {"grid": {**TINY_TUNING["grid"], "bayestune": [
        *TINY_TUNING["grid"]["bayestune"], {"preset": "cold", "lr": 3e-3}]}}
    config = write_config(tmp_path / "unfair.yaml", workdir / "tests/config/tiny.yaml",
                          tuning=unfair)
    result = snakemake(workdir, "-n", "--cores", "1", "--configfile", str(config))
    assert result.returncode != 0
    assert "unfair tuning: every method must choose among 3 candidates on validation" in (
        result.stdout + result.stderr)
    assert "bayestune: 3, random: 2, full: 2" in result.stdout + result.stderr


# --- SLURM profile, stub cluster ---------------------------------------------------------------
STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
{body}
"""
STUB_BODIES = {
    "sbatch": 'cat > /dev/null; echo $(( $(wc -l < "{log}") + 1000 ))',
    "sacctmgr": "echo testacct",
    "sshare": "echo testacct",
}


@pytest.mark.slow
def test_slurm_profile_submits_gpu_jobs_with_a_gpu(tmp_path, workdir):
    stubs, calls = tmp_path / "bin", tmp_path / "calls.log"
    stubs.mkdir()
    calls.touch()
    for tool in ("sbatch", "sacctmgr", "sshare", "sinfo", "squeue", "sacct", "scancel", "scontrol"):
        script = stubs / tool
        script.write_text(STUB.format(log=calls, body=STUB_BODIES.get(tool, "").format(log=calls)))
        script.chmod(0o755)
    run = copy_workflow(tmp_path / "run")
    config = write_config(run / "slurm.yaml", run / "tests/config/tiny.yaml", device="auto",
                          tasks=["cb"], methods=["full"], resources={})  # paper-size resources
    # Inputs that exist already, so that each kind of job is submitted at once:
    (run / "data/tiny/cb").mkdir(parents=True)
    metrics = run / "results/tiny/finetune/full/cb/all/seed0"
    metrics.mkdir(parents=True)
    (metrics / "metrics.json").write_text("{}")
    (metrics / "delta.safetensors").write_text("")
    targets = ["results/tiny/scales/exact/cb/seed0.safetensors",          # sample: GPU
               "results/tiny/finetune/full/cb/all/seed1/metrics.json",  # finetune: GPU
               "results/tiny/masks/fisher/cb/seed0/p0.005.safetensors",  # gradient mask: GPU
               "results/tiny/masks/random/cb/seed0/p0.005.safetensors"]  # random mask: no GPU
    env = run_env(SLURM_ACCOUNT="testacct", SLURM_PARTITION="testpart")
    env["PATH"] = f"{stubs}{os.pathsep}{env['PATH']}"
    proc = subprocess.Popen(
        [str(BIN / "snakemake"), *targets, "--profile", "profiles/slurm", "--configfile",
         str(config)], cwd=run, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if sum(line.startswith("sbatch") for line in calls.read_text().splitlines()) >= 4:
            break
        time.sleep(0.5)
    if proc.poll() is None:  # the fake jobs never finish: stop Snakemake once all are submitted
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: Snakemake cancels its jobs and exits
    try:  # it waits on the stubs' jobs, which never end: a few seconds, then it is killed
        output = proc.communicate(timeout=5)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0]
    sbatch = [line for line in calls.read_text().splitlines() if line.startswith("sbatch")]
    assert len(sbatch) == 4, output[-4000:]
    by_rule = {}
    for line in sbatch:
        comment = re.search(r"--comment '?rule_([a-z_]+?)(?:_wildcards_(\S+?))?'?\s", line)
        by_rule[(comment.group(1), comment.group(2) or "")] = line
    print("\n".join(sbatch))
    for (rule, wildcards), line in by_rule.items():
        assert "-A testacct" in line and "-p testpart" in line, line
        assert re.search(r" -t \d+", line) and re.search(r"--mem \d+", line), line
        wants_gpu = rule in ("sample", "finetune") or "fisher" in wildcards
        assert ("--gpus=1" in line) == wants_gpu, line
        assert "--gres" not in line
        # a rule's threads become its CPUs, whatever the machine that submits has
        assert "--cpus-per-task=4" in line or "bitfit" in line, line
    assert {rule for rule, _ in by_rule} == {"sample", "finetune", "mask"}


# --- end to end through DVC ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, glue_dir):
    """The tiny config with a tuning grid through `dvc repro`, run once per test session (a
    copy of dvc.yaml's glue stage, tiny entry) and shared with the rerun tests."""
    return finished_run(tmp_path_factory, glue_dir)


@pytest.mark.slow
def test_tiny_run_writes_tables_and_figures(tiny_run):
    print(f"tiny run through dvc repro: {tiny_run.seconds:.0f} s")
    results = tiny_run.path / "results/tiny"
    table = pd.read_csv(results / "glue_table.csv", dtype={"budget": str})
    rows = set(zip(table.method, table.budget, strict=True))
    assert rows == {("full", "-"), ("bayestune", "0.005"), ("bayestune", "0.02"),
                    ("random", "0.005"), ("random", "0.02")}
    assert table[["cb", "copa", "avg"]].notna().all().all()
    assert table[["cb", "copa"]].ge(0).all().all() and table[["cb", "copa"]].le(100).all().all()
    masked = table[table.budget == "0.005"].set_index("method").trainable_fraction
    assert 0.004 < masked["bayestune"] < 0.006
    assert 0.005 < masked["random"] < 0.015  # p of the encoder, and the head on top
    assert table[table.method == "full"].trainable_fraction.item() == 1.0
    assert "± " not in (results / "glue_table.md").read_text()  # one seed: no std to show
    scores = pd.read_csv(results / "glue_scores.csv")
    assert len(scores) == 10 and set(scores.task) == {"cb", "copa"}
    # six steps, an evaluation every three: every run ends at max_steps with its best among
    # its last two evaluations, so each is flagged as still improving
    assert set(scores.stop_reason) == {"max_steps"} and scores.still_improving.all()
    # the fair protocol: two candidates each, chosen on validation, every candidate listed
    assert (scores.candidates == 2).all()
    assert set(scores[scores.method == "bayestune"].chosen_preset) <= {"exact", "cold"}
    selection = pd.read_csv(results / "glue_selection.csv", dtype={"budget": str})
    keys = ["method", "task", "seed", "budget"]
    assert len(selection) == 20 and selection.groupby(keys).chosen.sum().eq(1).all()
    chosen = selection[selection.chosen].set_index(keys).val_score.sort_index()
    assert chosen.equals(selection.groupby(keys).val_score.max().sort_index())
    assert set(selection[selection.method == "full"].lr) == {5e-5, 2e-4}
    assert "†" in (results / "glue_table.md").read_text()
    paired = pd.read_csv(results / "glue_paired.csv", dtype={"budget": str})
    assert set(zip(paired.method, paired.budget, paired.pairs, strict=True)) == {
        ("full", "-", 2), ("random", "0.005", 2), ("random", "0.02", 2)}
    assert (paired.ci_method == "too few pairs").all()  # one seed, two tasks: no interval
    figures = ["score_vs_budget.png", "paired_differences.png"] + [
        f"{task}/{name}" for task in ("cb", "copa") for name in
        ("lambda_histogram.png", "mask_locations.png", "mask_overlap.png", "val_curves.png")]
    for name in figures:
        assert (results / "figures" / name).stat().st_size > 1000, name
    assert not list((results / "scales").rglob("*.ckpt"))  # finished runs drop their checkpoint


@pytest.mark.slow
def test_dvc_repro_again_does_nothing(tiny_run, tmp_path, glue_dir):
    run = tiny_run.copy_to(tmp_path / "run")
    env = run_env(glue_dir)  # the copy's config names the data relative to the shared run
    again = dvc(run, "repro", "glue@tiny", env=env)
    assert again.returncode == 0, again.stderr
    # The data fingerprints are taken again on every repro (stage sources); unchanged, they
    # leave the run's stage alone.
    assert "didn't change, skipping" in again.stdout
    assert "Running stage 'glue@tiny'" not in again.stdout
    assert dvc(run, "status", "-q", "glue@tiny", env=env).returncode == 0
    lock = yaml.safe_load((run / "dvc.lock").read_text())["stages"]["glue@tiny"]
    tracked = {out["path"] for out in lock["outs"]}
    assert {"data/tiny", "results/tiny/scales", "results/tiny/masks",
            "results/tiny/finetune"} <= tracked
    assert "tests/config/tiny_fair.yaml" in lock["params"]


# --- resume after a kill ------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_sampler_resumes_from_its_checkpoint(tmp_path, tmp_path_factory, glue_dir):
    run = copy_workflow(tmp_path / "run")
    tiny = yaml.safe_load((run / "tests/config/tiny.yaml").read_text())
    # Enough steps on the tiny encoder that the kill lands well before the end.
    steps, every = 600, 8
    config = write_config(run / "resume.yaml", run / "tests/config/tiny.yaml", tasks=["cb"],
                          model=str(tiny_encoder(tmp_path_factory)),
                          sampler={**tiny["sampler"], "steps": steps, "checkpoint_every": every})
    target = "results/tiny/scales/exact/cb/seed0.safetensors"
    command = [str(BIN / "snakemake"), target, "--cores", "1", "--rerun-incomplete",
               "--configfile", str(config)]
    checkpoint = run / "results/tiny/scales/exact/cb/seed0.ckpt"
    proc = subprocess.Popen(command, cwd=run, env=run_env(glue_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists(), proc.communicate(timeout=60)[0][-3000:]
    os.killpg(proc.pid, signal.SIGTERM)  # Ctrl-C / a scheduler's kill, mid stage 1
    first = proc.communicate(timeout=60)[0]
    assert not (run / target).exists(), "the sampler finished before it was killed"
    assert checkpoint.exists()

    second = subprocess.run(command, cwd=run, env=run_env(glue_dir), capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + first[-2000:]
    log = (run / "results/tiny/logs/sample/exact/cb/seed0.log").read_text()
    resumed = re.search(r"resum\w*\b.*?\bstep (\d+)", log)
    assert resumed and int(resumed.group(1)) % every == 0 and int(resumed.group(1)) < steps, \
        log[-2000:]
    assert (run / target).exists() and not checkpoint.exists()
    assert job_counts(second.stdout + second.stderr) == {"sample": 1, "total": 1}  # not prepare


def test_stage_two_seeds_share_the_chains_of_sampler_seeds(tmp_path, workdir):
    config = write_config(tmp_path / "seeds.yaml", workdir / "tests/config/tiny.yaml",
                          tasks=["cb"], seeds=[0, 1, 2], sampler_seeds=[0, 1])
    result = snakemake(workdir, "-n", "-p", "--cores", "1", "--configfile", str(config))
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    counts = job_counts(result.stdout)
    assert counts["sample"] == 2 and counts["mask_bayestune"] == 3
    masks = bayestune_commands(result.stdout)["mask"]
    scores = {a[a.index("--seed") + 1]: a[a.index("--scores") + 1] for a in masks
              if "bayestune" in a}
    assert scores == {"0": "results/tiny/scales/exact/cb/seed0.safetensors",
                      "1": "results/tiny/scales/exact/cb/seed1.safetensors",
                      "2": "results/tiny/scales/exact/cb/seed0.safetensors"}
    bad = write_config(tmp_path / "bad.yaml", workdir / "tests/config/tiny.yaml",
                       seeds=[0, 1], sampler_seeds=[3])
    refused = snakemake(workdir, "-n", "--cores", "1", "--configfile", str(bad))
    assert refused.returncode != 0
    assert "sampler_seeds [3] must be among seeds [0, 1]" in refused.stdout + refused.stderr


def test_scales_dir_reads_another_runs_chains_and_never_samples(tmp_path, workdir):
    borrowed = tmp_path / "other_run/scales"
    files = [borrowed / f"exact/cb/seed{seed}.{kind}" for seed in (0, 1)
             for kind in ("safetensors", "diagnostics.json", "traces.safetensors")]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    config = write_config(tmp_path / "borrow.yaml", workdir / "tests/config/tiny.yaml",
                          tasks=["cb"], seeds=[0, 1], scales_dir=str(borrowed))
    result = snakemake(workdir, "-n", "-p", "--cores", "1", "--configfile", str(config))
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    counts = job_counts(result.stdout)
    assert "sample" not in counts and counts["mask_bayestune"] == 2
    scores = {a[a.index("--seed") + 1]: a[a.index("--scores") + 1]
              for a in bayestune_commands(result.stdout)["mask"] if "bayestune" in a}
    assert scores == {str(s): str(borrowed / f"exact/cb/seed{s}.safetensors") for s in (0, 1)}
    assert "results/tiny/scales" not in result.stdout

    files[3].unlink()  # seed 1's scale file
    refused = snakemake(workdir, "-n", "--cores", "1", "--configfile", str(config))
    assert refused.returncode != 0
    message = refused.stdout + refused.stderr
    assert f"scales_dir {borrowed}" in message and "seed1.safetensors" in message
    assert "remove scales_dir" in message

"""No silent wrong result, no lost file: each case once ended with exit status 0 and a wrong or
missing file (or an unclear error), and is reproduced here through the command line on a tiny
random BERT and a few rows of real task data (test_defects builds both)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_defects import FINETUNE_FLAGS, tiny_model_dir  # noqa: F401 (fixture)
from test_glue import good, three_splits, write_task
from test_jobs import python_command, toy

from bayestune import files, guards, jobs, liveness
from bayestune.cli import main
from bayestune.run_checks import check_data_dir
from bayestune.sampler import run as sampler_module
from bayestune.tasks import build_task_model, prepare_task

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SAMPLER = ["--steps", "6", "--warmup-steps", "2", "--burnin-steps", "3", "--thinning", "1",
           "--checkpoint-every", "2"]


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("bayestune ") and ": error: " in last, err
    return last


# --- a small task whose data a test may change --------------------------------------------------
@pytest.fixture
def task_data(tmp_path, glue_dir, tiny_model_dir):  # noqa: F811
    """16 RTE rows as a raw task folder and its prepared folder; ``prepare()`` again after an
    edit of the raw rows."""
    raw = tmp_path / "raw"
    rows = good("rte", glue_dir, 16)
    write_task(raw, "rte", three_splits(rows))
    prepared = tmp_path / "prep" / "rte"

    def prepare() -> Path:
        return prepare_task("rte", tiny_model_dir, prepared, raw, max_length=32)

    prepare()
    return raw / "rte", prepared, prepare


def sample_command(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "sample", "--task", "rte", "--model", model, "--data", str(data), "--out",
            str(out), "--checkpoint", str(out.with_suffix(".ckpt")), "--batch-size", "4",
            "--diagnostics-fisher-examples", "0", *SAMPLER, *extra]


class Killed(Exception):
    """Stands for a SIGKILL right after the sampler's first checkpoint."""


def killed_after_first_checkpoint(monkeypatch, command: list[str]) -> None:
    real = sampler_module._maybe_checkpoint

    def save_then_die(sampler, path, seed):
        real(sampler, path, seed)
        if path is not None and Path(path).is_file():
            raise Killed

    monkeypatch.setattr(sampler_module, "_maybe_checkpoint", save_then_die)
    with pytest.raises(Killed):
        main(command)
    monkeypatch.setattr(sampler_module, "_maybe_checkpoint", real)


# --- 1, 2: a checkpoint resumes only what it was made from ----------------------------------------
def test_checkpoint_resumed_after_the_data_changed_is_refused(tmp_path, tiny_model_dir,  # noqa: F811
                                                              task_data, monkeypatch, capsys):
    raw, prepared, prepare = task_data
    out = tmp_path / "seed0.safetensors"
    command = sample_command(tiny_model_dir, prepared, out)
    killed_after_first_checkpoint(monkeypatch, command)
    lines = (raw / "train.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["label"] = "entailment" if first["label"] != "entailment" else "not_entailment"
    (raw / "train.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    prepare()
    assert main(command) == 2
    line = error_line(capsys)
    assert "seed0.ckpt was made from other inputs" in line and "data:" in line
    assert "delete it to start over" in line
    assert out.with_suffix(".ckpt").is_file() and not out.exists()  # nothing lost


def test_checkpoint_resumed_with_another_batch_size_is_refused(tmp_path, tiny_model_dir,  # noqa: F811
                                                               task_data, monkeypatch, capsys):
    _, prepared, _ = task_data
    out = tmp_path / "seed0.safetensors"
    killed_after_first_checkpoint(monkeypatch, sample_command(tiny_model_dir, prepared, out))
    assert main([*sample_command(tiny_model_dir, prepared, out), "--batch-size", "8"]) == 2
    line = error_line(capsys)
    assert "batch_size: 4 -> 8" in line and "steps_per_epoch: 4 -> 2" in line


# --- 7: diagnostics of a resumed chain are those of the whole chain -------------------------------
def test_diagnostics_after_a_resume_cover_the_whole_chain(tmp_path, tiny_model_dir,  # noqa: F811
                                                          task_data, monkeypatch):
    _, prepared, _ = task_data
    whole, resumed = tmp_path / "whole" / "seed0.safetensors", tmp_path / "seed0.safetensors"
    assert main(sample_command(tiny_model_dir, prepared, whole)) == 0
    killed_after_first_checkpoint(monkeypatch, sample_command(tiny_model_dir, prepared, resumed))
    assert main(sample_command(tiny_model_dir, prepared, resumed)) == 0
    summaries = [files.load_diagnostics(files.diagnostics_paths(p)[0]) for p in (whole, resumed)]
    assert summaries[1]["resumed_at_steps"] == [2] and summaries[0]["resumed_at_steps"] == []
    assert summaries[1]["phases"] == summaries[0]["phases"]
    assert set(summaries[1]["phases"]) == {"warm-up", "burn-in", "sampling"}
    traces = [files.load_traces(files.diagnostics_paths(p)[1])[0] for p in (whole, resumed)]
    for name, tensor in traces[0].items():
        assert torch.equal(traces[1][name], tensor), name


# --- 8, 9: an output path that is an input or a kept file --------------------------------------
def test_out_equal_to_checkpoint_is_refused(tmp_path, tiny_model_dir, task_data, capsys):  # noqa: F811
    _, prepared, _ = task_data
    out = tmp_path / "seed0.safetensors"
    command = sample_command(tiny_model_dir, prepared, out)
    command[command.index("--checkpoint") + 1] = str(out)
    assert main(command) == 2
    assert f"--out {out} is the same file as --checkpoint" in error_line(capsys)


def test_apply_delta_out_equal_to_delta_is_refused(tmp_path, capsys):
    delta = tmp_path / "delta.safetensors"
    files.save_delta(delta, {"w": (None, torch.ones(3))}, {"task": "rte"})
    before = delta.read_bytes()
    assert main(["apply-delta", "--task", "rte", "--model", "minilm", "--delta", str(delta),
                 "--out", str(tmp_path / "." / "delta.safetensors")]) == 2
    assert "is the same file as --delta" in error_line(capsys)
    assert delta.read_bytes() == before


# --- 10 and the unclear errors: the schema's value checks on the command line --------------------
@pytest.mark.parametrize(("flags", "expected"), [
    (["--lr", "0"], "lr=0.0 must be a finite number > 0"),
    (["--lr", "-1e-3"], "lr=-0.001 must be a finite number > 0"),
    (["--lr=-1e-3"], "lr=-0.001 must be a finite number > 0"),
    (["--lr", "nan"], "lr=nan must be a finite number > 0"),
    (["--weight-decay", "inf"], "weight_decay=inf must be a finite number >= 0"),
])
def test_finetune_rates_are_checked_as_the_schema_does(tmp_path, flags, expected, capsys):
    assert main(["finetune", "--task", "rte", "--model", "minilm", "--data", str(tmp_path),
                 "--out-dir", str(tmp_path / "run"), *flags]) == 2
    assert expected in error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["sample", "finetune", "mask"])
def test_batch_size_zero_is_a_usage_error(tmp_path, command, capsys):
    extra = {"sample": ["--out", "x.safetensors"], "finetune": ["--out-dir", "x"],
             "mask": ["--out-dir", "x", "--method", "random", "--budgets", "0.01"]}[command]
    with pytest.raises(SystemExit) as stop:
        main([command, "--task", "rte", "--model", "minilm", "--batch-size", "0", *extra])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--batch-size: must be a whole number >= 1, got 0" in err and "Traceback" not in err


# --- 11: implausible scales are refused wherever they are read ------------------------------------
def test_mask_refuses_an_implausible_scale_file_unless_it_was_accepted(tmp_path, tiny_model_dir,  # noqa: F811
                                                                       capsys, caplog):
    model = build_task_model("rte", tiny_model_dir, 0)
    scales = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) * 1e-3
              for n, p in model.named_parameters()}
    name = next(iter(scales))
    scales[name].view(-1)[0] = 8.5e37
    path = tmp_path / "seed0.safetensors"
    meta = {"model_id": model.model_id, "architecture": model.architecture,
            "lambda_floor": 1e-8, "lr_lambda": 1e-2}
    files.save_scales(path, scales, meta)
    command = ["-q", "mask", "--method", "bayestune", "--scores", str(path), "--task", "rte",
               "--model", tiny_model_dir, "--budgets", "0.01", "--out-dir", str(tmp_path / "m")]
    assert main(command) == 2
    line = error_line(capsys)
    assert "cannot rank scalars: scales reach 8.5e+37" in line and "--allow-degenerate" in line
    assert not (tmp_path / "m").exists()
    files.save_scales(path, scales, {**meta, "accepted_problems": ["scales reach 8.5e+37"]})
    assert main(command) == 0
    assert "degenerate scales used as accepted" in caplog.text


# --- 6: a run's files are one run's, whatever moment it was killed at ---------------------------
def test_finetune_killed_between_its_writes_leaves_no_old_metrics(tmp_path, tiny_model_dir,  # noqa: F811
                                                                  task_data, monkeypatch):
    _, prepared, _ = task_data
    run = tmp_path / "run"
    command = ["-q", "finetune", "--task", "rte", "--model", tiny_model_dir, "--data",
               str(prepared), "--out-dir", str(run), *FINETUNE_FLAGS]
    assert main(command) == 0
    assert json.loads((run / "metrics.json").read_text())["seed"] == 0

    def die(path, *args, **kwargs):
        raise Killed

    monkeypatch.setattr(files, "write_json", die)
    with pytest.raises(Killed):
        main([*command, "--seed", "1"])
    assert files.load_delta(run / "delta.safetensors")[1]["seed"] == 1
    assert not (run / "metrics.json").exists()  # the marker of a finished run is written last


def test_mask_killed_between_budgets_leaves_no_mask_of_the_old_run(tmp_path, tiny_model_dir,  # noqa: F811
                                                                   monkeypatch):
    out = tmp_path / "masks"
    command = ["-q", "mask", "--method", "random", "--task", "rte", "--model", tiny_model_dir,
               "--budgets", "0.01,0.02", "--out-dir", str(out)]
    assert main(command) == 0
    real, written = files.save_mask, []

    def second_dies(path, *args, **kwargs):
        if written:
            raise Killed
        written.append(path)
        real(path, *args, **kwargs)

    monkeypatch.setattr(files, "save_mask", second_dies)
    with pytest.raises(Killed):
        main([*command, "--seed", "1"])
    left = {p.name: files.load_mask(p)[1]["seed"] for p in out.glob("*.safetensors")}
    assert left == {"p0.01.safetensors": 1}


# --- 4: run-jobs keys a finished job by its command -----------------------------------------------
def test_run_jobs_reruns_a_job_whose_command_changed_and_what_needs_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = tmp_path / "state"

    def run(job_list):
        return {o.job.id: o.status for o in jobs.run_jobs(job_list, 1, state,
                                                          command=python_command,
                                                          echo=lambda line: None)}

    first = [toy("a", outputs=["a.out"]), toy("b", inputs=["a.out"], outputs=["b.out"])]
    assert run(first) == {"a": "done", "b": "done"}
    assert run(first) == {"a": "skipped", "b": "skipped"}
    # Same id and outputs, another command line (as --seed 1 for --seed 0): a runs again, and
    # b, which reads what a wrote, after it.
    changed = [jobs.Job(**{**first[0].__dict__, "argv": ["a-seed1", "0", "a.out"]}), first[1]]
    assert run(changed) == {"a": "done", "b": "done"}
    assert (tmp_path / "a.out").read_text() == "a-seed1"
    # An older marker recorded no command: its job runs again, once.
    jobs._marker(state, first[1]).write_text("1.0\n")
    assert run(changed) == {"a": "skipped", "b": "done"}


# --- the orphan and the shared checkpoint ---------------------------------------------------------
WATCHED = """
import sys, time
from bayestune import liveness
liveness.WATCH_SECONDS = 0.1
try:
    liveness.watch_parent()
    print("running", flush=True)
    while True:
        time.sleep(0.05)
except KeyboardInterrupt:
    sys.exit(130 if liveness.PARENT_GONE.is_set() else 1)
"""


@pytest.mark.parametrize("sigint", [signal.SIG_DFL, signal.SIG_IGN], ids=["default", "ignored"])
def test_a_job_stops_when_the_process_that_started_it_is_gone(sigint):
    # "ignored": what a job inherits when a shell starts it in the background (cmd &)
    parent = subprocess.Popen(["sleep", "60"])
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), liveness.WATCH_ENV: str(parent.pid)}
    job = subprocess.Popen([sys.executable, "-c", WATCHED], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
    try:
        assert job.stdout.readline().strip() == "running"
        time.sleep(0.3)
        assert job.poll() is None  # its parent lives: it runs on
        parent.kill()
        parent.wait()
        _, err = job.communicate(timeout=30)
    finally:
        job.kill()
        parent.kill()
    assert job.returncode == 130, err
    assert f"the process that started this job (pid {parent.pid}" in err


def test_the_command_line_says_why_a_watched_job_stopped(monkeypatch, capsys):
    from bayestune.commands import diagnose

    def interrupted(args):
        liveness.PARENT_GONE.set()
        raise KeyboardInterrupt

    monkeypatch.setattr(liveness, "watch_parent", lambda: 4242)
    monkeypatch.setattr(diagnose, "run", interrupted)
    try:
        assert main(["diagnose", "x"]) == 130
    finally:
        liveness.PARENT_GONE.clear()
    err = capsys.readouterr().err
    assert "bayestune diagnose: stopped: the process that started it (pid 4242" in err
    monkeypatch.setattr(diagnose, "run", lambda args: (_ for _ in ()).throw(
        KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # a Ctrl-C of its own stays one
        main(["diagnose", "x"])


HOLD_LOCK = """
import sys, time
from bayestune.liveness import exclusive_lock
with exclusive_lock(sys.argv[1], "checkpoint"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_two_runs_cannot_share_a_live_checkpoint(tmp_path, capsys):
    checkpoint = tmp_path / "seed0.ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(checkpoint)], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        command = ["sample", "--task", "rte", "--model", "minilm", "--data", str(tmp_path / "d"),
                   "--out", str(tmp_path / "seed0.safetensors"), "--checkpoint", str(checkpoint)]
        assert main(command) == 2
        line = error_line(capsys)
        assert f"checkpoint {checkpoint} is in use by another run (process {other.pid}" in line
        assert "different results_dir" in line
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
    # The kernel dropped the dead holder's lock: the next run takes it (and removes the file).
    with liveness.exclusive_lock(checkpoint, "checkpoint"):
        pass
    assert not liveness.lock_path(checkpoint).exists()


# --- the prepared data's fingerprint --------------------------------------------------------------
def test_prepared_fingerprint_follows_the_data(task_data):
    raw, prepared, prepare = task_data
    before = guards.prepared_fingerprint(prepared)
    assert guards.prepared_fingerprint(prepare()) == before  # prepared again, same data
    (raw / "train.jsonl").write_text("\n".join((raw / "train.jsonl").read_text()
                                               .splitlines()[:-1]) + "\n")
    assert guards.prepared_fingerprint(prepare()) != before


# --- labels: the same number reads the same in every format ---------------------------------------
def test_label_one_point_zero_reads_alike_in_csv_and_json(tmp_path):
    from test_custom_tasks import reviews_task

    from bayestune.tasks import custom_text

    jsonl = '{"text": "good", "label": 1.0}\n{"text": "bad", "label": 0}\n'
    for suffix, body in ((".csv", "text,label\ngood,1.0\nbad,0\n"), (".jsonl", jsonl)):
        folder = tmp_path / suffix.strip(".")
        folder.mkdir()
        (folder / f"train{suffix}").write_text(body)
        (folder / f"test{suffix}").write_text(body)
        task = reviews_task(folder)["reviews"]
        examples = custom_text.read_examples(task, custom_text.open_source(task))
        assert [e.label for e in examples["test"]] == [1, 0], suffix


# --- 3: DVC reruns a config's stage when its raw data changes -------------------------------------
def test_dvc_stage_of_a_config_changes_with_its_raw_data(tmp_path, glue_dir):
    from test_workflow import copy_workflow, run_env

    from bayestune import data_source

    root = copy_workflow(tmp_path / "repo")
    shutil.copytree(REPO / "src/bayestune", root / "src/bayestune",
                    ignore=shutil.ignore_patterns("__pycache__"))
    raw = tmp_path / "raw"
    for task in ("cb", "stsb"):
        write_task(raw, task, three_splits(good(task, glue_dir, 8)))
    env = run_env(raw)
    stage = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["sources"]
    assert stage["do"]["always_changed"] and "bayestune.data_source" in stage["do"]["cmd"]
    out = root / stage["foreach"]["demo"]["out"]

    def sources() -> None:  # what the stage's command does
        cwd = os.getcwd()
        os.chdir(root)
        try:
            os.environ["BAYESTUNE_GLUE_DIR"] = str(raw)
            data_source.main(["--config", "config/demo.yaml", "--out", str(out)])
        finally:
            os.chdir(cwd)

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "dvc"), *args], cwd=root, env=env, capture_output=True,
                              text=True, timeout=120)

    previous = os.environ.get("BAYESTUNE_GLUE_DIR")
    try:
        sources()
        for folder in ("data/demo", "results/demo/scales", "results/demo/masks",
                       "results/demo/finetune", "results/demo/figures"):
            (root / folder).mkdir(parents=True)
        for name in ("scores.csv", "table.csv", "table.md", "paired.csv", "table.html",
                     "provenance.csv", "selection.csv"):
            (root / f"results/demo/glue_{name}").write_text("x\n")
        assert dvc("init", "--no-scm", "-q").returncode == 0
        committed = dvc("commit", "-f", "glue@demo")
        assert committed.returncode == 0, committed.stderr
        assert "up to date" in dvc("status", "glue@demo").stdout
        rows = [json.loads(line) for line in (raw / "cb/train.jsonl").read_text().splitlines()]
        rows[0]["label"] = "neutral" if rows[0]["label"] != "neutral" else "entailment"
        (raw / "cb/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        sources()
    finally:
        if previous is None:
            os.environ.pop("BAYESTUNE_GLUE_DIR", None)
        else:
            os.environ["BAYESTUNE_GLUE_DIR"] = previous
    status = dvc("status", "glue@demo").stdout
    assert "changed deps" in status and "data/sources/demo.json" in status


# --- 5 and the start-up check: quoted paths, and a config that cannot work ------------------------
def _snakemake(root: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_paths_with_spaces_stay_one_argument_in_every_rule(tmp_path, glue_dir):
    from test_workflow import copy_workflow, run_env, write_config

    root = copy_workflow(tmp_path / "repo")
    (root / "out").mkdir()
    (root / "out/my").write_text("a user's file\n")
    config = write_config(root / "spaced.yaml", root / "tests/config/tiny.yaml",
                          results_dir="out/my run", prepared_dir="data/my data")
    run = _snakemake(root, "-n", "-p", "--cores", "1", "--configfile", str(config),
                     env=run_env(glue_dir))
    assert run.returncode == 0, run.stderr[-3000:]
    commands = [shlex.split(line.removeprefix("Shell command: "))
                for line in run.stdout.splitlines()
                if line.startswith("Shell command: ") and "bayestune" in line]
    assert len(commands) > 10
    for argv in commands:
        paths = [argv[i + 1] for i, a in enumerate(argv[:-1])
                 if a in (">", "--out", "--out-dir", "--data", "--checkpoint", "--figures-dir")]
        assert paths and all(p == "out/my run" or p.startswith(("out/my run/", "data/my data/"))
                             for p in paths), argv
        for flag in ("--mask", "--scores", "--start"):
            if flag in argv:
                assert argv[argv.index(flag) + 1].startswith("out/my run/"), argv
    assert (root / "out/my").read_text() == "a user's file\n"


def test_a_config_that_cannot_work_is_refused_before_any_job(tmp_path, glue_dir):
    from test_workflow import copy_workflow, run_env

    root = copy_workflow(tmp_path / "repo")
    (root / "blocker").write_text("a file\n")
    config = yaml.safe_load((root / "tests/config/tiny.yaml").read_text())
    config.update(results_dir="blocker/results", glue_dir="missing/glue")
    config["sampler"]["steps"] = 0
    config["finetune_by_method"] = {"random": {"max_steps": 0}, "full": {"lr": float("nan")}}
    (root / "bad.yaml").write_text(yaml.safe_dump(config))
    env = run_env()
    env.pop("BAYESTUNE_GLUE_DIR", None)
    run = _snakemake(root, "--cores", "1", "--configfile", "bad.yaml", env=env)
    printed = run.stdout + run.stderr
    assert run.returncode != 0 and "Traceback" not in printed
    for expected in ("sampler (preset exact, seed 0): bad sampler config: steps=0",
                     "finetune of random: max_steps (>= 1)",
                     "finetune of full: lr=nan must be a finite number > 0",
                     "results_dir: blocker/results cannot be a folder, since",
                     f"task-data folder {root / 'missing/glue'} (from config key glue_dir) "
                     "does not exist"):
        assert expected in printed, printed[-3000:]


def test_data_folder_message_names_where_the_path_came_from(tmp_path):
    missing = str(tmp_path / "nowhere")
    assert "(from $BAYESTUNE_GLUE_DIR)" in check_data_dir(
        missing, env_name="BAYESTUNE_GLUE_DIR", key="glue_dir", from_env=True)
    assert "(from config key glue_dir)" in check_data_dir(
        missing, env_name="BAYESTUNE_GLUE_DIR", key="glue_dir", from_env=False)
    assert check_data_dir("hub", env_name="X", key="glue_dir", from_env=False) is None
    assert check_data_dir(str(tmp_path), env_name="X", key="glue_dir", from_env=False) is None


# --- found by probing: outputs that cannot be written or would land in what is read ------------
def test_outputs_are_checked_before_any_work(tmp_path, tiny_model_dir, task_data, capsys):  # noqa: F811
    raw, prepared, _ = task_data
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder").mkdir()
    cases = {
        "under a file": (str(tmp_path / "afile" / "s.safetensors"), "is a file, not a folder"),
        "a folder": (str(tmp_path / "folder"), "is a folder; give the path of a file"),
        "in the prepared data": (str(prepared / "tokens.safetensors"), "lies inside --data"),
    }
    before = (prepared / "tokens.safetensors").read_bytes()
    for out, expected in cases.values():
        assert main(sample_command(tiny_model_dir, prepared, Path(out))) == 2
        assert expected in error_line(capsys)
    assert (prepared / "tokens.safetensors").read_bytes() == before
    assert main(["prepare", "--task", "rte", "--model", tiny_model_dir, "--data-dir",
                 str(raw.parent), "--out-dir", str(raw)]) == 2
    assert "lies inside the task's raw data folder" in error_line(capsys)
    assert not (raw / "tokens.safetensors").exists()


def test_unreadable_inputs_of_other_commands_end_in_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    assert main(["diagnose", str(tmp_path / "notes.txt")]) == 2
    assert "neither a scale file (.safetensors) nor a sampler checkpoint" in error_line(capsys)
    files.write_json(tmp_path / "jobs.json", {"version": jobs.JOB_LIST_VERSION, "config": "x",
                                              "jobs": [{"id": "a", "rule": "r", "argv": [],
                                                        "priority": 1}]})
    assert main(["run-jobs", "--jobs", str(tmp_path / "jobs.json")]) == 2
    assert "does not fit this version" in error_line(capsys)
    from bayestune import data_source

    assert data_source.main(["--config", str(tmp_path / "none.yaml"), "--out",
                             str(tmp_path / "s.json")]) == 2
    assert "cannot read the run config" in capsys.readouterr().err

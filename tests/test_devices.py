"""GPU slots: concurrent jobs never share a slot, a dead job's slot frees up, devices follow
slot // jobs_per_gpu. The GPUs are faked (a count handed in); no GPU is needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

from bayestune import cli, devices
from bayestune.commands import finetune as finetune_command
from bayestune.devices import NoFreeGpuSlot, choose_device, slot_order, take_slot

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _release_held_slots():
    yield
    while devices._HELD:
        devices._HELD.pop().release()


def test_every_gpu_gets_a_job_before_any_gets_two() -> None:
    assert slot_order(3, 2) == [0, 2, 4, 1, 3, 5]
    assert [s // 2 for s in slot_order(3, 2)] == [0, 1, 2, 0, 1, 2]
    assert slot_order(2, 1) == [0, 1]


def test_concurrent_threads_never_share_a_slot(tmp_path) -> None:
    n_gpus, per_gpu = 4, 2
    start = threading.Barrier(n_gpus * per_gpu)
    taken, errors = [], []

    def job() -> None:
        start.wait()
        try:
            taken.append(take_slot(tmp_path, n_gpus, per_gpu, timeout=10, poll_seconds=0.01))
        except Exception as err:  # noqa: BLE001 - reported by the assert below
            errors.append(err)

    threads = [threading.Thread(target=job) for _ in range(n_gpus * per_gpu)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(s.slot for s in taken) == list(range(n_gpus * per_gpu))
    assert Counter(s.gpu for s in taken) == dict.fromkeys(range(n_gpus), per_gpu)
    with pytest.raises(NoFreeGpuSlot, match="--resources gpu=8"):
        take_slot(tmp_path, n_gpus, per_gpu, timeout=0.2, poll_seconds=0.01)
    freed = taken[3]
    freed.release()
    again = take_slot(tmp_path, n_gpus, per_gpu, timeout=1, poll_seconds=0.01)
    assert (again.slot, again.gpu) == (freed.slot, freed.gpu)
    for slot in [*taken, again]:
        slot.release()


HOLDER = """
import sys, time
from bayestune.devices import take_slot
slot = take_slot(sys.argv[1], 2, 1, timeout=30, poll_seconds=0.01)
print(slot.slot, flush=True)
time.sleep(120)
"""


def _holder(folder: Path) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], env=env,
                            stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def test_a_killed_job_frees_its_slot(tmp_path) -> None:
    first, first_slot = _holder(tmp_path)
    second, second_slot = _holder(tmp_path)
    try:
        assert {first_slot, second_slot} == {0, 1}  # two processes, two slots
        with pytest.raises(NoFreeGpuSlot):
            take_slot(tmp_path, 2, 1, timeout=0.2, poll_seconds=0.01)
        first.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the lock
        first.wait(timeout=10)
        slot = take_slot(tmp_path, 2, 1, timeout=5, poll_seconds=0.01)
        assert slot.slot == first_slot
        slot.release()
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait(timeout=10)


def test_device_follows_the_visible_gpus(tmp_path) -> None:
    assert choose_device("auto", tmp_path, 1, n_gpus=0) == torch.device("cpu")
    with pytest.raises(ValueError, match="no GPU is visible"):
        choose_device("cuda", tmp_path, 1, n_gpus=0)
    # One visible GPU (the machine's only one, or the one SLURM gave the job): no slot taken
    assert choose_device("auto", tmp_path / "one", 2, n_gpus=1) == torch.device("cuda")
    assert not (tmp_path / "one").exists()
    assert choose_device("cpu", tmp_path, 1, n_gpus=4) == torch.device("cpu")
    assert choose_device("cuda:3", tmp_path, 1, n_gpus=4) == torch.device("cuda", 3)
    chosen = [choose_device("auto", tmp_path, 2, n_gpus=3, timeout=0) for _ in range(6)]
    assert [d.index for d in chosen] == [0, 1, 2, 0, 1, 2]
    assert len(devices._HELD) == 6  # held until the process ends


def test_cli_runs_each_job_on_its_slots_gpu(tmp_path, monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(finetune_command, "run", lambda args: seen.append(args.device))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    argv = ["finetune", "--task", "cb", "--model", "minilm", "--out-dir", str(tmp_path / "run"),
            "--gpu-slots", str(tmp_path / "slots"), "--jobs-per-gpu", "2"]
    for _ in range(3):
        assert cli.main(argv) == 0
    assert seen == ["cuda:0", "cuda:1", "cuda:0"]
    assert cli.main([*argv[:-4], "--device", "cpu", *argv[-4:]]) == 0
    assert seen[-1] == "cpu"


def test_freed_memory_is_kept_for_reuse_where_glibc_allows():
    import platform

    from bayestune.devices import keep_freed_memory

    took = keep_freed_memory()
    assert took == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")

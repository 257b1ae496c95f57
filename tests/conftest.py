"""Shared fixtures. Real task data is read in place from ../shared, never copied."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def glue_data_dir() -> Path:
    return Path(os.environ.get("BAYESTUNE_GLUE_DIR", REPO.parent / "shared/data/glue_superglue"))


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    path = glue_data_dir()
    if not (path / "cola" / "train.jsonl").is_file():
        pytest.fail(f"GLUE/SuperGLUE data not found at {path}; set BAYESTUNE_GLUE_DIR")
    return path


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    # Tests run beside other work on two cores; one intra-op thread keeps timings sane.
    torch.set_num_threads(1)
    yield


# Jobs that the tests start (Snakemake, DVC, make) find the task data as `make test` gives it
# to them, also when pytest is run directly.
os.environ.setdefault("BAYESTUNE_GLUE_DIR", str(glue_data_dir()))


# The longest files first, so that two test processes (make test: pytest-xdist, a process per
# file) are not left with one long file each at the end. test_workflow builds the session's
# shared finished run first; test_reruns, which reads it, comes in its alphabetical place,
# long after. xdist would sort the files by their number of tests instead, which puts these
# (few tests, minutes each) last: make test turns that off (--no-loadscope-reorder).
FIRST = ("test_workflow.py", "test_slurm_cluster.py", "test_jobs.py", "test_custom_workflow.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return FIRST.index(name) if name in FIRST else len(FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order

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

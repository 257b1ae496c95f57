"""What several test files need built once per test session: a tiny random encoder of
MiniLM's family, and finished workflow runs.

With pytest-xdist the test files run in several processes; each thing is built once, by the
first process that asks for it, under a file lock in a folder all processes of this session
share, and the others wait for it. A build writes a marker last, and a folder without it (a
failed or killed build) is built again, so nothing half-made is mistaken for a finished one.
Builds happen in place (the workflow and DVC record where they ran).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]

# A BERT of MiniLM's family (same tokenizer and vocabulary, a pooler, two token types) small
# enough that a training step takes milliseconds: for tests of plumbing, not of what a
# pretrained encoder learns.
TINY_ENCODER = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt")


def session_dir(factory: pytest.TempPathFactory) -> Path:
    """A folder every test process of this session sees (xdist workers share a run id)."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    base = factory.getbasetemp()
    path = base.parent / f"shared-{run}" if run else base / "shared"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_once(path: Path, build: Callable[[Path], None]) -> Path:
    """``path``, built by ``build(path)`` the first time it is asked for in this session."""
    done = path / ".built"
    with FileLock(str(path) + ".lock"):
        if not done.is_file():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            build(path)
            done.touch()
    return path


def key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def write_tiny_encoder(out: Path, seed: int = 0, **sizes: int) -> Path:
    """A randomly initialised BERT of MiniLM's family with MiniLM's tokenizer, saved as a model
    folder that every command accepts as ``--model``."""
    import torch
    from transformers import BertConfig, BertModel

    from bayestune.models.text import resolve_model_path

    minilm = Path(resolve_model_path("minilm"))
    config = BertConfig.from_pretrained(minilm)
    for name, value in {**TINY_ENCODER, **sizes}.items():
        setattr(config, name, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy2(minilm / name, out / name)
    return out


def tiny_encoder(factory: pytest.TempPathFactory, **sizes: int) -> Path:
    """The session's tiny encoder folder (one per size)."""
    path = session_dir(factory) / f"tiny-encoder-{key(TINY_ENCODER, sizes)}"
    return build_once(path, lambda tmp: write_tiny_encoder(tmp, **sizes))


# --- the workflow, as the tests run it --------------------------------------------------------
BIN = Path(sys.executable).parent  # the venv's bin: snakemake, dvc and bayestune live there
WORKFLOW_FILES = ["Snakefile", "workflow", "config", "profiles", "dvc.yaml", ".dvcignore",
                  "tests/config"]
# The fair protocol at its smallest: two candidates per method, bayestune's two presets.
TINY_TUNING = {"candidates": 2, "grid": {
    "default": [{"lr": 1e-3}, {"lr": 3e-3}], "full": [{"lr": 5e-5}, {"lr": 2e-4}],
    "bayestune": [{"preset": "exact", "lr": 1e-3}, {"preset": "cold", "lr": 1e-3}]}}


def copy_workflow(dst: Path) -> Path:
    """The workflow without results: runs in tests never touch the repository's own folders."""
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


def copy_package(dst: Path) -> None:
    """The package's sources inside a workflow copy: its rules hash and run these."""
    shutil.copytree(REPO / "src/bayestune", dst / "src/bayestune",
                    ignore=shutil.ignore_patterns("__pycache__"))


def run_env(glue_dir: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("SNAKEMAKE_PROFILE", None)
    if glue_dir is not None:
        env["BAYESTUNE_GLUE_DIR"] = str(glue_dir)
    env.update(extra)
    return env


def write_config(path: Path, base: Path, **changes) -> Path:
    config = yaml.safe_load(base.read_text())
    config.update(changes)
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_config(run: Path, name: str, glue_dir: Path, model: Path, **changes) -> Path:
    """tests/config/tiny.yaml on the tiny encoder, the task data given relative to the run (as
    the configs give it) and the fair protocol's two candidates."""
    return write_config(run / name, REPO / "tests/config/tiny.yaml", model=str(model),
                        glue_dir=os.path.relpath(glue_dir, run), tuning=TINY_TUNING,
                        **changes)


@dataclass(frozen=True)
class FinishedRun:
    """The tiny config through ``dvc repro`` to its tables and figures, once per session."""

    path: Path
    config: Path
    seconds: float

    def copy_to(self, dst: Path) -> Path:
        """A copy to change: the shared run itself is only read."""
        shutil.copytree(self.path, dst, symlinks=True)
        return dst


def finished_run(factory: pytest.TempPathFactory, glue_dir: Path) -> FinishedRun:
    model = tiny_encoder(factory)
    path = session_dir(factory) / "finished-tiny-run"

    def build(run: Path) -> None:
        copy_workflow(run)
        copy_package(run)  # DVC hashes the stage's deps; the rules hash what they run
        tiny_config(run, "tests/config/tiny_fair.yaml", glue_dir, model)
        stages = yaml.safe_load((run / "dvc.yaml").read_text())
        tiny = {"config": "tests/config/tiny_fair.yaml", "results": "results/tiny",
                "data": "data/tiny", "sources": "data/sources/tiny.json"}
        stages["stages"]["glue"]["foreach"] = {"tiny": tiny}
        stages["stages"]["sources"]["foreach"] = {"tiny": {"config": tiny["config"],
                                                           "out": tiny["sources"]}}
        del stages["stages"]["vtab"]
        (run / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
        env = workflow_env()
        assert dvc(run, "init", "--no-scm", env=env).returncode == 0
        started = time.monotonic()
        first = dvc(run, "repro", "glue@tiny", env=env)
        logs = "\n".join(f"{p}:\n{p.read_text()[-1500:]}" for p in (
            run / "results/tiny/logs").rglob("*.log")) if first.returncode else ""
        assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-5000:] + logs
        (run / ".seconds").write_text(f"{time.monotonic() - started:.1f}")

    build_once(path, build)
    return FinishedRun(path, path / "tests/config/tiny_fair.yaml",
                       float((path / ".seconds").read_text()))


def workflow_env(**extra: str) -> dict[str, str]:
    """The environment of a run whose config names its task data (no BAYESTUNE_GLUE_DIR)."""
    env = run_env(**extra)
    if "BAYESTUNE_GLUE_DIR" not in extra:
        env.pop("BAYESTUNE_GLUE_DIR", None)
    return env


def dvc(cwd: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)

"""Where a result came from, and which code a subcommand runs.

* :func:`collect` builds the provenance record that every scale, mask, delta and metrics file
  carries (:mod:`bayestune.files` attaches it): package version, git commit of the source and
  whether it had uncommitted changes, a hash of the code the subcommand runs, a hash of the
  lock file, a hash of the resolved settings the command ran with, Python/torch/transformers
  versions and the device. The report groups runs by it and warns when one table mixes code
  or software.
* :func:`command_code_hash` hashes the modules a ``bayestune`` subcommand runs, and
  :func:`job_code_hash` those of one job (with its method's and its task kind's modules); both
  live in :mod:`bayestune.code_hash` and are re-exported here. The workflow passes a job's hash
  to its rule as a parameter, so a change to that code reruns that stage and what follows only.

Only the standard library is imported here: the workflow reads this module when it starts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import platform
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from bayestune import __version__
from bayestune.code_hash import (
    PACKAGE,
    command_code_hash,
    command_modules,
    job_code_hash,
    job_modules,
    package_dir,
)
from bayestune.code_hash import sha256_of as _sha256

__all__ = ["PACKAGE", "collect", "command_code_hash", "command_modules", "config_hash",
           "folder_fingerprint", "git_state", "job_code_hash", "job_modules", "lock_file",
           "lock_hash", "package_dir", "software", "upstream"]
LOCK_FILE = "requirements.lock"


# --- the source, the lock, the software -----------------------------------------------------
@functools.cache
def git_state(where: Path | None = None) -> dict[str, Any]:
    """``{"git_commit", "git_dirty"}`` of the checkout holding the package's sources; both None
    outside one (an installed wheel, no git). Dirty means uncommitted changes, tracked or not,
    under the package folder."""
    where = Path(where) if where is not None else package_dir()
    unknown = {"git_commit": None, "git_dirty": None}

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                              timeout=30)

    try:
        # The sources must be tracked: a package installed into a venv inside some checkout
        # would otherwise borrow that checkout's commit.
        tracked = git("ls-files", "--error-unmatch", "__init__.py")
        head = git("rev-parse", "HEAD")
        if tracked.returncode or head.returncode:
            return unknown
        status = git("status", "--porcelain", "--untracked-files=normal", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return unknown
    return {"git_commit": head.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def lock_file(root: Path | None = None) -> Path | None:
    """requirements.lock of the source checkout (src/bayestune -> ../../), if there is one."""
    root = Path(root) if root is not None else package_dir()
    candidate = root.parent.parent / LOCK_FILE
    return candidate if root.parent.name == "src" and candidate.is_file() else None


@functools.cache
def lock_hash(root: Path | None = None) -> str | None:
    path = lock_file(root)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path else None


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def software() -> dict[str, Any]:
    """Python, torch and transformers versions, read from the installed metadata (no import)."""
    return {"python": platform.python_version(), "torch": _version("torch"),
            "transformers": _version("transformers")}


def _plain(value: Any) -> Any:
    """Dataclasses, mappings, sequences and paths as JSON values, for hashing."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def config_hash(config: Any) -> str:
    """sha256 of the settings a command ran with (a dataclass, a mapping of them, ...)."""
    text = json.dumps(_plain(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def describe_device(device: Any) -> str | None:
    """"cpu", or "cuda (<GPU name>)" so that a table can tell its GPUs apart."""
    if device is None:
        return None
    text = str(device)
    if text.startswith("cuda"):
        import torch  # only when a GPU run asks; torch is loaded by then anyway

        if torch.cuda.is_available():
            return f"{text} ({torch.cuda.get_device_name(torch.device(text))})"
    return text


def collect(command: str | None = None, config: Any = None, device: Any = None) -> dict[str, Any]:
    """The provenance record of one output file (see the module docstring for the fields).

    ``command`` (a ``bayestune`` subcommand) adds the hash of the code it runs; ``config`` the
    hash of the resolved settings; ``device`` the device the work ran on.
    """
    record: dict[str, Any] = {"bayestune_version": __version__, **git_state()}
    record["command"] = command
    record["code_sha256"] = _cached_code_hash(command) if command else None
    record["lock_sha256"] = lock_hash()
    record.update(software())
    record["config_sha256"] = config_hash(config) if config is not None else None
    record["device"] = describe_device(device)
    return record


@functools.cache
def _cached_code_hash(command: str) -> str:
    return command_code_hash(command)


def upstream(meta: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The provenance chain of an input file, to store with what is made from it: ``{stage:
    its record, **what it was made from}`` (e.g. a mask's: its own and its scale file's)."""
    chain = dict(meta.get("upstream") or {})
    if meta.get("provenance") is not None:
        chain[stage] = meta["provenance"]
    return chain


def folder_fingerprint(folder: str | Path) -> str:
    """sha256 of the names and bytes of the files directly in ``folder``: a task's split or
    list files, so that the same data under another path or spelling hashes alike. Subfolders
    (VTAB's images) are left out: the workflow hashes at every start. A missing folder gives a
    marker, and the job that reads it reports the problem."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"missing:{folder.name}"
    paths = sorted(p for p in folder.iterdir() if p.is_file())
    return _sha256(part for p in paths for part in (p.name.encode(), p.read_bytes()))

"""Where a result came from, and which code a subcommand runs.

* :func:`collect` builds the provenance record that every scale, mask, delta and metrics file
  carries (``files.py`` attaches it): package version, git commit of the source and whether it
  had uncommitted changes, a hash of the code the subcommand runs, a hash of the lock file, a
  hash of the resolved settings the command ran with, Python/torch/transformers versions and
  the device. The report groups runs by it and warns when one table mixes code or software.
* :func:`command_code_hash` hashes the modules a ``bayestune`` subcommand runs, found by reading
  the sources with :mod:`ast` (nothing is imported, so no torch): the workflow passes it to each
  rule as a parameter, and a change to that code reruns that stage and what follows only.

Only the standard library is imported here: the workflow reads this module when it starts.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import platform
import subprocess
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from bayestune import __version__

PACKAGE = "bayestune"
LOCK_FILE = "requirements.lock"


def package_dir() -> Path:
    """The folder of the ``bayestune`` package this process runs."""
    return Path(__file__).resolve().parent


def _sha256(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(len(chunk).to_bytes(8, "little"))  # no two inputs concatenate alike
        digest.update(chunk)
    return digest.hexdigest()


# --- the code a subcommand runs -------------------------------------------------------------
def _module_file(module: str, root: Path) -> Path | None:
    """``bayestune.a.b`` -> root/a/b.py or root/a/b/__init__.py (root: the package folder)."""
    parts = module.split(".")[1:]
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py") if parts else None, base / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _is_package(module: str, root: Path) -> bool:
    path = _module_file(module, root)
    return path is not None and path.name == "__init__.py"


def _imported_modules(nodes: Iterable[ast.AST], module: str, root: Path) -> set[str]:
    """The package's modules named by the import statements among ``nodes`` (any depth).

    ``from bayestune.x import y`` names bayestune.x and, when y is a submodule, bayestune.x.y;
    relative imports are resolved against ``module``."""
    found: set[str] = set()
    package = module if _is_package(module, root) else module.rpartition(".")[0]
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                found.update(a.name for a in sub.names if a.name.split(".")[0] == PACKAGE)
            elif isinstance(sub, ast.ImportFrom):
                if sub.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (sub.level - 1)]
                    base = ".".join(anchor + ([sub.module] if sub.module else []))
                else:
                    base = sub.module or ""
                if base.split(".")[0] != PACKAGE:
                    continue
                found.add(base)
                found.update(f"{base}.{a.name}" for a in sub.names
                             if _module_file(f"{base}.{a.name}", root) is not None)
    return {m for m in found if _module_file(m, root) is not None}


def _with_parents(modules: Iterable[str]) -> set[str]:
    """Importing bayestune.a.b runs bayestune/__init__.py and bayestune/a/__init__.py too."""
    out = set()
    for module in modules:
        parts = module.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def _cli_function_closure(tree: ast.Module, command: str) -> list[ast.AST]:
    """The ``cmd_<command>`` function of cli.py and the cli.py functions it calls, transitively."""
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    start = "cmd_" + command.replace("-", "_")
    if start not in functions:
        known = sorted(n.removeprefix("cmd_").replace("_", "-") for n in functions
                       if n.startswith("cmd_"))
        raise ValueError(f"no subcommand {command!r} in bayestune's cli.py; known: "
                         f"{', '.join(known)}")
    reached, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        todo.extend(n.id for n in ast.walk(functions[name])
                    if isinstance(n, ast.Name) and n.id in functions)
    return [functions[name] for name in sorted(reached)]


def command_modules(command: str, root: Path | None = None) -> list[str]:
    """Every module of the package that ``bayestune <command>`` runs, sorted.

    From the subcommand's function in cli.py (and the cli.py helpers it calls), every import of
    a ``bayestune`` module is followed, and from those modules every import at any depth: an
    import inside a function runs whenever that function does, so leaving it out could keep a
    result whose code has changed. cli.py and ``__main__`` run for every subcommand.
    """
    root = Path(root) if root is not None else package_dir()
    cli = f"{PACKAGE}.cli"
    cli_path = _module_file(cli, root)
    if cli_path is None:
        raise FileNotFoundError(f"{root}: no cli.py; is this the bayestune package folder?")
    tree = ast.parse(cli_path.read_bytes(), filename=str(cli_path))
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    # cli.py and __main__ are counted whole but followed only from the subcommand's function:
    # the other subcommands' imports are not this one's code.
    seen = {m for m in (cli, f"{PACKAGE}.__main__") if _module_file(m, root) is not None}
    entry = _imported_modules(top_level + _cli_function_closure(tree, command), cli, root)
    todo = _with_parents(entry | seen) - seen
    while todo:
        module = todo.pop()
        seen.add(module)
        stat = _module_file(module, root).stat()
        found = _module_imports(module, root, (stat.st_mtime_ns, stat.st_size))
        todo |= _with_parents(found) - seen
    return sorted(seen)


@functools.lru_cache(maxsize=512)
def _module_imports(module: str, root: Path, stamp: tuple[int, int]) -> frozenset[str]:
    """The package modules one module imports; ``stamp`` (mtime, size) renews the cache entry
    when the file changes, so the workflow reads each file once for all its subcommands."""
    path = _module_file(module, root)
    return frozenset(_imported_modules([ast.parse(path.read_bytes(), filename=str(path))],
                                       module, root))


def command_code_hash(command: str, root: Path | None = None) -> str:
    """sha256 over the names and bytes of :func:`command_modules`: changes exactly when the
    code ``bayestune <command>`` runs changes (comments and docstrings included)."""
    root = Path(root) if root is not None else package_dir()
    modules = command_modules(command, root)
    return _sha256(part for module in modules
                   for part in (module.encode(), _module_file(module, root).read_bytes()))


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

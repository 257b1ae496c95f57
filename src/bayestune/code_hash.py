"""Which code a ``bayestune`` subcommand runs, and its hash: the key of the workflow's reruns.

The modules are found by reading the sources with :mod:`ast` (nothing is imported, so no
torch): from the subcommand's module every import of a ``bayestune`` module is followed, and
from those modules every import at any depth. An import inside a function runs whenever that
function does, so leaving it out could keep a result whose code has changed; importing a
module runs its package's ``__init__`` too.

What every subcommand runs is ``__main__`` and the command line (:mod:`bayestune.cli`: the
parser, the flags, the dispatch); what one subcommand runs besides is its module in the
dispatch table (:data:`bayestune.cli.dispatch.COMMANDS`) and what that imports. The other
subcommands' modules (their flags, their help) are named in the table, not imported, so they
are not part of it, and the table itself is read here, not hashed: the module's name is.

A job loads some code by name, as its inputs say: the module of its method (a mask job's
method, a fine-tuning job's adapter) and the module of its declared task's kind. The tables
that name them (``METHOD_MODULES`` and ``ADAPTERS`` in :mod:`bayestune.methods`,
``CUSTOM_KINDS`` in :mod:`bayestune.tasks`) are literals read here, and :func:`job_code_hash`
adds the job's modules: an edit to one method reruns that method's jobs only.

Only the standard library is imported here: the workflow reads this module when it starts.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PACKAGE = "bayestune"
DISPATCH = f"{PACKAGE}.cli.dispatch"  # read for the command's module, not hashed
# The subcommands that load a method's module by name: a mask job its method's, a fine-tuning
# job an adapter's (a masked run trains the mask file's scalars: no method code runs).
_LOADS_METHOD = ("mask", "finetune")


def package_dir() -> Path:
    """The folder of the ``bayestune`` package this process runs."""
    return Path(__file__).resolve().parent


def sha256_of(chunks: Iterable[bytes]) -> str:
    """sha256 of byte strings, each prefixed by its length: no two inputs concatenate alike."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(len(chunk).to_bytes(8, "little"))
        digest.update(chunk)
    return digest.hexdigest()


# --- modules and their imports --------------------------------------------------------------
def _module_file(module: str, root: Path) -> Path | None:
    """``bayestune.a.b`` -> root/a/b/__init__.py or root/a/b.py, the one Python imports (a
    package wins over a module of the same name); root is the package folder."""
    parts = module.split(".")[1:]
    base = root.joinpath(*parts)
    for candidate in (base / "__init__.py", base.with_suffix(".py") if parts else None):
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


@functools.lru_cache(maxsize=512)
def _module_imports(module: str, root: Path, stamp: tuple[int, int]) -> frozenset[str]:
    """The package modules one module imports; ``stamp`` (mtime, size) renews the cache entry
    when the file changes, so the workflow reads each file once for all its subcommands."""
    path = _module_file(module, root)
    return frozenset(_imported_modules([ast.parse(path.read_bytes(), filename=str(path))],
                                       module, root))


def _closure(entry: Iterable[str], root: Path, seen: Iterable[str] = (),
             skip: frozenset[str] = frozenset()) -> list[str]:
    """``entry`` and ``seen`` and every module they import, transitively, sorted; the modules
    in ``skip`` are neither counted nor followed."""
    seen = set(seen)
    todo = _with_parents({*entry, *seen}) - seen - skip
    while todo:
        module = todo.pop()
        seen.add(module)
        stat = _module_file(module, root).stat()
        found = _module_imports(module, root, (stat.st_mtime_ns, stat.st_size))
        todo |= _with_parents(found) - seen - skip
    return sorted(seen)


def literal(module: str, name: str, root: Path | None = None) -> Any:
    """The value of a top-level ``name = <literal>`` of a module, read without importing it."""
    root = Path(root) if root is not None else package_dir()
    path = _module_file(module, root)
    if path is None:
        raise FileNotFoundError(f"{root}: no module {module}; is this the bayestune package?")
    for node in ast.parse(path.read_bytes(), filename=str(path)).body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and node.value:
            return ast.literal_eval(node.value)
    raise ValueError(f"{path}: no literal {name} = ... at the top level")


# --- a subcommand and a job -----------------------------------------------------------------
def _cli_function_closure(tree: ast.Module, command: str) -> list[ast.AST]:
    """The ``cmd_<command>`` function of a one-module cli.py and the functions of it that it
    calls, transitively."""
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


def _one_module_entry(command: str, root: Path) -> tuple[set[str], set[str]]:
    """A command line written as one module, cli.py with a ``cmd_<command>`` function per
    subcommand: cli.py is counted whole but followed only from the subcommand's function."""
    cli = f"{PACKAGE}.cli"
    path = _module_file(cli, root)
    tree = ast.parse(path.read_bytes(), filename=str(path))
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    seen = {m for m in (cli, f"{PACKAGE}.__main__") if _module_file(m, root) is not None}
    return _imported_modules(top_level + _cli_function_closure(tree, command), cli, root), seen


def command_modules(command: str, root: Path | None = None, *,
                    loaded: Iterable[str] = ()) -> list[str]:
    """Every module of the package that ``bayestune <command>`` runs, sorted; ``loaded``: the
    modules a job loads by name besides (see :func:`job_modules`)."""
    root = Path(root) if root is not None else package_dir()
    if _module_file(f"{PACKAGE}.cli", root) is None:
        raise FileNotFoundError(f"{root}: no command line (cli); is this the bayestune "
                                "package folder?")
    if not _is_package(f"{PACKAGE}.cli", root):
        entry, seen = _one_module_entry(command, root)
        return _closure(entry | set(loaded), root, seen)
    commands = literal(DISPATCH, "COMMANDS", root)
    if command not in commands:
        raise ValueError(f"no subcommand {command!r} in bayestune's command line; known: "
                         f"{', '.join(commands)}")
    module = commands[command].partition(":")[0]
    entry = {f"{PACKAGE}.__main__", f"{PACKAGE}.cli", module, *loaded}
    return _closure({m for m in entry if _module_file(m, root) is not None}, root,
                    skip=frozenset({DISPATCH}))


def job_modules(command: str, *, method: str | None = None, task_kind: str | None = None,
                root: Path | None = None) -> list[str]:
    """The modules one job of ``command`` runs: the subcommand's, with the module of its
    method (a mask job's method; a fine-tuning job's adapter, as LoRA) and of its declared
    task's kind (``text``, ``image``; None for a built-in task)."""
    loaded = []
    if task_kind is not None:
        kinds = literal(f"{PACKAGE}.tasks", "CUSTOM_KINDS", root)
        if task_kind not in kinds:
            raise ValueError(f"no declared task kind {task_kind!r}; known: {', '.join(kinds)}")
        loaded.append(f"{PACKAGE}.tasks.{kinds[task_kind]}")
    if method is not None and command in _LOADS_METHOD:
        modules = literal(f"{PACKAGE}.methods", "METHOD_MODULES", root)
        if method not in modules:
            raise ValueError(f"no method {method!r}; known: {', '.join(modules)}")
        adapters = literal(f"{PACKAGE}.methods", "ADAPTERS", root)
        if command == "mask" or method in adapters:
            loaded.append(f"{PACKAGE}.methods.{modules[method]}")
    return command_modules(command, root, loaded=loaded)


def _hash(modules: Iterable[str], root: Path) -> str:
    return sha256_of(part for module in modules
                     for part in (module.encode(), _module_file(module, root).read_bytes()))


def command_code_hash(command: str, root: Path | None = None) -> str:
    """sha256 over the names and bytes of :func:`command_modules`: changes exactly when the
    code ``bayestune <command>`` runs changes (comments and docstrings included)."""
    root = Path(root) if root is not None else package_dir()
    return _hash(command_modules(command, root), root)


def job_code_hash(command: str, *, method: str | None = None, task_kind: str | None = None,
                  root: Path | None = None) -> str:
    """sha256 over the names and bytes of :func:`job_modules`: the workflow's rerun key of a
    job (the same as :func:`command_code_hash` for a job that loads nothing by name)."""
    root = Path(root) if root is not None else package_dir()
    return _hash(job_modules(command, method=method, task_kind=task_kind, root=root), root)

"""The package's structure, read from its sources: no import circle, no module above the size
a reader takes in at once, and each subcommand's code hash free of the other subcommands."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bayestune import code_hash
from bayestune.cli.dispatch import COMMANDS

PACKAGE = Path(code_hash.__file__).resolve().parent
MOST_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports(module: str) -> set[str]:
    """The package's modules ``module`` imports at any depth (inside functions too; not the
    imports for type checkers only). ``from a import b`` imports a.b when that is a module,
    else a."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    todo = list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if _type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        todo.extend(ast.iter_child_nodes(node))
    return {m for m in found if m in MODULES and m != module}


def test_no_import_circle():
    graph = {module: imports(module) for module in MODULES}
    circles, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                circles.append(stack[stack.index(other):] + [other])
            elif other not in state:
                visit(other, [*stack, other])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_above_the_size_read_at_once(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MOST_LINES, f"{MODULES[module]}: {lines} lines; split it by concern"


def test_each_subcommand_runs_its_own_module_only():
    """A subcommand's code hash holds its own module (and what the task commands share), never
    another subcommand's flags or help: editing those reruns nothing of it."""
    own = {command: module.partition(":")[0] for command, module in COMMANDS.items()}
    for command, module in own.items():
        modules = set(code_hash.command_modules(command))
        others = {m for m in modules if m.startswith("bayestune.commands.")} - {
            module, "bayestune.commands.common"}
        assert module in modules and not others, (command, sorted(others))
        assert code_hash.DISPATCH not in modules  # read, not hashed


def test_a_job_adds_the_modules_it_loads_by_name():
    mask = set(code_hash.command_modules("mask"))
    assert not {m for m in mask if m.startswith("bayestune.methods.")} - {
        "bayestune.methods.config", "bayestune.methods.registry"}
    fisher = set(code_hash.job_modules("mask", method="fisher"))
    assert fisher - mask == {"bayestune.methods.fisher", "bayestune.methods.common"}
    lora = set(code_hash.job_modules("finetune", method="lora"))
    assert lora - set(code_hash.command_modules("finetune")) == {"bayestune.methods.lora"}
    assert code_hash.job_modules("finetune", method="random") == code_hash.command_modules(
        "finetune")
    images = set(code_hash.job_modules("sample", task_kind="image"))
    assert "bayestune.tasks.custom_images" in images
    assert "bayestune.tasks.custom_images" not in code_hash.command_modules("sample")
    with pytest.raises(ValueError, match="no method 'dropout'"):
        code_hash.job_modules("mask", method="dropout")

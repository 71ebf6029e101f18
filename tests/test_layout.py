"""The package's layering, read off the source with `ast`: every import of `precision_doctor.*`
(module level and inside functions) goes from a stage to the same or a lower one, and the
module-level imports form no cycle.

Stages, lowest first: the base modules, then model < runtime < capture < analysis <
planning < training < views < integrations (`runtime`: the torch.distributed job this process
is a rank of, which the analysis, planning, training and the CLI share). `cli.py` and the package `__init__` sit on top and may
import anything; nothing imports them. A new top-level module must be given a stage here."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "precision_doctor"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
BASE_MODULES = {"errors", "options", "formats", "report", "version", "extras", "schema", "deprecation"}
STAGES = ["base", "model", "runtime", "capture", "analysis", "planning", "training", "views", "integrations"]
TOP_MODULES = {PACKAGE, f"{PACKAGE}.cli"}
TOP = len(STAGES)  # above every stage


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    line: int
    in_function: bool
    type_checking: bool


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def stage_of(module: str) -> int:
    if module in TOP_MODULES:
        return TOP
    first = module.split(".")[1]
    if first in BASE_MODULES:
        return STAGES.index("base")
    if first in STAGES:
        return STAGES.index(first)
    raise AssertionError(f"{module} has no stage: add it to BASE_MODULES or STAGES in {Path(__file__).name}")


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """`name` if it is a module of the package, else its nearest enclosing one."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, in_function: bool, type_checking: bool) -> Iterator[tuple[ast.AST, bool, bool]]:
    for child in ast.iter_child_nodes(node):
        yield child, in_function, type_checking
        func = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield stmt, func, True
                yield from _walk(stmt, func, True)
            for stmt in child.orelse:
                yield stmt, func, type_checking
                yield from _walk(stmt, func, type_checking)
        else:
            yield from _walk(child, func, type_checking)


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def add(target: str, node: ast.AST, in_function: bool, type_checking: bool) -> None:
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            found.append(
                Import(module, _resolve(target, modules), getattr(node, "lineno", 0), in_function, type_checking)
            )

    for node, in_function, type_checking in _walk(tree, False, False):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, in_function, type_checking)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package upwards
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                add(sub if sub in modules else source, node, in_function, type_checking)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "run_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            add(node.args[0].value, node, in_function, type_checking)
    return found


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    modules = package_modules()
    return [i for m, p in modules.items() for i in imports_of(m, p, modules)]


def test_the_parser_sees_the_package(imports: list[Import]) -> None:
    # Guards the two checks below against passing vacuously.
    modules = package_modules()
    assert {f"{PACKAGE}.cli", f"{PACKAGE}.capture.shadow", f"{PACKAGE}.views.streamlit_app"} <= modules.keys()
    pairs = {(i.importer, i.target, i.in_function) for i in imports}
    assert (f"{PACKAGE}.analysis.engine", f"{PACKAGE}.capture.shadow", False) in pairs
    assert (f"{PACKAGE}.cli", f"{PACKAGE}.analysis.engine", True) in pairs
    assert (f"{PACKAGE}.views.streamlit_app", f"{PACKAGE}.views.figures", False) in pairs  # `import a.b as F`
    assert (f"{PACKAGE}.cli", f"{PACKAGE}.runtime.distributed", True) in pairs  # `from a import b`, b a module
    for m in modules:
        stage_of(m)  # every module has a stage


def test_no_import_from_a_lower_stage_to_a_higher_one(imports: list[Import]) -> None:
    upward = [
        f"{i.importer} ({STAGES[stage_of(i.importer)]}) imports {i.target} "
        f"({'top' if stage_of(i.target) == TOP else STAGES[stage_of(i.target)]}) at line {i.line}"
        f"{' inside a function' if i.in_function else ''}"
        for i in imports
        if i.importer not in TOP_MODULES and stage_of(i.target) > stage_of(i.importer)
    ]
    assert not upward, "imports against the stage order:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the DFS stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_no_import_cycle_at_module_level(imports: list[Import]) -> None:
    # Imports under `if TYPE_CHECKING:` never run, so they close no cycle.
    graph: dict[str, set[str]] = {}
    for i in imports:
        if not i.in_function and not i.type_checking and i.target != i.importer:
            graph.setdefault(i.importer, set()).add(i.target)
    cycle = find_cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle or [])

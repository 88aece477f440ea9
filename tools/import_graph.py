"""The import edges between the project's modules, and the cycles among them.

    python -m tools.import_graph              # every edge, then any cycles (exit 1 if there are any)
    python -m tools.import_graph --packages   # edges between the top-level packages only

Edges are read with `ast`, so nothing is imported: top-level imports, imports inside functions
(the lazy ones count: they still make one module depend on another) and imports under
`if TYPE_CHECKING:`, which are listed apart because they never run. Cycles are looked for among
the run-time edges, between modules and between packages.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent
# The project's own packages (bench, tests and tools use them; none of them imports those).
PACKAGES: Final = ("jobs", "worker", "exporter", "embedding_jobs", "alerts", "dashboards")


@dataclass(frozen=True, slots=True, order=True)
class Edge:
    """Module source imports module target; lazy when inside a function, typing when under TYPE_CHECKING."""

    source: str
    target: str
    lazy: bool = False
    typing: bool = False

    @property
    def kind(self) -> str:
        return "type-checking" if self.typing else "lazy" if self.lazy else "top-level"


def module_name(path: Path, root: Path) -> str:
    """The dotted name of the module at path (a package's __init__ is the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path = ROOT, packages: Sequence[str] = PACKAGES) -> dict[str, Path]:
    """Every module of the packages, by dotted name."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            modules[module_name(path, root)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    """Every import statement with (lazy, typing)."""

    def walk(node: ast.AST, lazy: bool, typing: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, lazy, typing
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), lazy, True)
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), lazy, typing)
            else:
                inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                yield from walk(child, inner, typing)

    return walk(tree, False, False)


def _resolve(name: str, modules: Mapping[str, Path]) -> str | None:
    """The longest project module that name is or lies in (from a.b import c: a.b.c or a.b)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def edges_of(module: str, path: Path, modules: Mapping[str, Path]) -> set[Edge]:
    """The project modules that module imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    found: set[Edge] = set()
    for node, lazy, typing in _imports(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                # Relative: level 1 is this module's package.
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            targets = [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != module:
                found.add(Edge(module, resolved, lazy, typing))
    return found


def import_edges(root: Path = ROOT, packages: Sequence[str] = PACKAGES) -> list[Edge]:
    """Every import edge between the project's modules, sorted."""
    modules = project_modules(root, packages)
    return sorted(edge for name, path in modules.items() for edge in edges_of(name, path, modules))


def package_of(module: str) -> str:
    """The top-level package of a dotted module name."""
    return module.partition(".")[0]


def package_edges(edges: Iterable[Edge]) -> set[tuple[str, str]]:
    """(source package, target package) for every run-time edge that crosses packages."""
    return {
        (package_of(e.source), package_of(e.target))
        for e in edges
        if not e.typing and package_of(e.source) != package_of(e.target)
    }


def cycles(graph: Iterable[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (each a set of nodes in a cycle), sorted."""
    adjacent: dict[str, set[str]] = {}
    for source, target in graph:
        adjacent.setdefault(source, set()).add(target)
        adjacent.setdefault(target, set())
    # Tarjan's algorithm, iterative: a deep import chain must not hit the recursion limit.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(adjacent):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(adjacent[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(adjacent[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def module_cycles(edges: Iterable[Edge]) -> list[list[str]]:
    """Cycles among the run-time module edges (lazy ones included, TYPE_CHECKING ones not)."""
    return cycles((e.source, e.target) for e in edges if not e.typing)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the edges and the cycles; exit 1 when there is a cycle."""
    parser = argparse.ArgumentParser(prog="python -m tools.import_graph", description=__doc__.split("\n\n")[0])
    parser.add_argument("--packages", action="store_true", help="edges between top-level packages only")
    args = parser.parse_args(argv)
    edges = import_edges()
    if args.packages:
        graph = sorted(package_edges(edges))
        for source, target in graph:
            print(f"{source} -> {target}")
        found = cycles(graph)
    else:
        for edge in edges:
            print(f"{edge.source} -> {edge.target}" + ("" if edge.kind == "top-level" else f"  ({edge.kind})"))
        found = module_cycles(edges)
    for component in found:
        print("cycle: " + " <-> ".join(component), file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())

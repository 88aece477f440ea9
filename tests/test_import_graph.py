"""The import structure: no cycle between modules or packages, and worker and exporter apart."""

from __future__ import annotations

from pathlib import Path

from tools.import_graph import PACKAGES, Edge, cycles, import_edges, module_cycles, package_edges, package_of


def test_no_module_imports_another_that_imports_it_back() -> None:
    assert module_cycles(import_edges()) == []


def test_no_package_imports_another_that_imports_it_back() -> None:
    graph = package_edges(import_edges())
    assert {source for source, _ in graph} <= set(PACKAGES)
    assert cycles(graph) == []


def test_worker_and_exporter_never_import_each_other() -> None:
    crossing = [
        edge for edge in import_edges() if {package_of(edge.source), package_of(edge.target)} == {"worker", "exporter"}
    ]
    assert crossing == []


def is_test_module(module: str) -> bool:
    """Whether pytest collects the module as tests (a test_*.py file under tests/)."""
    return module.startswith("tests.") and module.rsplit(".", 1)[-1].startswith("test_")


def test_no_test_module_imports_another_test_module() -> None:
    # Shared test code lives in tests/helpers; a test module imported as a library runs its module-level code and
    # fixtures wherever it is imported.
    edges = import_edges(packages=["tests"])
    assert any(edge.target.startswith("tests.helpers.") for edge in edges), "the tests' imports were not read"
    assert [edge for edge in edges if is_test_module(edge.target)] == []


def test_lazy_and_type_checking_imports_are_edges_too(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pkg.c import C\n"
        "def f() -> None:\n    from . import b\n"
    )
    (package / "b.py").write_text("import pkg.a\n")
    (package / "c.py").write_text("from pkg.a import f\n")

    edges = import_edges(tmp_path, ["pkg"])

    assert edges == [
        Edge("pkg.a", "pkg.b", lazy=True),
        Edge("pkg.a", "pkg.c", typing=True),
        Edge("pkg.b", "pkg.a"),
        Edge("pkg.c", "pkg.a"),
    ]
    # The lazy import closes a cycle; the TYPE_CHECKING one never runs, so it does not.
    assert module_cycles(edges) == [["pkg.a", "pkg.b"]]

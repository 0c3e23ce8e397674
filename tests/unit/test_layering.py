"""Layering rules: a backend service needs no gateway, workers never reach back into the supervisor.

``fanout.service`` runs in someone else's process (an order book, a pricing
service): importing it must not pull in aiohttp, the worker or the supervisor.
A worker is forked by the supervisor but knows only the neutral modules they
share (:mod:`fanout.runtime`, :mod:`fanout.settings`, ...), never the supervisor itself.
Checked twice: in the source (lazy imports too) and in ``sys.modules`` after a real import.
Within ``fanout.worker`` the modules import each other without a cycle, imports
under ``TYPE_CHECKING`` included: the hub and a connection meet through the
protocols of :mod:`fanout.worker.subscriber`, and only the gateway knows both.
nats-py imports aiohttp when it is installed (for its WebSocket transport) and
does without it otherwise, so the import check runs with aiohttp made
unimportable: a host without aiohttp must be able to run a service.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "fanout"

#: package -> module prefixes it must never import, directly or indirectly.
RULES: dict[str, tuple[str, ...]] = {
    "service": ("fanout.worker", "fanout.supervisor", "aiohttp"),
    "worker": ("fanout.supervisor",),
}


def _imports(path: Path) -> list[str]:
    """Every absolute import in the file, at any depth; ``from a import b`` also yields ``a.b``."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
            names.extend(f"{node.module}.{a.name}" for a in node.names)
    return names


def _worker_graph() -> dict[str, set[str]]:
    """fanout.worker module -> the fanout.worker modules it imports."""
    modules = {p.stem for p in (PACKAGE / "worker").glob("*.py")}
    graph: dict[str, set[str]] = {}
    for module in modules:
        imported = set()
        for name in _imports(PACKAGE / "worker" / f"{module}.py"):
            parts = name.split(".")
            if parts[:2] == ["fanout", "worker"] and len(parts) > 2 and parts[2] in modules:
                imported.add(parts[2])
        graph[module] = imported - {module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path of modules (first == last), or [] when there is none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str]:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return []
        path.append(module)
        for imported in sorted(graph[module]):
            found = visit(imported)
            if found:
                return found
        path.pop()
        done.add(module)
        return []

    for module in sorted(graph):
        found = visit(module)
        if found:
            return found
    return []


def _banned(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize(
    "path",
    [p for package in RULES for p in sorted((PACKAGE / package).glob("*.py"))],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_no_forbidden_import_in_source(path: Path) -> None:
    prefixes = RULES[path.parent.name]
    bad = [name for name in _imports(path) if _banned(name, prefixes)]
    assert bad == [], f"fanout.{path.parent.name} must not import {bad}"


@pytest.mark.parametrize("package", sorted(RULES))
def test_importing_the_package_pulls_in_nothing_forbidden(package: str) -> None:
    modules = [f"fanout.{package}.{p.stem}" for p in sorted((PACKAGE / package).glob("*.py"))]
    code = (
        "import importlib, importlib.abc, sys\n"
        "class NoAiohttp(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'aiohttp': raise ImportError(name)\n"
        f"if {package!r} == 'service': sys.meta_path.insert(0, NoAiohttp())\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if any(m == p or m.startswith(p + '.') "
        f"for p in {RULES[package]!r}))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_worker_modules_import_each_other_without_a_cycle() -> None:
    graph = _worker_graph()
    assert {"connection", "gateway", "hub"} <= graph.keys()
    assert _cycle(graph) == []

"""Names that do not collide: one public class per name, no module shadowing a library."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from collections import defaultdict

import fanout

#: Import names of what fanout depends on (or what a user script imports next to it).
LIBRARIES = frozenset(
    {"aiohttp", "jwt", "msgspec", "nats", "prometheus_client", "requests", "uvloop"}
)


def _modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(fanout.__path__, "fanout.")]


def test_every_public_class_name_is_defined_once() -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for name in _modules():
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if inspect.isclass(obj) and obj.__module__ == name and not attr.startswith("_"):
                where[attr].append(name)
    assert {attr: mods for attr, mods in where.items() if len(mods) > 1} == {}


def test_no_module_shadows_the_standard_library_or_a_dependency() -> None:
    taken = LIBRARIES | sys.stdlib_module_names
    assert [name for name in _modules() if name.rpartition(".")[2] in taken] == []

"""fanout.core must stay sans-I/O: no asyncio, aiohttp, nats or uvloop, directly or indirectly."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "fanout" / "core"
FORBIDDEN = ("asyncio", "aiohttp", "nats", "uvloop", "socket", "selectors")
#: PyJWT imports urllib (and so socket) for its JWKS client; the event-loop libraries stay out.
FORBIDDEN_TRANSITIVE = ("asyncio", "aiohttp", "nats", "uvloop")


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_no_io_imports_in_source(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def test_importing_core_pulls_in_no_io_library() -> None:
    modules = ", ".join(f"fanout.core.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__")
    code = (
        f"import sys, importlib\n"
        f"for m in '{modules}'.split(', '): importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN_TRANSITIVE!r})\n"
        f"print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""

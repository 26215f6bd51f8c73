"""loadtest talks HTTP only: no module of it imports server, adapters or kernels."""

from __future__ import annotations

import ast
from pathlib import Path

import loadtest

FORBIDDEN = {"server", "adapters", "kernels"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_loadtest_never_imports_the_server_side() -> None:
    files = sorted(Path(loadtest.__file__).parent.rglob("*.py"))
    assert len(files) > 5
    for path in files:
        assert not imported_roots(path) & FORBIDDEN, path

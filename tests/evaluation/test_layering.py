"""Evaluation speaks no HTTP: no module under server/evaluation imports the HTTP layer
(server/api/errors.py, server/api/jsontext.py, FastAPI, Starlette) or raises its errors; it raises the
typed errors of server/evaluation/errors.py, which server/api/errors.py maps to answers."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import adapterserve.server.evaluation as evaluation

EVALUATION_DIR = Path(evaluation.__file__).parent
HTTP_MODULES = (
    "adapterserve.server.api.errors",
    "adapterserve.server.api.jsontext",
    "fastapi",
    "starlette",
)
HTTP_NAMES = {"APIError", "HTTPException", "invalid_request", "engine_error", "engine_answer"}


def _imports(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _names(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.id
        elif isinstance(node, ast.Attribute):
            yield node.attr
        elif isinstance(node, ast.alias):
            yield node.asname or node.name.rsplit(".", 1)[-1]


@pytest.mark.parametrize("path", sorted(EVALUATION_DIR.glob("*.py")), ids=lambda p: p.name)
def test_evaluation_modules_speak_no_http(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    http_imports = [
        name
        for name in _imports(tree)
        if any(name == m or name.startswith(f"{m}.") for m in HTTP_MODULES)
    ]
    assert not http_imports, f"{path.name} imports the HTTP layer: {http_imports}"
    http_names = sorted(HTTP_NAMES & set(_names(tree)))
    assert not http_names, f"{path.name} uses HTTP-layer names: {http_names}"

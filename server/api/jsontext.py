"""Parsing JSON that a client sent: one set of limits for every parser of client text.

Request bodies (server/api/guards.py) and JSON embedded in them (a dataset's `jsonl` lines) go
through `loads`: strict UTF-8 already decoded by the caller, nesting at most MAX_JSON_DEPTH
levels, no lone surrogates. Python's json module recurses in C and raises RecursionError
around 1,000 levels; depth is checked again on the parsed value, walked iteratively, so no
client input reaches a recursion limit anywhere later (pydantic, our own walkers).
"""

from __future__ import annotations

import json
from typing import Any

from adapterserve.server.api.errors import invalid_request

MAX_JSON_DEPTH = 64


def loads(text: str, what: str = "The body", param: str | None = None) -> Any:
    """`text` as a JSON value; a 400 naming `what` (and `param`) when it is not acceptable."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise too_deep(what, param) from None
    except ValueError as exc:
        raise invalid_request(f"{what} is not valid JSON: {str(exc)[:100]}.", param) from None
    check_tree(value, what, param)
    return value


def too_deep(what: str, param: str | None):
    return invalid_request(
        f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels is not accepted.", param
    )


def check_tree(value: Any, what: str = "The body", param: str | None = None) -> None:
    """Nesting depth and lone surrogates (JSON escapes like \\ud800 decode to them, and they
    cannot be encoded as UTF-8), walked iteratively."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise too_deep(what, param)
        if isinstance(item, dict):
            stack.extend((k, depth + 1) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, str):
            _check_encodable(item, what, param)


def _check_encodable(text: str, what: str, param: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid_request(
            f"{what} contains a lone UTF-16 surrogate (\\u{ord(text[exc.start]):04x}); send "
            "valid Unicode.",
            param,
        ) from None

"""The served /openapi.json: FastAPI's description plus what only the running server knows.

- `x-server-limit` placeholders (server/api/schemas/common.py) become this server's caps: `n`, the
  context length, the vocabulary, the prompt characters.
- Statuses that come from the app rather than from a route: 401 on every route but /health
  when an API key is set (with a bearer security scheme), 400 and 413 from the body guard on
  every route that takes a body, 500 from the catch-all handler. FastAPI's 422 goes: request
  validation errors are answered 400.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from adapterserve.server.api.errors import error_responses
from adapterserve.server.api.guards import public_paths
from adapterserve.server.api.schemas.common import SERVER_LIMIT, ErrorResponse
from adapterserve.server.api.serving import max_choices
from adapterserve.server.config import Settings

if TYPE_CHECKING:
    from adapterserve.server.engine.client import EngineClient

BEARER = {"bearer": {"type": "http", "scheme": "bearer"}}
BODY_STATUSES = (400, 408, 413, 415)  # RequestGuard: bad JSON, stalled, too large, wrong type
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """The served document, built once the engine is up (its limits never change)."""
    cached = getattr(app.state, "openapi_document", None)
    if cached is not None:
        return cached
    settings: Settings = app.state.settings
    engine: EngineClient | None = getattr(app.state, "engine", None)
    limits = server_limits(settings, engine)
    document = served_document(app.openapi(), limits, settings)
    if engine is not None:
        app.state.openapi_document = document
    return document


def server_limits(settings: Settings, engine: EngineClient | None) -> dict[str, Any]:
    """Placeholder name -> value; without an engine the model's limits are left out."""
    limits: dict[str, Any] = {
        "max_n": min(settings.max_n, max_choices(settings)),
        "max_prompts": max_choices(settings),
        "max_prompt_chars": settings.max_prompt_chars,
    }
    if engine is not None:
        limits |= {
            "max_model_len": engine.max_model_len,
            # A prompt has at least one token: no request can have the whole context.
            "max_new_tokens": engine.max_model_len - 1,
            "max_token_id": engine.vocab_size - 1,
            "token_id_pattern": decimal_below(engine.vocab_size),
        }
    return limits


def served_document(
    base: dict[str, Any], limits: dict[str, Any], settings: Settings
) -> dict[str, Any]:
    document = copy.deepcopy(base)  # FastAPI caches `base`
    fill_limits(document, limits)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _, error_schemas = models_json_schema(
        [(ErrorResponse, "serialization")], ref_template="#/components/schemas/{model}"
    )
    schemas.update(error_schemas["$defs"])
    api_key, public = bool(settings.user_keys), public_paths(settings)
    if api_key:
        document["components"]["securitySchemes"] = BEARER
    for path, operations in document["paths"].items():
        for operation in operations.values():
            _add_app_statuses(operation, api_key and path not in public)
    return document


def fill_limits(node: Any, limits: dict[str, Any]) -> None:
    """Replace every {"x-server-limit": {keyword: name}} by {keyword: limits[name]}, and print
    whole-number bounds as integers: FastAPI's models turn them into floats, and a client
    reading 9.223372036854776e+18 back as a decimal gets 9223372036854776000, not 2**63."""
    if isinstance(node, dict):
        for keyword, name in node.pop(SERVER_LIMIT, {}).items():
            if name in limits:
                node[keyword] = limits[name]
        for keyword in BOUNDS:
            if isinstance(node.get(keyword), float) and node[keyword].is_integer():
                node[keyword] = int(node[keyword])
        for value in node.values():
            fill_limits(value, limits)
    elif isinstance(node, list):
        for item in node:
            fill_limits(item, limits)


def _add_app_statuses(operation: dict[str, Any], needs_key: bool) -> None:
    responses = operation["responses"]
    responses.pop("422", None)
    statuses = [500]
    if "requestBody" in operation:
        statuses += BODY_STATUSES
    if needs_key:
        statuses.append(401)
        operation["security"] = [{"bearer": []}]
    for status, response in error_responses(*statuses).items():
        responses.setdefault(str(status), response)


def decimal_below(limit: int) -> str:
    """A regex for the decimal strings of 0 .. limit-1, leading zeros allowed as int() allows
    them. 384 -> 0, 1-99, 100-299, 300-379, 380-382, 383."""
    top = str(limit - 1)
    if len(top) == 1:
        return f"^0*[0-{top}]$"
    options = ["0", f"[1-9][0-9]{{0,{len(top) - 2}}}"]  # every shorter number
    for i, digit in enumerate(top):
        low = 1 if i == 0 else 0
        if int(digit) > low:  # same prefix, a smaller digit here, anything after
            rest = len(top) - i - 1
            tail = f"[0-9]{{{rest}}}" if rest else ""
            options.append(f"{top[:i]}[{low}-{int(digit) - 1}]{tail}")
    options.append(top)
    return f"^0*(?:{'|'.join(options)})$"

"""FastAPI dependencies shared by the routers: everything comes from `request.app.state`."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from fastapi import Request

from adapters.registry import UnknownAdapterError
from server.config import Settings
from server.errors import APIError, model_not_found
from server.metrics import Metrics

if TYPE_CHECKING:
    from adapters.registry import AdapterRegistry, Entry
    from server.engine.engine import Engine

UNAUTHENTICATED_PATHS = frozenset({"/health"})


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def _bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, key: str | None) -> bool:
    # Compare bytes: compare_digest on str refuses non-ASCII, which would turn into a 500.
    return key is not None and hmac.compare_digest(token.encode(), key.encode())


def _unauthorized(message: str) -> APIError:
    return APIError(
        401,
        message,
        "authentication_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _check_key(request: Request, keys: tuple[str | None, ...]) -> None:
    if all(key is None for key in keys):
        return
    token = _bearer_token(request)
    if token is None:
        raise _unauthorized("Missing API key: send the header 'Authorization: Bearer <key>'.")
    if not any([_matches(token, key) for key in keys]):  # list: compare against every key
        raise _unauthorized("Invalid API key.")


def require_api_key(request: Request) -> None:
    """Every route but /health needs the API key (or the admin key) once one is configured."""
    if request.url.path in UNAUTHENTICATED_PATHS:
        return
    settings = get_settings(request)
    if settings.api_key is None:
        return
    _check_key(request, (settings.api_key, settings.admin_api_key))


def require_admin_key(request: Request) -> None:
    """Admin routes (adapter upload, delete, load/unload) need the admin key if one is set,
    otherwise the ordinary API key."""
    settings = get_settings(request)
    if settings.admin_api_key is not None:
        _check_key(request, (settings.admin_api_key,))
    else:
        require_api_key(request)


def get_registry(request: Request) -> AdapterRegistry:
    registry = getattr(request.app.state, "registry", None)
    if registry is None:
        raise APIError(503, "Adapters are not available on this server yet.", code="not_ready")
    return registry


def resolve_model(request: Request, name: str | None) -> Entry | None:
    """The adapter that `name` selects, or None for the base model; unknown names are 404.

    Records the resolved name on `request.state.model` (engine requests and metrics labels).
    """
    engine = get_engine(request)
    if name is None or name == engine.model_id:
        request.state.model = engine.model_id
        return None
    registry = getattr(request.app.state, "registry", None)
    try:
        entry = registry.get(name) if registry is not None else None
    except UnknownAdapterError:
        entry = None
    if entry is None:
        raise model_not_found(name)
    request.state.model = entry.name
    return entry

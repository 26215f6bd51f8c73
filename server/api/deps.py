"""FastAPI dependencies shared by the routers: everything comes from `request.app.state`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

from adapterserve.adapters.errors import UnknownAdapterError
from adapterserve.server.api.errors import APIError, model_not_found
from adapterserve.server.api.guards import (
    bearer_token,
    check_admin_key,
    key_fingerprint,
    key_matches,
)
from adapterserve.server.config import Settings
from adapterserve.server.metrics import Metrics

if TYPE_CHECKING:
    from adapterserve.adapters.registry import AdapterRegistry, Entry
    from adapterserve.server.engine.client import EngineClient


def get_engine(request: Request) -> EngineClient:
    return request.app.state.engine


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def require_admin_key(request: Request) -> None:
    """Admin routes (adapter upload, delete, load/unload, datasets) need the admin key if one
    is set; otherwise the ordinary API key, which RequestGuard already checked."""
    check_admin_key(request.headers, get_settings(request))


def is_admin(request: Request) -> bool:
    """Whether the request carries the admin key (every caller does when no key is set)."""
    settings = get_settings(request)
    if settings.admin_api_key is None:
        return not settings.user_keys
    return key_matches(bearer_token(request.headers), settings.admin_api_key)


def caller_key(request: Request) -> str | None:
    """A fingerprint of the caller's API key (None when keys are off), for ownership."""
    settings = get_settings(request)
    if not settings.user_keys and settings.admin_api_key is None:
        return None
    return key_fingerprint(bearer_token(request.headers))


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

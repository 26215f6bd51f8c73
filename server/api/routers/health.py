"""Liveness (/health, never behind the API key), readiness (/ready) and Prometheus /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from adapterserve.server.api.deps import get_engine, get_metrics
from adapterserve.server.api.schemas.health import HealthStatus
from adapterserve.server.engine.client import EngineClient
from adapterserve.server.metrics import Metrics

router = APIRouter(tags=["health"])

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/health", response_model=HealthStatus, responses={503: {"model": HealthStatus}})
async def health(engine: EngineClient = Depends(get_engine)) -> JSONResponse:
    """200 while the engine can serve; 503 after a fatal fault (the process is exiting)."""
    if engine.healthy:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "engine_failed"}, status_code=503)


@router.get("/ready", response_model=HealthStatus, responses={503: {"model": HealthStatus}})
async def ready(request: Request, engine: EngineClient = Depends(get_engine)) -> JSONResponse:
    """200 when the engine is started (its compiled shapes warmed up) and the server is not
    draining; load balancers poll this."""
    draining = getattr(request.app.state, "draining", False)
    if engine.healthy and engine.ready and not draining:
        return JSONResponse({"status": "ready"})
    status = (
        "draining"
        if draining
        else "restarting"
        if engine.restarting
        else "warming_up"
        if engine.warming
        else "not_ready"
    )
    return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "1"})


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(
    metrics: Metrics = Depends(get_metrics), engine: EngineClient = Depends(get_engine)
) -> Response:
    await engine.sync_metrics()
    return Response(metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

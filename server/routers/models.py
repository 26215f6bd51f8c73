"""GET /v1/models and /v1/models/{id}: the base model (adapters join the list later)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.deps import get_engine, resolve_model
from server.engine.engine import Engine
from server.routers.generation import ERROR_RESPONSES
from server.schemas import ModelCard, ModelList

router = APIRouter(tags=["models"])


def _base_card(engine: Engine, created: int) -> ModelCard:
    return ModelCard(
        id=engine.model_id,
        created=created,
        root=engine.model_id,
        max_model_len=engine.max_model_len,
    )


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request, engine: Engine = Depends(get_engine)) -> ModelList:
    return ModelList(data=[_base_card(engine, request.app.state.started_at)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def get_model(
    model_id: str, request: Request, engine: Engine = Depends(get_engine)
) -> ModelCard:
    resolve_model(request, model_id)
    return _base_card(engine, request.app.state.started_at)

"""GET /v1/models and /v1/models/{id}: the base model and every registered adapter."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from adapterserve.adapters.registry import Entry
from adapterserve.server.api.deps import get_engine, resolve_model
from adapterserve.server.api.errors import error_responses
from adapterserve.server.api.schemas.models import ModelCard, ModelList
from adapterserve.server.engine.client import EngineClient
from adapterserve.server.engine.remote import RemoteEntry

router = APIRouter(tags=["models"])


def _base_card(engine: EngineClient, created: int) -> ModelCard:
    """The base model, with the dimensions a client needs to train adapters that fit it."""
    args = engine.model.args
    return ModelCard(
        id=engine.model_id,
        created=created,
        root=engine.model_id,
        max_model_len=engine.max_model_len,
        hidden_size=args.dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
        quantization=engine.model.quantization,
    )


def _adapter_card(engine: EngineClient, entry: Entry) -> ModelCard:
    return ModelCard(
        id=entry.name,
        created=int(entry.created),
        root=entry.name,
        parent=engine.model_id,
        max_model_len=engine.max_model_len,
        replicas=entry.replicas if isinstance(entry, RemoteEntry) else None,  # a cluster's view
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request, engine: EngineClient = Depends(get_engine)) -> ModelList:
    cards = [_base_card(engine, request.app.state.started_at)]
    registry = getattr(request.app.state, "registry", None)
    if registry is not None:
        cards += [_adapter_card(engine, entry) for entry in registry.list()]
    return ModelList(data=cards)


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=error_responses(404))
async def get_model(
    model_id: str, request: Request, engine: EngineClient = Depends(get_engine)
) -> ModelCard:
    entry = resolve_model(request, model_id)
    if entry is None:
        return _base_card(engine, request.app.state.started_at)
    return _adapter_card(engine, entry)

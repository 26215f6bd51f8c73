"""GET /v1/models and /v1/models/{id}: the base model and the adapters served, as model cards."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from adapterserve.server.api.schemas.common import now


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "adapterserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    # Base model only: the dimensions a client needs to build adapters that fit it.
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    quantization: Literal["none", "int8", "int4"] | None = Field(
        None,
        description="base model only: its projections' weight-only quantization (adapters "
        "are always full precision)",
    )
    replicas: dict[str, str] | None = Field(
        None,
        description="cluster only (server/cluster): the tier of this adapter on each engine "
        "replica that reports it (device = in a slot, host, disk); absent in one process",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

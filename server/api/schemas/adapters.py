"""Adapters (issue 3): /v1/adapters (cards, uploads) and vLLM's /v1/load_lora_adapter and
/v1/unload_lora_adapter bodies."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from adapterserve.adapters.spec import AdapterKind
from adapterserve.server.api.schemas.common import Int, StrictRequestModel

# An adapter name (adapters/store.py NAME_RE plus its "no '..'" rule, without a lookahead).
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9](?:\.?[A-Za-z0-9_:-])*\.?$"
ADAPTER_NAME_CHARS = 64

# The adapter kinds the server serves, from AdapterKind (adapters/spec.py): one list
AdapterKindName = Literal[tuple(kind.value for kind in AdapterKind)]  # type: ignore[valid-type]

# Documented only: the registry checks names with a message of its own.
AdapterName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=ADAPTER_NAME_CHARS,
        json_schema_extra={"pattern": ADAPTER_NAME_PATTERN},
    ),
]


class AdapterCard(BaseModel):
    """GET /v1/adapters/{name}: what is served under `name` (never where its files live)."""

    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    parent: str = Field(..., description="the base model's id")
    kind: AdapterKindName
    rank: int = Field(..., description="LoRA rank or bottleneck size (0 for prefix/prompt/ia3)")
    targets: list[str] = Field(
        ..., description="base modules it acts on: q,k,v,o,gate,up,down, embed_tokens, lm_head"
    )
    num_virtual_tokens: int
    size_bytes: int
    tier: Literal["device", "host", "disk"]
    origin: Literal["upload", "path"]
    version: int
    created: int
    replicas: dict[str, str] | None = Field(
        None,
        description="cluster only (server/cluster): the tier of this adapter on each engine "
        "replica that reports it (device = in a slot, host, disk); absent in one process",
    )


class AdapterUploadCard(AdapterCard):
    """POST /v1/adapters: the card of the adapter now served, and the files left out of it."""

    ignored_files: list[str] = Field(
        default_factory=list,
        description="uploaded files (or archive members) outside the allow-list "
        "(adapter_config.json, adapter_model.safetensors, README.md): dropped, never stored",
    )


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterCard]


class LoadLoraAdapterRequest(StrictRequestModel):
    """vLLM's POST /v1/load_lora_adapter body; `lora_path` must lie under an adapter root."""

    lora_name: AdapterName
    lora_path: str = Field(
        ..., min_length=1, max_length=4096, json_schema_extra={"pattern": "^[^\\x00]*$"}
    )
    load_inplace: bool = Field(False, description="replace an adapter of the same name")


class UnloadLoraAdapterRequest(StrictRequestModel):
    """vLLM's POST /v1/unload_lora_adapter body."""

    lora_name: AdapterName
    lora_int_id: Int | None = Field(None, description="accepted for vLLM compatibility; unused")

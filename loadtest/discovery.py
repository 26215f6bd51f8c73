"""What a server serves: GET /v1/models -> the base model id and its adapters."""

from __future__ import annotations

from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class ServedModels:
    """`base`: the entry without a parent; `adapters`: entries whose parent is the base id."""

    base: str
    base_card: dict
    adapters: tuple[str, ...]


async def served_models(client: httpx.AsyncClient) -> ServedModels:
    response = await client.get("/v1/models")
    if response.status_code != 200:
        raise RuntimeError(
            f"GET /v1/models: expected 200, got {response.status_code}: {response.text[:300]}"
        )
    cards = response.json().get("data", [])
    bases = [card for card in cards if not card.get("parent")]
    if len(bases) != 1:
        ids = [card.get("id") for card in bases]
        raise RuntimeError(
            f"GET /v1/models: expected exactly one entry without a parent, got {ids}"
        )
    base = bases[0]
    adapters = sorted(card["id"] for card in cards if card.get("parent") == base["id"])
    return ServedModels(base["id"], base, tuple(adapters))


async def scrape_metrics(client: httpx.AsyncClient) -> str | None:
    """The /metrics text, or None when the server has none (e.g. the PEFT baseline)."""
    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None

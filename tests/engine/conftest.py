from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from adapterserve.server.config import Settings
from adapterserve.server.engine.bootstrap import running_engine
from adapterserve.server.engine.engine import Engine
from adapterserve.server.engine.output import RequestOutput
from adapterserve.server.engine.sampling import SamplingParams
from adapterserve.server.metrics import Metrics

T = TypeVar("T")


@pytest.fixture
def engine_settings(tiny_model_dir: Path) -> Callable[..., Settings]:
    """Settings of an engine on the tiny model; keyword arguments override them."""

    def settings(model_dir: Path | None = None, **overrides) -> Settings:
        return Settings(model=str(model_dir or tiny_model_dir), device="cpu", **overrides)

    return settings


def serve(
    settings: Settings, body: Callable[[Engine], Awaitable[T]], timeout_s: float = 300
) -> tuple[T, Engine]:
    """Start an engine as the server does (bootstrap.running_engine), run `body` with it, stop
    it: (what body returned, the stopped engine, for its counters)."""

    async def go() -> tuple[T, Engine]:
        async with running_engine(settings, Metrics()) as engine:
            return await asyncio.wait_for(body(engine), timeout_s), engine

    return asyncio.run(go())


async def collect(
    engine: Engine, prompt: list[int], params: SamplingParams, model: str | None = None
) -> tuple[list[int], str, RequestOutput]:
    """Run one request to the end: (all token ids, joined text, last output)."""
    ids, text, last = [], "", None
    async for out in engine.add_request(prompt, params, model=model):
        ids += out.token_ids
        text += out.text
        last = out
    return ids, text, last

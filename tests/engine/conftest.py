from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from server.config import Settings
from server.engine.engine import Engine, RequestOutput, build_engine
from server.engine.sampling import SamplingParams
from server.metrics import Metrics


@pytest.fixture
def make_engine(tiny_model_dir: Path) -> Callable[..., Engine]:
    """Build (not start) an engine on the tiny model; keyword arguments override settings."""

    def build(model_dir: Path | None = None, **overrides) -> Engine:
        settings = Settings(model=str(model_dir or tiny_model_dir), device="cpu", **overrides)
        return build_engine(settings, Metrics())

    return build


async def collect(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[int], str, RequestOutput]:
    """Run one request to the end: (all token ids, joined text, last output)."""
    ids, text, last = [], "", None
    async for out in engine.add_request(prompt, params):
        ids += out.token_ids
        text += out.text
        last = out
    return ids, text, last


def run(coro):
    return asyncio.run(coro)

"""The compiled decode step is warmed up before /ready says yes (issue 24 item 3): every shape
the step loop can need is compiled at start, on the engine thread, while /health answers 200
and /ready 503 ("warming_up"); after that, no decode compiles under traffic. Servers run
uvicorn in a thread (the compile counters and the warm-up are in this process)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from torch._dynamo.utils import counters

from adapterserve.server.config import Settings
from adapterserve.server.main import create_app
from adapterserve.server.model.compiled import CompiledDecode
from tests.server.conftest import free_port

WARM_UP_TIMEOUT_S = 600  # a cold inductor cache on a loaded 2-core machine


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One inductor cache for the module: the second server finds the first one's kernels."""
    return tmp_path_factory.mktemp("compile-cache")


@contextmanager
def compiled_server(model_dir: Path, cache_dir: Path) -> Iterator[str]:
    """A server with --compile on, in a thread; yields its base URL once it listens."""
    torch._dynamo.reset()  # no graph left by an earlier test may stand in for a warm-up
    settings = Settings(
        model=str(model_dir),
        device="cpu",
        port=free_port(),
        compile="on",
        kv_cache_memory_mb=16,
        max_model_len=256,
        cache_dir=cache_dir,
        log_level="warning",
        engine_process=False,
    )  # its engine's compiles are watched
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=settings.port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(60)


def wait_for(url: str, status: int, timeout_s: float) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == status:
                return response
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer {status} within {timeout_s} s")


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_ready_is_503_until_every_compiled_shape_is_warm(
    tiny_model_dir: Path, compile_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """While the warm-up runs (held here until the server listens), /health is 200 and /ready
    and new requests are 503. The warm-up used to run before the server listened at all, so
    neither answered; it also left out shapes (see the next test)."""
    caplog.set_level(logging.INFO, logger="adapterserve.server.engine.runner")
    release = threading.Event()
    real_warm_up = CompiledDecode.warm_up

    def held_warm_up(self, *args):
        release.wait(WARM_UP_TIMEOUT_S)
        return real_warm_up(self, *args)

    monkeypatch.setattr(CompiledDecode, "warm_up", held_warm_up)
    with compiled_server(tiny_model_dir, compile_cache) as base_url:
        try:
            wait_for(f"{base_url}/health", 200, 120)
            ready = httpx.get(f"{base_url}/ready", timeout=5)
            assert ready.status_code == 503 and ready.json()["status"] == "warming_up", ready.text
            assert ready.headers["retry-after"] == "1"
            early = httpx.post(
                f"{base_url}/v1/completions", timeout=5, json={"prompt": "Hi", "max_tokens": 2}
            )
            assert early.status_code == 503 and early.json()["error"]["code"] == "not_ready"
        finally:
            release.set()
        wait_for(f"{base_url}/ready", 200, WARM_UP_TIMEOUT_S)
        warmed = [r.message for r in caplog.records if "compiled shapes in" in r.message]
        assert len(warmed) == 1 and warmed[0].startswith("warmed 4 compiled shapes"), warmed
        done = httpx.post(
            f"{base_url}/v1/completions", timeout=60, json={"prompt": "Hi", "max_tokens": 2}
        )
        assert done.status_code == 200, done.text


def test_no_decode_compiles_after_ready(tiny_model_dir: Path, compile_cache: Path) -> None:
    """After /ready, one long-context row, then several rows at once: dynamo compiles no new
    graph. Before, the warm-up used block tables one column wide, and the first decode with a
    context past one block (16 tokens) compiled a graph for 1 row and one for several, on the
    engine thread, under the first streams (BENCHMARKS.md, 'Figures quoted from the code')."""

    async def complete(base_url: str, prompts: list[list[int]]) -> list[dict]:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
            responses = await asyncio.gather(
                *[
                    http.post(
                        "/v1/completions", json={"prompt": ids, "max_tokens": 6, "ignore_eos": True}
                    )
                    for ids in prompts
                ]
            )
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        return [r.json() for r in responses]

    before = graphs()
    with compiled_server(tiny_model_dir, compile_cache) as base_url:
        wait_for(f"{base_url}/ready", 200, WARM_UP_TIMEOUT_S)
        warmed = graphs()
        assert warmed > before, "nothing was compiled before /ready"
        asyncio.run(complete(base_url, [[5] * 40]))
        asyncio.run(complete(base_url, [[7] * 40, [9] * 70, [11] * 100, [13] * 3]))
        assert graphs() == warmed, f"{graphs() - warmed} graph(s) compiled after /ready"

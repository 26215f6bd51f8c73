"""The whole engine on CPU through the Triton kernels (interpreter) gives the reference's tokens.

Base model only for now: the adapter hook points join once the adapters issue defines the pool.
"""

from __future__ import annotations

import asyncio

import pytest

from server.config import Settings
from server.engine.engine import build_engine
from server.engine.sampling import SamplingParams
from server.metrics import Metrics
from tests.engine.conftest import collect

PROMPTS = [[5, 17, 99, 230, 7], [42] * 19, list(range(60, 97))]


def greedy_tokens(model_dir) -> list[list[int]]:
    engine = build_engine(Settings(model=str(model_dir), device="cpu", block_size=4, num_kv_blocks=64,
                                   max_model_len=128), Metrics())

    async def go():
        await engine.start()
        try:
            params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
            return await asyncio.gather(*[collect(engine, p, params) for p in PROMPTS])
        finally:
            await engine.stop()

    return [ids for ids, _, _ in asyncio.run(go())]


def test_triton_path_matches_reference_path(tiny_model_dir, triton_module, monkeypatch: pytest.MonkeyPatch):
    calls = []
    attention = triton_module("attention")
    original = attention.paged_decode_attention
    monkeypatch.setattr(attention, "paged_decode_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setenv("ADAPTERSERVE_KERNELS", "reference")
    reference = greedy_tokens(tiny_model_dir)
    monkeypatch.setenv("ADAPTERSERVE_KERNELS", "triton")
    triton = greedy_tokens(tiny_model_dir)
    assert calls, "the Triton attention kernel was never called"
    assert triton == reference

"""The whole engine on CPU through the Triton kernels (interpreter) gives the reference's tokens.

Base model, and adapters of every kind in one batch.
"""

from __future__ import annotations

import asyncio

import pytest

from adapterserve.server.config import Settings
from adapterserve.server.engine.sampling import SamplingParams
from tests.engine.conftest import collect, serve

PROMPTS = [[5, 17, 99, 230, 7], [42] * 19, list(range(60, 97))]


def greedy_tokens(model_dir) -> list[list[int]]:
    settings = Settings(
        model=str(model_dir), device="cpu", block_size=4, num_kv_blocks=64, max_model_len=128
    )

    async def go(engine):
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        return await asyncio.gather(*[collect(engine, p, params) for p in PROMPTS])

    return [ids for ids, _, _ in serve(settings, go)[0]]


def test_triton_path_matches_reference_path(
    tiny_model_dir, triton_module, monkeypatch: pytest.MonkeyPatch
):
    calls = []
    attention = triton_module("attention")
    original = attention.paged_decode_attention
    monkeypatch.setattr(
        attention, "paged_decode_attention", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    monkeypatch.setenv("ADAPTERSERVE_KERNELS", "reference")
    reference = greedy_tokens(tiny_model_dir)
    monkeypatch.setenv("ADAPTERSERVE_KERNELS", "triton")
    triton = greedy_tokens(tiny_model_dir)
    assert calls, "the Triton attention kernel was never called"
    assert triton == reference


def test_adapters_of_every_kind_through_triton(tmp_path, triton_module, monkeypatch):
    """LoRA (two), IA3, prefix, prompt, series and parallel adapters beside base requests in one
    engine: the Triton path (interpreter) gives the reference path's tokens and log-probs."""
    from tests.engine.test_adapters_engine import Adapters, generate, prompt

    adapters = Adapters(tmp_path / "adapters")
    models = [*adapters.names, None]
    cases = [(m, prompt(600 + i, 5 + i, adapters.vocab)) for i, m in enumerate(models)]
    calls = []
    module = triton_module("bottleneck")
    original = module.add_delta
    monkeypatch.setattr(module, "add_delta", lambda *a, **k: calls.append(1) or original(*a, **k))

    def tokens(kind: str):
        monkeypatch.setenv("ADAPTERSERVE_KERNELS", kind)
        settings = adapters.settings(tmp_path / kind)
        return serve(
            settings, lambda engine: asyncio.gather(*[generate(engine, p, m) for m, p in cases])
        )[0]

    reference = tokens("reference")
    assert not calls
    triton = tokens("triton")
    assert calls, "the Triton adapter kernels were never called"
    for (model, _), (t_ref, lp_ref, _), (t_tri, lp_tri, _) in zip(
        cases, reference, triton, strict=True
    ):
        assert t_tri == t_ref, model
        for a, b in zip(lp_ref, lp_tri, strict=True):
            assert (a is None) == (b is None) and (a is None or abs(a - b) <= 1e-4), model

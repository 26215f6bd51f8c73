"""IA3 per-token scaling: reference vs a per-token loop (decode rows and prefill chunks),
Triton vs reference."""

from __future__ import annotations

import pytest
import torch

from adapterserve.kernels import AdapterBatch, reference
from tests.kernels.helpers import DEVICE, LAYOUTS, PATTERNS, TOLERANCES, randn, step_rows

S, D = 5, 75  # D not a multiple of any block size
T = 21


def case(pattern: str, layout: str, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = randn(T, D, dtype=dtype, gen=gen)  # (T, d)
    vectors = (torch.rand(S, D, generator=gen) * 2).to(DEVICE, dtype)  # (S, d)
    return x, vectors, step_rows(pattern, layout, T, S, gen)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_reference_matches_per_token_loop(pattern: str, layout: str) -> None:
    x, vectors, batch = case(pattern, layout, torch.float32, seed=1)
    expected = x.double().cpu().clone()
    for t, s in enumerate(batch.slot_ids.tolist()):
        if s >= 0:
            expected[t] *= vectors[s].double().cpu()
    got = reference.ia3_scale(x, vectors, batch)
    torch.testing.assert_close(got.double().cpu(), expected, **TOLERANCES[torch.float32])
    base = batch.slot_ids < 0
    assert torch.equal(got[base], x[base])  # base rows: exactly x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_triton_matches_reference(
    triton_module, poison_allocations, pattern, layout, dtype
) -> None:
    x, vectors, batch = case(pattern, layout, dtype, seed=2)
    got = triton_module("ia3").ia3_scale(x, vectors, batch)
    assert got.dtype == dtype
    torch.testing.assert_close(got, reference.ia3_scale(x, vectors, batch), **TOLERANCES[dtype])
    base = batch.slot_ids < 0
    assert torch.equal(got[base], x[base])


def test_triton_empty_batch(triton_module) -> None:
    batch = AdapterBatch.build([], S, device=DEVICE)
    x = torch.zeros(0, D, device=DEVICE)
    assert triton_module("ia3").ia3_scale(x, torch.ones(S, D, device=DEVICE), batch).shape == (0, D)

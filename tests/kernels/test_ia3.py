"""IA3 per-token scaling: reference vs a per-token loop, Triton vs reference."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from tests.kernels.helpers import DEVICE, PATTERNS, TOLERANCES, randn, slot_ids_for

S, D = 4, 75  # D not a multiple of any block size


def case(pattern: str, T: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = randn(T, D, dtype=dtype, gen=gen)  # (T, d)
    vectors = (torch.rand(S, D, generator=gen) * 2).to(DEVICE, dtype)  # (S, d)
    return x, vectors, slot_ids_for(pattern, T, S, gen)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_reference_matches_per_token_loop(pattern: str) -> None:
    x, vectors, slot_ids = case(pattern, 19, torch.float32, seed=1)
    expected = x.double().cpu().clone()
    for t, s in enumerate(slot_ids.tolist()):
        if s >= 0:
            expected[t] *= vectors[s].double().cpu()
    got = reference.ia3_scale(x, vectors, slot_ids)
    torch.testing.assert_close(got.double().cpu(), expected, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_triton_matches_reference(triton_module, poison_allocations, pattern, dtype) -> None:
    x, vectors, slot_ids = case(pattern, 21, dtype, seed=2)
    got = triton_module("ia3").ia3_scale(x, vectors, slot_ids)
    # One fp32 product rounded once in both paths: bit-identical, except that Triton's CPU
    # interpreter rounds fp32 -> bf16 toward zero (measured: half the elements one ulp off).
    exact = dtype != torch.bfloat16 or DEVICE == "cuda"
    tolerance = dict(atol=0, rtol=0) if exact else TOLERANCES[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got, reference.ia3_scale(x, vectors, slot_ids), **tolerance)
    assert torch.equal(got[slot_ids < 0], x[slot_ids < 0])


def test_triton_empty_batch(triton_module) -> None:
    x, vectors, slot_ids = case("uniform", 0, torch.float32, seed=3)
    assert triton_module("ia3").ia3_scale(x, vectors, slot_ids).shape == (0, D)

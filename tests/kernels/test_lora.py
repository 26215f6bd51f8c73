"""LoRA shrink/expand: reference vs a per-token fp64 loop, Triton (both variants) vs reference."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference
from tests.kernels.helpers import (
    DEVICE,
    PATTERNS,
    TOLERANCES,
    loop_expand,
    loop_shrink,
    make_pool,
    poison_padding,
    randn,
    slot_ids_for,
)

IN, OUT = 50, 70  # not multiples of any block size
SLICE_SIZES, SLICE_OFFSETS, Y_WIDTH = [40, 24, 24], [0, 48, 76], 103  # q/k/v-like, with gaps
FP32 = TOLERANCES[torch.float32]
VARIANTS = {"per_token": 13, "segmented": 33}  # variant -> token count (decode-ish / prefill-ish)


def shrink_case(pattern: str, T: int, n: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    pool = make_pool(n, IN, OUT, dtype, gen)
    x = randn(T, IN, dtype=dtype, gen=gen)  # (T, in)
    return x, pool, slot_ids_for(pattern, T, len(pool.ranks), gen)


def expand_case(pattern: str, T: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    pool = make_pool(3, IN, max(SLICE_SIZES), dtype, gen)
    slot_ids = slot_ids_for(pattern, T, len(pool.ranks), gen)
    h = reference.lora_shrink(
        randn(T, IN, dtype=dtype, gen=gen), pool.a, slot_ids, pool.ranks, pool.scalings
    )
    y = randn(T, Y_WIDTH, dtype=dtype, gen=gen)  # (T, out_total)
    return y, h, pool, slot_ids


@pytest.mark.parametrize("pattern", PATTERNS)
def test_reference_matches_per_token_loop(pattern: str) -> None:
    x, pool, slot_ids = shrink_case(pattern, 17, 3, torch.float32, seed=1)
    h = reference.lora_shrink(x, pool.a, slot_ids, pool.ranks, pool.scalings)  # (3, T, r_max)
    expected_h = loop_shrink(x, pool.a, slot_ids, pool.ranks, pool.scalings)
    torch.testing.assert_close(h.double().cpu(), expected_h, **FP32)
    y0 = randn(17, Y_WIDTH, dtype=torch.float32, gen=torch.Generator().manual_seed(2))
    b = pool.b[:, :, : max(SLICE_SIZES)]
    y = reference.lora_expand(y0.clone(), h, b, slot_ids, pool.ranks, SLICE_OFFSETS, SLICE_SIZES)
    expected_y = loop_expand(y0, h, b, slot_ids, pool.ranks, SLICE_OFFSETS, SLICE_SIZES)
    torch.testing.assert_close(y.double().cpu(), expected_y, **FP32)


def test_reference_single_slice_form_matches_stacked() -> None:
    x, pool, slot_ids = shrink_case("with_base", 9, 1, torch.float32, seed=3)
    h = reference.lora_shrink(x, pool.a[0], slot_ids, pool.ranks, pool.scalings)  # (T, r_max)
    torch.testing.assert_close(
        h, reference.lora_shrink(x, pool.a, slot_ids, pool.ranks, pool.scalings)[0]
    )
    y = torch.zeros(9, OUT)
    reference.lora_expand(y, h, pool.b[0], slot_ids, pool.ranks, 0, OUT)
    expected = loop_expand(torch.zeros(9, OUT), h[None], pool.b, slot_ids, pool.ranks, [0], [OUT])
    torch.testing.assert_close(y.double(), expected, **FP32)


def run_shrink(lora, variant, x, pool, slot_ids, single_slice=False):
    """Triton shrink on the NaN-padded pool (reading padding would show)."""
    a = poison_padding(pool).a
    op = getattr(lora, f"lora_shrink_{variant}")
    return op(x, a[0] if single_slice else a, slot_ids, pool.ranks, pool.scalings)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_shrink_triton_matches_reference(
    triton_module, poison_allocations, variant, pattern
) -> None:
    x, pool, slot_ids = shrink_case(pattern, VARIANTS[variant], 1, torch.float32, seed=4)
    got = run_shrink(triton_module("lora"), variant, x, pool, slot_ids, single_slice=True)
    expected = reference.lora_shrink(x, pool.a[0], slot_ids, pool.ranks, pool.scalings)
    torch.testing.assert_close(got, expected, **FP32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_shrink_triton_dtypes_and_slices(triton_module, poison_allocations, variant, dtype) -> None:
    x, pool, slot_ids = shrink_case("with_base", VARIANTS[variant], 2, dtype, seed=5)
    got = run_shrink(triton_module("lora"), variant, x, pool, slot_ids)  # (2, T, r_max) fp32
    expected = reference.lora_shrink(x, pool.a, slot_ids, pool.ranks, pool.scalings)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **FP32)  # fp16/bf16 -> fp32 products are exact


def check_expand(lora, variant, pattern, dtype, seed) -> None:
    y0, h, pool, slot_ids = expand_case(pattern, VARIANTS[variant], dtype, seed)
    b = pool.b
    expected = reference.lora_expand(
        y0.clone(), h, b, slot_ids, pool.ranks, SLICE_OFFSETS, SLICE_SIZES
    )
    h_poisoned = h.clone()
    h_poisoned[:, slot_ids < 0] = float("nan")  # base-model rows must never be read
    for s, r in enumerate(pool.ranks.tolist()):
        h_poisoned[:, (slot_ids == s), r:] = float("nan")  # nor columns beyond the rank
    y = y0.clone()
    out = getattr(lora, f"lora_expand_{variant}")(
        y, h_poisoned, poison_padding(pool).b, slot_ids, pool.ranks, SLICE_OFFSETS, SLICE_SIZES
    )
    assert out is y  # in place
    torch.testing.assert_close(y, expected, **TOLERANCES[dtype])
    base = slot_ids < 0
    assert torch.equal(y[base], y0[base]), "tokens with slot -1 were modified"
    gaps = torch.ones(Y_WIDTH, dtype=torch.bool)
    for off, size in zip(SLICE_OFFSETS, SLICE_SIZES, strict=True):
        gaps[off : off + size] = False
    assert torch.equal(y[:, gaps.to(DEVICE)], y0[:, gaps.to(DEVICE)]), (
        "columns outside the slices changed"
    )


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_expand_triton_matches_reference(triton_module, variant, pattern) -> None:
    check_expand(triton_module("lora"), variant, pattern, torch.float32, seed=6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_expand_triton_dtypes(triton_module, variant, dtype) -> None:
    check_expand(triton_module("lora"), variant, "with_base", dtype, seed=7)


@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_batch(triton_module, variant) -> None:
    lora = triton_module("lora")
    x, pool, slot_ids = shrink_case("uniform", 0, 1, torch.float32, seed=8)
    h = getattr(lora, f"lora_shrink_{variant}")(x, pool.a[0], slot_ids, pool.ranks, pool.scalings)
    assert h.shape == (0, max(pool.ranks.tolist()))
    y = torch.zeros(0, OUT, device=DEVICE)
    getattr(lora, f"lora_expand_{variant}")(y, h, pool.b[0], slot_ids, pool.ranks, 0, OUT)


def test_dispatch_follows_environment(triton_module, monkeypatch: pytest.MonkeyPatch) -> None:
    lora = triton_module("lora")
    x, pool, slot_ids = shrink_case("uniform", 3, 1, torch.float32, seed=9)
    args = (x, pool.a[0], slot_ids, pool.ranks, pool.scalings)
    monkeypatch.setattr(lora, "lora_shrink", lambda *a, **k: "triton")
    monkeypatch.setenv("ADAPTERSERVE_KERNELS", "triton")
    assert kernels.lora_shrink(*args) == "triton"
    monkeypatch.setenv("ADAPTERSERVE_KERNELS", "reference")
    assert isinstance(kernels.lora_shrink(*args), torch.Tensor)
    monkeypatch.delenv("ADAPTERSERVE_KERNELS")
    assert isinstance(kernels.lora_shrink(*args), torch.Tensor) != x.is_cuda  # CPU -> reference
    monkeypatch.setenv("ADAPTERSERVE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="got 'cuda'"):
        kernels.lora_shrink(*args)

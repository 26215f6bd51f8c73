"""Bottleneck delta s * up(f(down(x))): reference vs fp64 loop, Triton vs reference."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.reference import Activation
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

IN, OUT = 60, 44


def case(pattern: str, T: int, dtype: torch.dtype, activations: list[int], seed: int):
    gen = torch.Generator().manual_seed(seed)
    pool = make_pool(1, IN, OUT, dtype, gen)
    x = randn(T, IN, dtype=dtype, gen=gen) * 2  # spread inputs over the activations' curved parts
    codes = torch.tensor(activations, dtype=torch.int32, device=DEVICE)  # (S,)
    return x, pool, slot_ids_for(pattern, T, len(pool.ranks), gen), codes


def per_slot(activation: Activation) -> list[int]:
    """Slot codes: the activation under test on most slots, neighbours on the others."""
    return [activation, activation, (activation + 1) % len(Activation), activation, activation]


@pytest.mark.parametrize("activation", list(Activation), ids=[a.name.lower() for a in Activation])
def test_reference_matches_per_token_loop(activation: Activation) -> None:
    x, pool, slot_ids, codes = case("with_base", 15, torch.float32, per_slot(activation), seed=1)
    got = reference.bottleneck(x, pool.a[0], pool.b[0], slot_ids, pool.ranks, pool.scalings, codes)
    h = loop_shrink(x, pool.a, slot_ids, pool.ranks, pool.scalings, codes)  # (1, T, r_max)
    expected = loop_expand(torch.zeros(15, OUT), h, pool.b, slot_ids, pool.ranks, [0], [OUT])
    torch.testing.assert_close(got.double().cpu(), expected, **TOLERANCES[torch.float32])


def test_identity_is_lora() -> None:
    x, pool, slot_ids, codes = case("uniform", 11, torch.float32, [Activation.IDENTITY] * 5, seed=2)
    got = reference.bottleneck(x, pool.a[0], pool.b[0], slot_ids, pool.ranks, pool.scalings, codes)
    h = reference.lora_shrink(x, pool.a[0], slot_ids, pool.ranks, pool.scalings)
    expected = reference.lora_expand(
        torch.zeros(11, OUT), h, pool.b[0], slot_ids, pool.ranks, 0, OUT
    )
    torch.testing.assert_close(got, expected)


def check_triton(bottleneck_module, pattern, T, dtype, activations, seed) -> None:
    x, pool, slot_ids, codes = case(pattern, T, dtype, activations, seed)
    expected = reference.bottleneck(
        x, pool.a[0], pool.b[0], slot_ids, pool.ranks, pool.scalings, codes
    )
    poisoned = poison_padding(pool)  # reading beyond a slot's size would give NaN
    got = bottleneck_module.bottleneck(
        x, poisoned.a[0], poisoned.b[0], slot_ids, pool.ranks, pool.scalings, codes
    )
    assert got.dtype == dtype and got.shape == (T, OUT)
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])
    assert (got[slot_ids < 0] == 0).all()


@pytest.mark.parametrize("activation", list(Activation), ids=[a.name.lower() for a in Activation])
@pytest.mark.parametrize("T", [9, 33], ids=["per_token", "segmented"])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter's sigmoid at -inf
def test_triton_every_activation(triton_module, poison_allocations, activation, T) -> None:
    check_triton(
        triton_module("bottleneck"), "with_base", T, torch.float32, per_slot(activation), seed=3
    )


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_triton_popularity_patterns(triton_module, poison_allocations, pattern) -> None:
    check_triton(triton_module("bottleneck"), pattern, 33, torch.float32, list(range(5)), seed=4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [9, 33], ids=["per_token", "segmented"])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_triton_dtypes(triton_module, poison_allocations, dtype, T) -> None:
    check_triton(triton_module("bottleneck"), "skewed", T, dtype, [2, 3, 4, 5, 6], seed=5)


# add_delta: y + s * B f(A u) in one op (the model's hook path). Its CPU reference lays the
# batch's adapter tokens out slot by slot when they fill a slot range densely, and falls back to
# shrink + expand otherwise; both layouts must agree with the fp64 loop.
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("nonlinear", [False, True], ids=["lora", "bottleneck"])
@pytest.mark.parametrize("T", [7, 40])
def test_add_delta_matches_loop(pattern: str, nonlinear: bool, T: int) -> None:
    codes_list = [Activation.TANH, Activation.RELU, Activation.IDENTITY, Activation.SILU, 6]
    x, pool, slot_ids, codes = case(pattern, T, torch.float32, codes_list, seed=11)
    codes = codes if nonlinear else None
    y = randn(T, OUT, dtype=torch.float32, gen=torch.Generator().manual_seed(12))
    before = y.clone()
    got = reference.add_delta(
        y, x, pool.a[0], pool.b[0], slot_ids, pool.ranks, pool.scalings, codes
    )
    h = loop_shrink(x, pool.a, slot_ids, pool.ranks, pool.scalings, codes)
    expected = loop_expand(y, h, pool.b, slot_ids, pool.ranks, [0], [OUT])
    torch.testing.assert_close(got.double().cpu(), expected, **TOLERANCES[torch.float32])
    assert torch.equal(y, before)  # a new tensor; the input is untouched
    assert torch.equal(got[slot_ids < 0], y[slot_ids < 0])


def test_add_delta_layouts() -> None:
    """Decode-like slots are padded into runs of consecutive slots (views, no copies); a long
    segment (a prefill chunk) gets its own matmuls; scattered slots are gathered into one run."""
    lay = reference._plan(torch.tensor([1, 0, 2, 1, 0, 2, -1], dtype=torch.int32)).layout()
    assert not lay.big and len(lay.runs) == 1 and lay.runs[0].index == slice(0, 3) and lay.c == 2
    lay = reference._plan(torch.tensor([0] * 30 + [4, 5], dtype=torch.int32)).layout()
    assert [slot for slot, _ in lay.big] == [0] and lay.runs[0].index == slice(4, 6)
    lay = reference._plan(torch.tensor([0, 2, 4, 6, 8], dtype=torch.int32)).layout()
    assert len(lay.runs) == 1 and lay.runs[0].index.tolist() == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("pattern", ["mixed_lengths", "scattered"])
def test_add_delta_long_segments_and_scattered_slots(pattern: str) -> None:
    gen = torch.Generator().manual_seed(21)
    pool = make_pool(1, IN, OUT, torch.float32, gen)
    if pattern == "mixed_lengths":  # a prefill chunk of slot 1 beside decode tokens
        slot_ids = torch.tensor([0, 2, 4, -1] + [1] * 20 + [3, 2], dtype=torch.int32)
    else:
        slot_ids = torch.tensor([4, 0, 2, 4, -1, 0], dtype=torch.int32)
    T = slot_ids.numel()
    x = randn(T, IN, dtype=torch.float32, gen=gen)
    y = randn(T, OUT, dtype=torch.float32, gen=gen)
    codes = torch.tensor([6, 1, 0, 4, 2], dtype=torch.int32)
    got = reference.add_delta(y, x, pool.a[0], pool.b[0], slot_ids, pool.ranks, pool.scalings, codes)
    h = loop_shrink(x, pool.a, slot_ids, pool.ranks, pool.scalings, codes)
    expected = loop_expand(y, h, pool.b, slot_ids, pool.ranks, [0], [OUT])
    torch.testing.assert_close(got.double(), expected, **TOLERANCES[torch.float32])


def test_triton_add_delta(triton_module, poison_allocations) -> None:
    x, pool, slot_ids, codes = case("with_base", 33, torch.float32, list(range(5)), seed=13)
    y = randn(33, OUT, dtype=torch.float32, gen=torch.Generator().manual_seed(14))
    args = (x, pool.a[0], pool.b[0], slot_ids, pool.ranks, pool.scalings, codes)
    expected = reference.add_delta(y, *args)
    got = triton_module("bottleneck").add_delta(y, *args)
    torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])


# add_delta over n slices of a fused projection (q|k|v): one call, each slice into its columns.
SLICE_SIZES = [OUT, 20, 20]  # GQA-like: k and v narrower than q, B padded to the widest


def sliced_case(pattern: str, T: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    pool = make_pool(3, IN, OUT, dtype, gen)
    b = pool.b.clone()
    for i, size in enumerate(SLICE_SIZES):
        b[i, :, size:] = 0  # rows beyond a slice's width stay zero, as in adapters.pool
    x = randn(T, IN, dtype=dtype, gen=gen) * 2
    y = randn(T, sum(SLICE_SIZES), dtype=dtype, gen=gen)
    codes = torch.tensor([6, 1, 0, 4, 2], dtype=torch.int32, device=DEVICE)
    return x, y, pool.a, b, pool, slot_ids_for(pattern, T, len(pool.ranks), gen), codes


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("nonlinear", [False, True], ids=["lora", "bottleneck"])
@pytest.mark.parametrize("T", [7, 40])
def test_add_delta_slices_match_loop(pattern: str, nonlinear: bool, T: int) -> None:
    x, y, a, b, pool, slot_ids, codes = sliced_case(pattern, T, torch.float32, seed=31)
    check_slices_against_loop(x, y, a, b, pool, slot_ids, codes if nonlinear else None)


def check_slices_against_loop(x, y, a, b, pool, slot_ids, codes) -> None:
    offsets = [0, OUT, OUT + 20]
    got = reference.add_delta(y, x, a, b, slot_ids, pool.ranks, pool.scalings, codes,
                              offsets, SLICE_SIZES)  # fmt: skip
    h = loop_shrink(x, a, slot_ids, pool.ranks, pool.scalings, codes)
    expected = loop_expand(y, h, b, slot_ids, pool.ranks, offsets, SLICE_SIZES)
    torch.testing.assert_close(got.double().cpu(), expected, **TOLERANCES[torch.float32])


def test_add_delta_slices_long_segment_beside_decodes() -> None:
    """A prefill chunk (its own matmuls per slice) beside decode tokens (runs)."""
    x, y, a, b, pool, _, codes = sliced_case("uniform", 26, torch.float32, seed=32)
    slot_ids = torch.tensor([0, 2, 4, -1] + [1] * 20 + [3, 2], dtype=torch.int32, device=DEVICE)
    check_slices_against_loop(x, y, a, b, pool, slot_ids, codes)


def test_add_delta_slices_refuse_a_mismatch() -> None:
    x, y, a, b, pool, slot_ids, _ = sliced_case("uniform", 5, torch.float32, seed=33)
    with pytest.raises(ValueError, match="slices"):
        reference.add_delta(y, x, a, b, slot_ids, pool.ranks, pool.scalings, None, [0, OUT],
                            SLICE_SIZES[:2])  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [9, 37])  # per-token and segmented launches
def test_triton_add_delta_slices(triton_module, poison_allocations, dtype, T) -> None:
    x, y, a, b, pool, slot_ids, codes = sliced_case("with_base", T, dtype, seed=34)
    args = (x, a, b, slot_ids, pool.ranks, pool.scalings, codes, [0, OUT, OUT + 20], SLICE_SIZES)
    expected = reference.add_delta(y, *args)
    got = triton_module("bottleneck").add_delta(y, *args)
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])


def test_add_delta_batch_reused_over_new_pools() -> None:
    """One slot_ids tensor (one cached batch plan) used with pool after pool, each freed before
    the next is made: a new pool's tensors can take a freed one's id, and must not get its
    cached rank / scaling factors (it did: a benchmark reusing its batch crashed)."""
    slot_ids = torch.tensor([0, 1, 1, 2, -1, 0], dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(41)
    x = randn(6, IN, dtype=torch.float32, gen=gen)
    y = randn(6, OUT, dtype=torch.float32, gen=gen)
    for rank in [16, 8, 16, 4, 12, 8, 2, 16]:
        S = 3
        ranks = torch.full((S,), rank, dtype=torch.int32, device=DEVICE)
        scalings = torch.rand(S, generator=gen).to(DEVICE) + 0.5
        a = randn(1, S, rank, IN, dtype=torch.float32, gen=gen)
        b = randn(1, S, OUT, rank, dtype=torch.float32, gen=gen)
        got = reference.add_delta(y, x, a[0], b[0], slot_ids, ranks, scalings)
        h = loop_shrink(x, a, slot_ids, ranks, scalings)
        expected = loop_expand(y, h, b, slot_ids, ranks, [0], [OUT])
        torch.testing.assert_close(got.double().cpu(), expected, **TOLERANCES[torch.float32])
        del ranks, scalings, a, b

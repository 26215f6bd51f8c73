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

"""add_delta, y + s * B f(A u) over n slices in one op (the model's hook op; LoRA is f =
identity, bottleneck adapters any activation): the reference and Triton against a plain
per-token fp64 loop, for every popularity pattern, decode rows and prefill chunks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adapterserve.kernels import AdapterBatch, reference
from adapterserve.kernels.reference import Activation
from tests.kernels.helpers import (
    DEVICE,
    LAYOUTS,
    PATTERNS,
    TOLERANCES,
    loop_expand,
    loop_shrink,
    make_weights,
    poison_padding,
    randn,
    step_rows,
)

IN, OUT = 60, 44
SLICE_SIZES, SLICE_OFFSETS = [OUT, 20, 20], [0, OUT, OUT + 20]  # GQA-like: k, v narrower than q
FP32 = TOLERANCES[torch.float32]
T = 33


def per_slot(activation: Activation) -> list[int]:
    """Slot codes: the activation under test on most slots, neighbours on the others."""
    return [activation, activation, (activation + 1) % len(Activation), activation, activation]


def case(pattern: str, layout: str, n: int, dtype: torch.dtype, codes, seed: int):
    gen = torch.Generator().manual_seed(seed)
    weights = make_weights(n, IN, OUT, dtype, gen, codes)
    if n > 1:  # rows beyond a slice's width stay zero, as in adapters.pool
        for i, size in enumerate(SLICE_SIZES):
            weights.b[i, :, :, size:] = 0
    u = randn(T, IN, dtype=dtype, gen=gen) * 2  # over the activations' curved parts
    y = randn(T, sum(SLICE_SIZES[:n]) if n > 1 else OUT, dtype=dtype, gen=gen)
    return u, y, weights, step_rows(pattern, layout, T, weights.a.shape[1], gen)


def slices(n: int) -> tuple[list[int], list[int]]:
    return (SLICE_OFFSETS, SLICE_SIZES) if n > 1 else ([0], [OUT])


def expected(u, y, weights, batch, n) -> torch.Tensor:
    ids = batch.slot_ids.tolist()
    return loop_expand(y, loop_shrink(u, weights, ids), weights, ids, *slices(n))


@pytest.mark.parametrize("activation", list(Activation), ids=[a.name.lower() for a in Activation])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_every_activation(activation: Activation, layout: str) -> None:
    u, y, weights, batch = case("with_base", layout, 1, torch.float32, [per_slot(activation)], 1)
    want = expected(u, y, weights, batch, 1)
    got = reference.add_delta(y.clone(), u, weights, batch)
    torch.testing.assert_close(got.double().cpu(), want, **FP32)


@pytest.mark.parametrize("form", ["grouped", "dense"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("nonlinear", [False, True], ids=["lora", "bottleneck"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_reference_slices(pattern: str, nonlinear: bool, layout: str, form: str) -> None:
    """Three slices (q|k|v-like) with their own ranks, scalings and activations per slot;
    decode rows grouped by slot (eager steps) or against every slot of a run, masked (a batch
    without the groups: compiled steps)."""
    codes = [[6, 1, 0, 4, 2], [0, 0, 5, 3, 1], [2, 2, 2, 0, 6]] if nonlinear else None
    u, y, weights, batch = case(pattern, layout, 3, torch.float32, codes, seed=2)
    assert batch.group_rows is not None
    if form == "dense":
        batch = dataclasses.replace(batch, group_rows=None, group_mask=None)
    want = expected(u, y, weights, batch, 3)
    before = y.clone()
    got = reference.add_delta(y, u, weights, batch, *slices(3))
    assert got is y  # in place
    torch.testing.assert_close(got.double().cpu(), want, **FP32)
    base = batch.slot_ids < 0
    assert torch.equal(got[base], before[base])


@pytest.mark.parametrize("form", ["grouped", "dense"])
def test_reference_slices_that_do_not_tile_y(form: str) -> None:
    """Slices with gaps and out of order in a wider y (the grouped form adds each slice on its
    own then, instead of one add over the whole row): columns outside every slice untouched."""
    u, _, weights, batch = case("with_base", "mixed", 3, torch.float32, None, seed=5)
    if form == "dense":
        batch = dataclasses.replace(batch, group_rows=None, group_mask=None)
    offsets, sizes = [60, 4, 30], SLICE_SIZES  # [60, 104), [4, 24), [30, 50) of 110 columns
    y = randn(T, 110, dtype=torch.float32, gen=torch.Generator().manual_seed(6))
    ids = batch.slot_ids.tolist()
    want = loop_expand(y, loop_shrink(u, weights, ids), weights, ids, offsets, sizes)
    got = reference.add_delta(y.clone(), u, weights, batch, offsets, sizes)
    torch.testing.assert_close(got.double().cpu(), want, **FP32)
    for lo, hi in ((0, 4), (24, 30), (50, 60), (104, 110)):
        assert torch.equal(got[:, lo:hi], y[:, lo:hi])


def test_reference_series_output_reads_y_before_adding() -> None:
    """Output-side series: u is y itself; the delta comes from y as it was."""
    u, y, weights, batch = case("uniform", "mixed", 1, torch.float32, [[6] * 5], seed=3)
    weights = make_weights(1, OUT, OUT, torch.float32, torch.Generator().manual_seed(4), [[6] * 5])
    want = expected(y, y, weights, batch, 1)
    got = reference.add_delta(y, y, weights, batch)
    torch.testing.assert_close(got.double().cpu(), want, **FP32)


def check_triton(module, pattern, layout, n, dtype, codes, seed) -> None:
    u, y, weights, batch = case(pattern, layout, n, dtype, codes, seed)
    want = reference.add_delta(y.clone(), u, weights, batch, *slices(n))
    got = module.add_delta(y.clone(), u, poison_padding(weights), batch, *slices(n))
    assert got.dtype == dtype and got.shape == y.shape
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])


@pytest.mark.parametrize("activation", list(Activation), ids=[a.name.lower() for a in Activation])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter's sigmoid at -inf
def test_triton_every_activation(triton_module, poison_allocations, activation, layout) -> None:
    check_triton(
        triton_module("bottleneck"),
        "with_base",
        layout,
        1,
        torch.float32,
        [per_slot(activation)],
        seed=5,
    )


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_triton_slices(triton_module, poison_allocations, pattern, layout) -> None:
    codes = [[6, 1, 0, 4, 2], [0, 0, 5, 3, 1], [2, 2, 2, 0, 6]]
    check_triton(triton_module("bottleneck"), pattern, layout, 3, torch.float32, codes, seed=6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_triton_dtypes(triton_module, poison_allocations, dtype, layout) -> None:
    check_triton(triton_module("bottleneck"), "skewed", layout, 3, dtype, [[2, 3, 4, 5, 6]] * 3, 7)


def test_every_slot_of_a_batch_at_once_with_one_slot_per_row() -> None:
    """A decode batch where each row has its own slot, and an all-base batch: the dense
    every-slot form gives each row its own slot's delta, and base rows nothing."""
    gen = torch.Generator().manual_seed(8)
    weights = make_weights(1, IN, OUT, torch.float32, gen, [[1, 6, 0, 2, 4]])
    u = randn(5, IN, dtype=torch.float32, gen=gen)
    y = randn(5, OUT, dtype=torch.float32, gen=gen)
    for ids in ([4, 3, 2, 1, 0], [-1] * 5):
        batch = AdapterBatch.build(ids, 5, device=DEVICE)
        got = reference.add_delta(y.clone(), u, weights, batch)
        torch.testing.assert_close(got.double().cpu(), expected(u, y, weights, batch, 1), **FP32)


@pytest.mark.parametrize("ids", [[0, 2, 3, -1, 2, 0], [4, 3, 2, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
def test_host_facts_only_skip_work(ids: list[int]) -> None:
    """With the batch's decode slots and the stack's loaded slots known, the reference computes
    only the runs of slots it needs (or nothing): the same result as over every slot."""
    gen = torch.Generator().manual_seed(9)
    weights = make_weights(3, IN, OUT, torch.float32, gen, [[6, 1, 0, 4, 2]] * 3)
    loaded = {0, 2, 3}
    for slot in set(range(5)) - loaded:  # slots without weights here, as the pool keeps them
        weights.a[:, slot] = 0
        weights.b[:, slot] = 0
    weights = dataclasses.replace(weights, loaded=loaded)
    u = randn(len(ids), IN, dtype=torch.float32, gen=gen)
    y = randn(len(ids), sum(SLICE_SIZES), dtype=torch.float32, gen=gen)
    batch = AdapterBatch.build(ids, 5, device=DEVICE)
    assert batch.decode_slots == frozenset(ids) - {-1}
    every_slot = dataclasses.replace(batch, decode_slots=None)
    got = reference.add_delta(y.clone(), u, weights, batch, *slices(3))
    want = reference.add_delta(y.clone(), u, weights, every_slot, *slices(3))
    torch.testing.assert_close(got, want, **FP32)
    assert reference.slot_runs(weights, every_slot) == [(0, 5)]
    runs = reference.slot_runs(weights, batch)
    assert all(any(a <= s < b for a, b in runs) for s in batch.decode_slots & loaded)
    if not batch.decode_slots & loaded:
        assert runs == [] and torch.equal(got, y)  # nothing to compute

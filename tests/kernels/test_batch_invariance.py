"""Batch invariance of the CPU paths, op by op (issue 24, item 6): a row's result is the same,
bit for bit, whatever else the call holds: a float base's matmul at 1 row or 40, an adapter
delta in a one-token segment or a long one, a decode row in a group of 1 or 5, a query's
attention in a whole prefill or a one-token chunk after a cache hit, a decode query beside a
longer sequence. Sizes are the default model's (576 inputs) where torch's own matmul picks
another kernel for a few rows. tests/engine/test_batch_invariance.py checks the whole engine."""

from __future__ import annotations

import torch

from adapterserve.kernels import AdapterBatch, DeltaWeights
from adapterserve.kernels import reference as ref
from adapterserve.server.model.batch import PrefillChunk
from adapterserve.server.model.llama import Dense, prefill_attention

D_IN = 576  # SmolLM2-135M's hidden size


def lora_weights(
    gen: torch.Generator, slots: int = 3, rank: int = 16, out: int = 96
) -> DeltaWeights:
    a = torch.randn(1, slots, rank, D_IN, generator=gen) / D_IN**0.5
    b = torch.randn(1, slots, rank, out, generator=gen) / rank**0.5
    return DeltaWeights(
        a,
        b,
        torch.full((1, slots), rank, dtype=torch.int32),
        torch.full((1, slots), 0.7),
        torch.zeros(1, slots, dtype=torch.int32),
    )


def test_a_float_layer_gives_a_row_the_same_bits_at_any_row_count():
    gen = torch.Generator().manual_seed(0)
    dense = Dense(torch.randn(960, D_IN, generator=gen), None, cpu=True)
    x = torch.randn(40, D_IN, generator=gen)
    whole = dense(x)
    for first, count in [(39, 1), (0, 1), (5, 3), (10, 13), (3, 17), (0, 40)]:
        assert torch.equal(dense(x[first : first + count]), whole[first : first + count]), (
            first,
            count,
        )


def test_an_adapter_delta_gives_a_prefill_row_the_same_bits_in_any_segment():
    gen = torch.Generator().manual_seed(1)
    weights, u = lora_weights(gen), torch.randn(40, D_IN, generator=gen)

    def delta(slot_ids: list[int], rows: slice) -> torch.Tensor:
        y = torch.zeros(len(slot_ids), 96)
        return ref.add_delta(y, u[rows], weights, AdapterBatch.build(slot_ids, 3, num_decode=0))

    whole = delta([1] * 40, slice(0, 40))
    for first, count in [(39, 1), (0, 1), (20, 5), (7, 13)]:
        got = delta([1] * count, slice(first, first + count))
        assert torch.equal(got, whole[first : first + count]), (first, count)
    mixed = delta([0] * 10 + [1] * 30, slice(0, 40))  # another adapter's segment before it
    assert torch.equal(mixed[10:], whole[10:])


def test_an_adapter_delta_gives_a_decode_row_the_same_bits_in_any_group():
    gen = torch.Generator().manual_seed(2)
    weights, u = lora_weights(gen), torch.randn(12, D_IN, generator=gen)

    def delta(slot_ids: list[int]) -> torch.Tensor:
        y = torch.zeros(len(slot_ids), 96)
        return ref.add_delta(y, u[: len(slot_ids)], weights, AdapterBatch.build(slot_ids, 3))

    alone = delta([2])
    for slot_ids in ([2, 2, 2, 2, 2], [2, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], [2, -1, 1]):
        assert torch.equal(delta(slot_ids)[0], alone[0]), slot_ids


def test_decode_attention_gives_a_sequence_the_same_bits_beside_any_other():
    gen = torch.Generator().manual_seed(3)
    S, H, kvh, d, block_size = 6, 4, 2, 16, 4
    k_cache, v_cache = (torch.randn(64, block_size, kvh, d, generator=gen) for _ in range(2))
    q = torch.randn(S, H, d, generator=gen)
    lens = torch.tensor([5, 1, 30, 9, 17, 4])
    tables = torch.randperm(64, generator=gen)[: S * 10].view(S, 10)
    together = ref.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25)
    for s in range(S):
        blocks = (int(lens[s]) + block_size - 1) // block_size
        alone = ref.paged_decode_attention(
            q[s : s + 1], k_cache, v_cache, tables[s : s + 1, :blocks], lens[s : s + 1], 0.25
        )
        assert torch.equal(alone[0], together[s]), s


def test_prefill_attention_gives_a_query_the_same_bits_in_any_chunk():
    gen = torch.Generator().manual_seed(4)
    L, H, kvh, d, block_size = 40, 4, 2, 16, 4
    q, k, v = (torch.randn(L, n, d, generator=gen) for n in (H, kvh, kvh))
    k_cache, v_cache = torch.zeros(11, block_size, kvh, d), torch.zeros(11, block_size, kvh, d)
    k_cache.view(-1, kvh, d)[:L], v_cache.view(-1, kvh, d)[:L] = k, v
    table = torch.arange(10)

    def chunk(past: int, length: int) -> torch.Tensor:
        rows = slice(past, past + length)
        return prefill_attention(
            q[rows],
            k[rows],
            v[rows],
            k_cache,
            v_cache,
            PrefillChunk(0, length, past + length, table),
            0.25,
        )

    whole = chunk(0, L)
    for past, length in [(39, 1), (12, 1), (0, 13), (13, 14), (5, 30), (0, 2)]:
        assert torch.equal(chunk(past, length), whole[past : past + length]), (past, length)

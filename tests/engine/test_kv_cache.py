"""BlockAllocator: exact ownership of KV-cache blocks (no model, no cache tensors)."""

from __future__ import annotations

import random

import pytest

from server.engine.kv_cache import BlockAllocator, OutOfBlocks


@pytest.mark.parametrize(
    ("num_tokens", "have", "expected"),
    [(0, 0, 0), (1, 0, 1), (4, 0, 1), (5, 0, 2), (8, 2, 0), (9, 2, 1), (3, 2, 0), (17, 1, 4)],
)
def test_blocks_needed_rounds_up_and_counts_what_is_there(num_tokens, have, expected):
    assert BlockAllocator(8, 4).blocks_needed(num_tokens, have) == expected


def test_fresh_allocator_is_all_free():
    allocator = BlockAllocator(5, 16)
    assert (allocator.num_free, allocator.num_used) == (5, 0)
    assert (allocator.num_blocks, allocator.block_size) == (5, 16)


def test_grow_extends_in_place_low_ids_first():
    allocator = BlockAllocator(6, 4)
    table: list[int] = []
    allocator.grow(table, 5)  # 2 blocks
    assert table == [0, 1]
    allocator.grow(table, 8)  # still 2 blocks: nothing added
    assert table == [0, 1]
    allocator.grow(table, 9)
    assert table == [0, 1, 2]
    other: list[int] = []
    allocator.grow(other, 1)
    assert other == [3]
    assert (allocator.num_used, allocator.num_free) == (4, 2)


def test_grow_to_fewer_tokens_never_shrinks():
    allocator = BlockAllocator(4, 4)
    table: list[int] = []
    allocator.grow(table, 12)
    allocator.grow(table, 1)
    assert table == [0, 1, 2] and allocator.num_used == 3


def test_out_of_blocks_leaves_table_and_free_list_untouched():
    allocator = BlockAllocator(4, 4)
    table: list[int] = []
    allocator.grow(table, 6)  # [0, 1]
    with pytest.raises(OutOfBlocks, match="need 3 blocks, 2 free"):
        allocator.grow(table, 20)  # 5 blocks wanted, 3 more needed
    assert table == [0, 1]
    assert (allocator.num_used, allocator.num_free) == (2, 2)
    allocator.grow(table, 16)  # exactly what is left still fits
    assert table == [0, 1, 2, 3] and allocator.num_free == 0
    with pytest.raises(OutOfBlocks):
        allocator.grow([], 1)


def test_free_returns_blocks_and_clears_the_table():
    allocator = BlockAllocator(4, 4)
    a: list[int] = []
    b: list[int] = []
    allocator.grow(a, 8)
    allocator.grow(b, 8)
    allocator.free(a)
    assert a == [] and (allocator.num_used, allocator.num_free) == (2, 2)
    allocator.grow(b, 16)  # b takes a's blocks back
    assert b == [2, 3, 0, 1] and allocator.num_free == 0
    allocator.free(b)
    assert (allocator.num_used, allocator.num_free) == (0, 4)


def test_freed_blocks_are_handed_out_again_in_table_order():
    allocator = BlockAllocator(8, 2)
    first: list[int] = []
    allocator.grow(first, 8)  # [0, 1, 2, 3]
    allocator.free(first)
    again: list[int] = []
    allocator.grow(again, 8)
    assert again == [0, 1, 2, 3]


def test_free_of_an_empty_table_is_a_no_op():
    allocator = BlockAllocator(3, 4)
    table: list[int] = []
    allocator.grow(table, 4)
    allocator.free([])
    assert (allocator.num_used, allocator.num_free) == (1, 2)


def test_table_listing_a_block_twice_is_refused():
    allocator = BlockAllocator(4, 4)
    with pytest.raises(AssertionError, match="block listed twice"):
        allocator.free([1, 1])


def test_freeing_more_blocks_than_exist_is_refused():
    """A block freed twice (a stale copy of a table) is not in use any more: asserted."""
    allocator = BlockAllocator(2, 4)
    table: list[int] = []
    allocator.grow(table, 8)
    stale = list(table)
    allocator.free(table)
    with pytest.raises(AssertionError, match="not in use"):
        allocator.free(stale)


def test_random_grow_and_free_keeps_exact_ownership():
    """Every block is owned by at most one table; used + free == total at every step."""
    rng = random.Random(1234)
    allocator = BlockAllocator(24, 4)
    tables: list[list[int]] = [[] for _ in range(6)]
    for _ in range(2000):
        table = rng.choice(tables)
        if rng.random() < 0.3:
            allocator.free(table)
        else:
            want = len(table) * 4 + rng.randint(0, 12)
            need = allocator.blocks_needed(want, len(table))
            before = list(table)
            if need > allocator.num_free:
                with pytest.raises(OutOfBlocks):
                    allocator.grow(table, want)
                assert table == before
            else:
                allocator.grow(table, want)
                assert table[: len(before)] == before and len(table) == len(before) + need
        owned = [block for t in tables for block in t]
        assert len(owned) == len(set(owned))
        assert all(0 <= block < 24 for block in owned)
        assert allocator.num_used == len(owned)
        assert allocator.num_used + allocator.num_free == 24
    for table in tables:
        allocator.free(table)
    assert allocator.num_used == 0


@pytest.mark.parametrize("bad", [[0], [7]], ids=["stale-double-free", "foreign-id"])
def test_double_free_or_foreign_block_is_refused_while_others_are_in_use(bad):
    allocator = BlockAllocator(4, 4)
    a: list[int] = []
    b: list[int] = []
    allocator.grow(a, 4)  # [0]
    allocator.grow(b, 4)  # [1]
    allocator.free(a)
    try:
        allocator.free(list(bad))
    except AssertionError:
        return  # refused: what the allocator's "exact ownership" promises
    tables = []
    for _ in range(allocator.num_free):
        table: list[int] = []
        allocator.grow(table, 4)
        tables.append(table)
    owned = [block for t in [b, *tables] for block in t]
    assert len(owned) == len(set(owned)) and all(0 <= x < 4 for x in owned), owned

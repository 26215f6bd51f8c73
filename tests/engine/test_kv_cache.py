"""BlockAllocator: exact ownership of KV-cache blocks (no model, no cache tensors)."""

from __future__ import annotations

import random

import pytest

from adapterserve.server.engine.kv_cache import BlockAllocator, OutOfBlocks, block_key


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


# ---- prefix caching --------------------------------------------------------------------------
def keys_of(tokens: list[int], identity: str = "base", size: int = 4) -> list[bytes]:
    keys: list[bytes] = []
    for start in range(0, len(tokens) - size + 1, size):
        keys.append(block_key(keys[-1] if keys else None, tokens[start : start + size], identity))
    return keys


def test_block_keys_chain_over_everything_before_and_the_identity():
    a = keys_of([1, 2, 3, 4, 5, 6, 7, 8])
    assert a == keys_of([1, 2, 3, 4, 5, 6, 7, 8]) and len(set(a)) == 2
    assert keys_of([9, 2, 3, 4, 5, 6, 7, 8])[1] != a[1]  # same tokens, another prefix
    assert keys_of([1, 2, 3, 4, 5, 6, 7, 8], "adapter:1")[0] != a[0]
    assert keys_of([1, 2, 3, 4], "adapter:1") != keys_of([1, 2, 3, 4], "adapter:2")
    assert keys_of([1, 2, 3, 2**40]) != keys_of([1, 2, 3, 0])  # ids are not truncated


def test_a_registered_block_is_cached_when_freed_and_shared_again():
    allocator = BlockAllocator(4, 4)
    first: list[int] = []
    allocator.grow(first, 8)
    keys = keys_of(list(range(8)))
    for block, key in zip(first, keys, strict=True):
        allocator.register(block, key)
    blocks = list(first)
    allocator.free(first)
    assert (allocator.num_used, allocator.num_cached, allocator.num_free) == (0, 2, 4)
    assert allocator.lookup(keys) == blocks
    assert allocator.lookup(keys_of([9, 1, 2, 3, 4, 5, 6, 7])) == []  # another first block
    assert allocator.lookup([keys_of([9, 1, 2, 3])[0], keys[1]]) == []  # a miss ends the run
    second: list[int] = []
    allocator.share(second, allocator.lookup(keys[:1]))
    allocator.grow(second, 9)  # a fresh block for the rest, and one more
    assert second[0] == blocks[0] and blocks[1] not in second[1:]
    third: list[int] = []
    allocator.share(third, allocator.lookup(keys))  # blocks[1] back from the cache
    assert [allocator.refs(b) for b in blocks] == [2, 1]
    allocator.free(second)
    allocator.free(third)
    assert (allocator.num_used, allocator.num_free) == (0, 4)


def test_cached_blocks_are_evicted_least_recently_freed_first_and_after_free_ones():
    allocator = BlockAllocator(4, 4)
    tables = []
    for i in range(3):
        table: list[int] = []
        allocator.grow(table, 4)
        allocator.register(table[0], keys_of([i] * 4)[0])
        tables.append(table)
    for table in (tables[1], tables[0], tables[2]):  # freed in this order
        allocator.free(table)
    fresh: list[int] = []
    allocator.grow(fresh, 4)
    assert fresh == [3] and allocator.evictions == 0  # the never-registered block first
    allocator.grow(fresh, 8)
    assert fresh[1] == 1 and allocator.evictions == 1  # then the LRU cached one
    assert allocator.lookup(keys_of([1] * 4)) == [] and allocator.lookup(keys_of([0] * 4)) == [0]


def test_a_key_registered_twice_keeps_the_first_block_and_blocks_not_in_use_are_refused():
    allocator = BlockAllocator(4, 4)
    a: list[int] = []
    b: list[int] = []
    allocator.grow(a, 4)
    allocator.grow(b, 4)
    key = keys_of([5] * 4)[0]
    allocator.register(a[0], key)
    allocator.register(b[0], key)  # computed twice in one step: the first stays the cached one
    assert allocator.lookup([key]) == a
    allocator.free(b)
    assert allocator.num_cached == 0  # b's block held no key: plainly free
    with pytest.raises(AssertionError, match="not in use"):
        allocator.register(b[0] if b else 1, key)


def test_caching_off_registers_nothing():
    allocator = BlockAllocator(2, 4, caching=False)
    table: list[int] = []
    allocator.grow(table, 4)
    key = keys_of([1] * 4)[0]
    allocator.register(table[0], key)
    allocator.free(table)
    assert allocator.lookup([key]) == [] and allocator.num_cached == 0


def test_clear_cache_forgets_cached_blocks_only():
    allocator = BlockAllocator(3, 4)
    held: list[int] = []
    gone: list[int] = []
    allocator.grow(held, 4)
    allocator.grow(gone, 4)
    k1, k2 = keys_of([1] * 4)[0], keys_of([2] * 4)[0]
    allocator.register(held[0], k1)
    allocator.register(gone[0], k2)
    allocator.free(gone)
    assert allocator.clear_cache() == 1
    assert allocator.lookup([k2]) == [] and allocator.lookup([k1]) == held
    assert (allocator.num_cached, allocator.num_free, allocator.num_used) == (0, 2, 1)


@pytest.mark.parametrize("seed", range(5))
def test_random_share_grow_free_keeps_refcounts_exact(seed: int):
    """Tables built from cached prefixes and fresh blocks, freed in random order: each block's
    refcount is its number of holders, used + free = total, a cached block's key still maps
    to it, and everything comes back."""
    rng = random.Random(seed)
    allocator = BlockAllocator(12, 4)
    tables: list[list[int]] = []
    for _ in range(400):
        if tables and (rng.random() < 0.4 or allocator.num_free < 3):
            allocator.free(tables.pop(rng.randrange(len(tables))))
        else:
            tokens = [rng.randint(0, 2) for _ in range(rng.randint(1, 12))]
            keys = keys_of(tokens)
            table: list[int] = []
            allocator.share(table, allocator.lookup(keys))
            try:
                allocator.grow(table, len(tokens))
            except OutOfBlocks:
                allocator.free(table)
                continue
            for block, key in zip(table, keys, strict=False):
                allocator.register(block, key)
            tables.append(table)
        holders: dict[int, int] = {}
        for t in tables:
            for b in t:
                holders[b] = holders.get(b, 0) + 1
        assert all(allocator.refs(b) == n for b, n in holders.items())
        assert allocator.num_used == len(holders)
        assert allocator.num_used + allocator.num_free == allocator.num_blocks
    for table in tables:
        allocator.free(table)
    assert allocator.num_used == 0 and allocator.num_free == 12

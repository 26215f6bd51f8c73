"""Paged KV-cache block accounting, with prefix caching. The buffers live in the model's KVCache;
this tracks which sequences own which blocks, and which blocks hold reusable K/V.

Blocks are reference-counted: a block is *used* while some sequence's table lists it, and several
tables may list the same block (a cached prompt prefix, beams of one request). A *full* block
whose K/V are computed can be registered under its content key (`block_key`): a hash chained over
every token before it and the identity of the weights that computed it (the base model, or one
version of an adapter, whose virtual tokens it covers). When its last user goes, a registered
block keeps its K/V and its key: it is *cached*, found by `lookup` and shared again, until a
fresh block is needed and it is the least recently freed cached block (LRU eviction). A block
that was never registered is simply *free*. Exact accounting: used + cached + free = num_blocks.

Keys are SHA-256 digests, so one client cannot construct a prompt whose blocks collide with
another's (Python's hash of token tuples could be collided on purpose).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

BlockKey = bytes


class OutOfBlocks(Exception):
    """Not enough free blocks; the scheduler preempts or waits."""


def block_key(parent: BlockKey | None, tokens: Sequence[int], identity: str) -> BlockKey:
    """The content key of a full block: its tokens, everything before them (`parent`, the
    previous block's key) and the weights' identity (see Sequence.cache_identity)."""
    h = hashlib.sha256(parent or b"\0" * 32)
    h.update(identity.encode())
    h.update(b"\0")
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockAllocator:
    """Reference-counted blocks with an LRU of cached ones. With `caching` off nothing is ever
    registered, and the allocator is a plain free list."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool = True) -> None:
        self.num_blocks, self.block_size, self.caching = num_blocks, block_size, caching
        self._refs = [0] * num_blocks
        self._plain = list(range(num_blocks - 1, -1, -1))  # free, no key; pop() -> low ids first
        self._cached: OrderedDict[int, None] = OrderedDict()  # free with a key, LRU first
        self._key_of: dict[int, BlockKey] = {}
        self._block_of: dict[BlockKey, int] = {}
        self.evictions = 0  # cached blocks handed out fresh (their K/V dropped)

    @property
    def num_free(self) -> int:
        """Blocks `grow` can hand out: the free ones and the cached ones (evicted on demand)."""
        return len(self._plain) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Unused blocks that keep reusable K/V."""
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def refs(self, block: int) -> int:
        return self._refs[block]

    def blocks_needed(self, num_tokens: int, have: int) -> int:
        """Blocks to add so that a table of `have` blocks holds `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - have)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Extend `table` in place with fresh blocks to hold `num_tokens` tokens, or raise
        OutOfBlocks untouched. Free blocks go first, then the least recently freed cached ones."""
        need = self.blocks_needed(num_tokens, len(table))
        if need > self.num_free:
            raise OutOfBlocks(f"need {need} blocks, {self.num_free} free")
        table.extend(self._fresh() for _ in range(need))

    def free(self, table: list[int]) -> None:
        """Drop a table's hold on its blocks (a block goes when its last holder does). A block
        listed twice, or not in use (freed twice, never handed out), is a bookkeeping bug that
        would give one block two owners: refused, nothing freed."""
        assert len(set(table)) == len(table), "block listed twice"
        idle = sorted(b for b in table if not (0 <= b < self.num_blocks and self._refs[b] > 0))
        assert not idle, f"blocks not in use: {idle}"
        # the last blocks first: a prefix's head, shared the most, is evicted last
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._cached[block] = None
                else:
                    self._plain.append(block)
        table.clear()

    # ---- prefix caching -------------------------------------------------------------------
    def lookup(self, keys: Sequence[BlockKey]) -> list[int]:
        """The blocks of the longest prefix of `keys` that is registered (no hold taken)."""
        blocks = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def share(self, table: list[int], blocks: Sequence[int]) -> None:
        """Append `blocks` (registered or in use) to `table`, taking a hold on each."""
        for block in blocks:
            assert self._refs[block] > 0 or block in self._cached, f"block {block} is not shareable"
            if self._refs[block] == 0:
                del self._cached[block]
            self._refs[block] += 1
        table.extend(blocks)

    def register(self, block: int, key: BlockKey) -> None:
        """`block` (in use, full, its K/V computed or being computed in this step) holds the
        content `key` names. A key already held by another block keeps that block."""
        assert self._refs[block] > 0, f"block {block} is not in use"
        if not self.caching or key in self._block_of or block in self._key_of:
            return
        self._key_of[block], self._block_of[key] = key, block

    def clear_cache(self) -> int:
        """Forget every cached block (their K/V are dropped; blocks in use keep their keys)."""
        count = len(self._cached)
        for block in self._cached:
            del self._block_of[self._key_of.pop(block)]
            self._plain.append(block)
        self._cached.clear()
        return count

    def _fresh(self) -> int:
        if self._plain:
            block = self._plain.pop()
        else:
            block, _ = self._cached.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
            self.evictions += 1
        self._refs[block] = 1
        return block

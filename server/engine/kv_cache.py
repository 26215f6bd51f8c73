"""Paged KV-cache block accounting. The buffers live in the model's KVCache; this tracks ownership."""

from __future__ import annotations


class OutOfBlocks(Exception):
    """Not enough free blocks; the scheduler preempts or waits."""


class BlockAllocator:
    """Free list of block ids. Exact: every allocated block is freed by exactly one owner."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int, have: int) -> int:
        """Blocks to add so that a table of `have` blocks holds `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - have)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Extend `table` in place to hold `num_tokens` tokens, or raise OutOfBlocks untouched."""
        need = self.blocks_needed(num_tokens, len(table))
        if need > len(self._free):
            raise OutOfBlocks(f"need {need} blocks, {len(self._free)} free")
        new = [self._free.pop() for _ in range(need)]
        self._used.update(new)
        table.extend(new)

    def free(self, table: list[int]) -> None:
        """Return a table's blocks. A block listed twice, freed twice or never handed out is a
        bookkeeping bug that would give one block two owners: refused, nothing freed."""
        blocks = set(table)
        assert len(blocks) == len(table), "block listed twice"
        assert blocks <= self._used, f"blocks not in use: {sorted(blocks - self._used)}"
        self._used -= blocks
        self._free.extend(reversed(table))
        table.clear()

"""Per-step batch metadata handed from the scheduler to the model (frozen; built once per step)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefillChunk:
    """One sequence's run of prompt tokens in this step: rows [start, start+length) of the batch."""

    start: int
    length: int
    context_len: int  # tokens in the cache after this chunk (positions 0..context_len-1)
    block_table: torch.Tensor  # (num_blocks,) int64


@dataclass(frozen=True)
class ForwardBatch:
    """A flattened step: decode tokens first (one per sequence), then prefill chunks.

    Example with block_size 4: a decoding sequence at position 9 with blocks [7, 2, 5] writes its
    token to flat slot 5*4 + 9%4 = 21 and attends to 10 keys; a new 3-token prompt with block [0]
    fills slots 0..2 and attends causally.
    """

    token_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    slot_mapping: torch.Tensor  # (T,) int64: flat KV-cache slot each token's K/V is written to
    slot_ids: torch.Tensor  # (T,) int32: adapter slot per token, -1 = base model
    decode_block_tables: torch.Tensor  # (D, max_blocks) int64 for the D decode tokens (rows 0..D-1)
    decode_context_lens: torch.Tensor  # (D,) int64
    prefills: tuple[PrefillChunk, ...]
    logits_indices: torch.Tensor  # (N,) int64: rows whose logits the engine needs
    # prompt tuning: rows whose input embedding is a virtual token's (not the token id's)
    embed_rows: torch.Tensor | None = None  # (E,) int64
    embed_values: torch.Tensor | None = None  # (E, dim)
    # the distinct slot_ids >= 0, known on the host (neither the model nor the hooks then read
    # slot_ids back from the device); None = compute from slot_ids
    adapter_slots: frozenset[int] | None = None

    @property
    def num_decode(self) -> int:
        return int(self.decode_context_lens.shape[0])

"""The tensors of one forward: ForwardBatch, what `Transformer.forward` and the compiled decode
step read. The engine's BatchBuilder (server/engine/batch.py) builds it from a StepPlan; the
model knows nothing of plans, sequences or the scheduler.

A batch is flattened: decode tokens first (one per sequence), then prefill chunks. Example with
block_size 4: a decoding sequence at position 9 with blocks [7, 2, 5] writes its token to flat
slot 5*4 + 9%4 = 21 and attends to 10 keys; a new 3-token prompt with block [0] fills slots
0..2 and attends causally.

Padding rows (a decode step padded up to a compiled batch size) read token 0 at position 0,
write their K/V into the trash block (the cache's extra last block, never handed to a
sequence), attend to that one slot, carry adapter slot -1, and have their logits ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterserve.kernels import AdapterBatch


@dataclass(frozen=True, eq=False)
class PrefillChunk:
    """One sequence's run of prompt tokens in this step: rows [start, start+length) of the batch."""

    start: int
    length: int
    context_len: int  # tokens in the cache after this chunk (positions 0..context_len-1)
    block_table: torch.Tensor  # (num_blocks,) int64


@dataclass(frozen=True, eq=False)
class ForwardBatch:
    token_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    slot_mapping: torch.Tensor  # (T,) int64: flat KV-cache slot each token's K/V is written to
    decode_block_tables: torch.Tensor  # (D, nb) int64 for the D decode rows (rows 0..D-1)
    decode_context_lens: torch.Tensor  # (D,) int64
    prefills: tuple[PrefillChunk, ...]
    logits_indices: torch.Tensor  # (N,) int64: rows whose logits the engine needs
    # prompt tuning: rows whose input embedding is a virtual token's (not the token id's)
    embed_rows: torch.Tensor | None = None  # (E,) int64
    embed_values: torch.Tensor | None = None  # (E, dim)
    adapters: AdapterBatch | None = None  # None: no row has an adapter slot
    # over the logits rows (LoRA on lm_head): their decode rows first, as in `adapters`, then
    # the prefill rows that need logits; None when no logits row has an adapter slot
    head_adapters: AdapterBatch | None = None

    @property
    def num_decode(self) -> int:
        return self.decode_context_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

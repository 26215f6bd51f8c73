"""From a StepPlan to the tensors of one forward: BatchBuilder builds the model's ForwardBatch
(server/model/batch.py, where the flattened layout and padding rows are described) into
persistent buffers allocated once (sized by max_num_seqs / max_num_batched_tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq

import torch

from adapterserve.kernels import AdapterBatch, runs
from adapterserve.server.engine.scheduler import Sequence, StepPlan
from adapterserve.server.model.batch import ForwardBatch, PrefillChunk


class BatchBuilder:
    """Turns StepPlans into ForwardBatches over buffers allocated once.

    `full_width` keeps decode block tables at their full width (max_model_len / block_size):
    what captured CUDA graphs need (fixed shapes; the Triton attention stops at each context).
    Otherwise tables are as wide as the step's longest context, which is what the reference
    attention gathers."""

    def __init__(
        self,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        block_size: int,
        max_blocks_per_seq: int,
        trash_block: int,
        num_adapter_slots: int,
        device: torch.device,
        full_width: bool = False,
    ) -> None:
        self.block_size, self.trash_block = block_size, trash_block
        self.device, self.full_width = device, full_width
        tokens = max(max_num_batched_tokens, max_num_seqs)
        rows = max_num_seqs

        def zeros(*shape, dtype=torch.int64):
            return torch.zeros(shape, dtype=dtype, device=device)

        self.token_ids, self.positions, self.slot_mapping = (
            zeros(tokens),
            zeros(tokens),
            zeros(tokens),
        )
        self.logits_indices = zeros(tokens)
        self.tables, self.context_lens = zeros(rows, max_blocks_per_seq), zeros(rows)
        self.slot_ids = zeros(tokens, dtype=torch.int32)
        self.head_slot_ids = zeros(tokens, dtype=torch.int32)
        self.onehot = zeros(rows, num_adapter_slots, dtype=torch.float32)
        self.base_rows = zeros(rows, 1, dtype=torch.float32)
        self.rows = torch.arange(tokens, dtype=torch.int64, device=device)

    @property
    def max_decode_rows(self) -> int:
        return self.tables.shape[0]

    @property
    def max_blocks_per_seq(self) -> int:
        return self.tables.shape[1]

    def build(
        self, plan: StepPlan, pad_to: int | None = None, dense: bool = False, min_width: int = 1
    ) -> ForwardBatch:
        """The plan's tensors; `pad_to` pads a decode-only plan with padding rows. `dense` (a
        compiled step) leaves out the host facts that let adapter ops skip unused slots, so
        the work does not depend on the batch. `min_width`: decode block tables at least this
        wide (padding rows' extra columns: the trash block)."""
        bs, D = self.block_size, plan.num_decodes
        tokens, positions, slots, slot_ids, logit_rows = [], [], [], [], []
        prefills, embed_rows, embed_values = [], [], []
        for i, (seq, n) in enumerate(plan.work):
            start = len(tokens)
            pos = range(seq.num_computed, seq.num_computed + n)
            tokens += seq.all_ids[seq.num_computed : seq.num_computed + n]
            positions += pos
            slots += seq.cache_slots(pos, bs)
            slot_ids += [seq.slot_id] * n
            logit_rows += _logit_rows(seq, start, n)
            if seq.virtual_embeds is not None and seq.num_computed < seq.num_virtual:
                end = min(seq.num_virtual, seq.num_computed + n)
                embed_rows += range(start, start + end - seq.num_computed)
                embed_values.append(seq.virtual_embeds[seq.num_computed : end])
            if i >= D:
                table = torch.tensor(seq.block_table, dtype=torch.int64, device=self.device)
                prefills.append(PrefillChunk(start, n, seq.num_computed + n, table))
        rows = D
        if pad_to is not None and pad_to > D:
            assert not prefills, "only a decode-only plan is padded"
            assert pad_to <= self.max_decode_rows, (
                f"{pad_to} rows, buffers for {self.max_decode_rows}"
            )
            rows = pad_to
            trash = self.trash_block * bs
            tokens += [0] * (rows - D)
            positions += [0] * (rows - D)
            slots += [trash] * (rows - D)
            slot_ids += [-1] * (rows - D)
            logit_rows += range(D, rows)
        T = len(tokens)
        self._fill(self.token_ids, tokens)
        self._fill(self.positions, positions)
        self._fill(self.slot_mapping, slots)
        self._fill(self.logits_indices, logit_rows)
        width = self._fill_tables([seq for seq, _ in plan.work[:D]], rows, min_width)
        adapters = self._adapters(slot_ids, rows, dense)
        return ForwardBatch(
            token_ids=self.token_ids[:T],
            positions=self.positions[:T],
            slot_mapping=self.slot_mapping[:T],
            decode_block_tables=self.tables[:rows, :width],
            decode_context_lens=self.context_lens[:rows],
            prefills=tuple(prefills),
            logits_indices=self.logits_indices[: len(logit_rows)],
            embed_rows=self._tensor(embed_rows) if embed_rows else None,
            embed_values=torch.cat(embed_values) if embed_values else None,
            adapters=adapters,
            head_adapters=self._head_adapters(adapters, slot_ids, logit_rows, rows),
        )

    def dummy(self, rows: int, width: int = 1) -> ForwardBatch:
        """`rows` padding rows with block tables `width` wide, and nothing else (compiling a
        decode step ahead of traffic)."""
        return self.build(StepPlan((), 0), pad_to=rows, dense=True, min_width=width)

    def _fill(self, buffer: torch.Tensor, values: Seq[int]) -> None:
        if values:
            buffer[: len(values)].copy_(torch.tensor(values, dtype=buffer.dtype), non_blocking=True)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def _fill_tables(self, decodes: list[Sequence], rows: int, min_width: int = 1) -> int:
        """Decode rows' block tables and context lengths (padding rows: the trash block, one
        key); returns the width the step's tables use."""
        width = max((len(s.block_table) for s in decodes), default=1)
        width = max(width, min(min_width, self.tables.shape[1]))
        width = self.tables.shape[1] if self.full_width else width
        table = [
            s.block_table + [s.block_table[-1]] * (width - len(s.block_table)) for s in decodes
        ]
        table += [[self.trash_block] * width] * (rows - len(decodes))
        if rows:
            values = torch.tensor(table, dtype=torch.int64)
            self.tables[:rows, :width].copy_(values, non_blocking=True)
            lens = [s.num_computed + 1 for s in decodes] + [1] * (rows - len(decodes))
            self._fill(self.context_lens, lens)
        return width

    def _adapters(self, slot_ids: list[int], rows: int, dense: bool) -> AdapterBatch | None:
        """The step's AdapterBatch, or None when no row uses an adapter slot."""
        if all(s < 0 for s in slot_ids):
            return None
        self._fill(self.slot_ids, slot_ids)
        onehot = torch.zeros(rows, self.onehot.shape[1])
        for row, slot in enumerate(slot_ids[:rows]):
            if slot >= 0:
                onehot[row, slot] = 1.0
        self.onehot[:rows].copy_(onehot, non_blocking=True)
        self.base_rows[:rows].copy_(1.0 - onehot.sum(1, keepdim=True), non_blocking=True)
        decode_slots = None if dense else frozenset(slot_ids[:rows]) - {-1}
        return AdapterBatch.assemble(
            self.slot_ids[: len(slot_ids)],
            self.onehot[:rows],
            self.base_rows[:rows],
            runs(slot_ids, rows),
            self.rows[: len(slot_ids)],
            decode_slots,
            None if dense else slot_ids[:rows],
        )

    def _head_adapters(
        self, adapters: AdapterBatch | None, slot_ids: list[int], logit_rows: list[int], rows: int
    ) -> AdapterBatch | None:
        """The logits rows' AdapterBatch: the step's own when the logits rows are its rows (a
        decode-only step); else the decode rows (which lead both) and the prefill rows' slots
        as segments over the logits rows."""
        if adapters is None:
            return None
        if len(logit_rows) == len(slot_ids):  # every row: [0, T) in order
            return adapters
        ids = [slot_ids[row] for row in logit_rows]
        if all(s < 0 for s in ids):
            return None
        self._fill(self.head_slot_ids, ids)
        head = AdapterBatch.assemble(
            self.head_slot_ids[: len(ids)],
            adapters.onehot,
            adapters.base_rows,
            runs(ids, rows),
            self.rows[: len(ids)],
            adapters.decode_slots,
        )
        # the same decode rows lead both: the step's groups, not built twice
        return dataclasses.replace(
            head, group_rows=adapters.group_rows, group_mask=adapters.group_mask
        )


def _logit_rows(seq: Sequence, start: int, n: int) -> list[int]:
    """Rows needing logits: every row when prompt logprobs are due, else the last if it samples."""
    if seq.wants_prompt_logprobs:
        return list(range(start, start + n))
    return [start + n - 1] if seq.num_computed + n == seq.num_tokens else []

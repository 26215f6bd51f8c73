"""What the adapter ops read besides activations: the step's per-token slots (AdapterBatch, built
once per step) and one site's slot-stacked weights (DeltaWeights, owned by the pool).

Rows of a step: [0, num_decode) are one token per sequence (decodes), the rest are prefill
chunks, each a contiguous run of one sequence's tokens. Example, 4 slots, block of 7 rows:

    slot_ids   = [2, -1, 0, 2,  1, 1, 1]     num_decode = 4: rows 0-3 decode, rows 4-6 one chunk
    onehot     = [[0,0,1,0], [0,0,0,0], [1,0,0,0], [0,0,1,0]]    (num_decode, S)
    base_rows  = [[0], [1], [0], [0]]                           1 where a decode row has no slot
    segments   = ((1, 4, 3),)                                   (slot, first row, count)

Decode rows: in an eager step the CPU reference groups them by slot (`group_rows`, built from
host slot ids) and runs one batched matmul per factor, each slot's rows against its own weights;
in a compiled step (no host facts) it computes every row against every slot's stacked weights,
masked by `onehot`, so the op sequence never depends on which adapters the step holds. Triton:
one program per token reading its own slot. Prefill chunks are few and long: each runs on its
slot's weights alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# The projections of a layer that an adapter may target (LoRA, bottlenecks, IA3), in the order
# the model computes them: one definition for the model (server/model) and the adapters.
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

Segment = tuple[int, int, int]  # (slot, first row, row count)


@dataclass(frozen=True, eq=False)
class AdapterBatch:
    slot_ids: torch.Tensor  # (T,) int32, -1 = base model
    onehot: torch.Tensor  # (D, S) fp32: 1.0 at (row, its slot); a base row is all zeros
    base_rows: torch.Tensor  # (D, 1) fp32: 1.0 for base rows, 0.0 for adapter rows
    segments: tuple[Segment, ...] = ()  # prefill rows of adapter sequences, host-side
    seg_slots: torch.Tensor | None = None  # (G,) int64 the segments on the device (Triton)
    seg_starts: torch.Tensor | None = None  # (G,) int64
    seg_counts: torch.Tensor | None = None  # (G,) int64
    rows: torch.Tensor | None = None  # (T,) int64 arange: the segmented kernels' token order
    max_segment: int = 0  # longest segment (sizes the segmented launch grid), 0 when none
    # The distinct slots of the decode rows, a host fact: ops may skip the slots (and stacks) no
    # decode row uses. None (a compiled step): every op computes over every slot, so that the
    # work does not depend on the batch.
    decode_slots: frozenset[int] | None = None
    # With decode_slots: the decode rows grouped by slot, for the reference's grouped matmuls
    # (each row against its own slot's weights only, not every slot's). group_rows (S, P) int64:
    # row s lists the decode rows of slot s, padded with row 0 to P = the most rows any slot
    # has; group_mask (S, P) fp32: 1.0 at real rows, 0.0 at padding.
    group_rows: torch.Tensor | None = None
    group_mask: torch.Tensor | None = None

    @property
    def num_decode(self) -> int:
        """D: rows [0, D) are single-token rows (a shape, so that a compiled step whose batch
        size varies sees a symbolic size, not a constant to guard on)."""
        return self.onehot.shape[0]

    @property
    def num_slots(self) -> int:
        return self.onehot.shape[1]

    @classmethod
    def build(
        cls,
        slot_ids: Sequence[int],
        num_slots: int,
        num_decode: int | None = None,
        device: torch.device | str = "cpu",
    ) -> AdapterBatch:
        """From host slot ids (tests, benchmarks; the engine fills preallocated buffers the
        same way). Rows past `num_decode` (default: all rows are decode rows) group into
        segments of consecutive equal slots."""
        ids = [int(s) for s in slot_ids]
        num_decode = len(ids) if num_decode is None else num_decode
        onehot = torch.zeros(num_decode, num_slots)
        for row, slot in enumerate(ids[:num_decode]):
            if slot >= 0:
                onehot[row, slot] = 1.0
        segments = runs(ids, num_decode)
        return cls.assemble(
            torch.tensor(ids, dtype=torch.int32, device=device),
            onehot.to(device),
            (1.0 - onehot.sum(1, keepdim=True)).to(device),
            segments,
            decode_slots=frozenset(ids[:num_decode]) - {-1},
            decode_ids=ids[:num_decode],
        )

    @classmethod
    def assemble(
        cls,
        slot_ids: torch.Tensor,
        onehot: torch.Tensor,
        base_rows: torch.Tensor,
        segments: tuple[Segment, ...],
        rows: torch.Tensor | None = None,
        decode_slots: frozenset[int] | None = None,
        decode_ids: Sequence[int] | None = None,
    ) -> AdapterBatch:
        """The batch with the device copies of `segments` the Triton kernels need, and with
        `decode_ids` (the decode rows' host slot ids, given with `decode_slots`) the groups."""
        device = slot_ids.device
        groups = (None, None)
        if decode_slots is not None and decode_ids is not None:
            groups = decode_groups(decode_ids, onehot.shape[1], device)
        if not segments:
            return cls(
                slot_ids,
                onehot,
                base_rows,
                decode_slots=decode_slots,
                group_rows=groups[0],
                group_mask=groups[1],
            )
        slots, starts, counts = (
            torch.tensor(column, dtype=torch.int64, device=device)
            for column in zip(*segments, strict=True)
        )
        if rows is None:
            rows = torch.arange(slot_ids.shape[0], dtype=torch.int64, device=device)
        return cls(
            slot_ids,
            onehot,
            base_rows,
            segments,
            slots,
            starts,
            counts,
            rows,
            max(count for _, _, count in segments),
            decode_slots,
            *groups,
        )


def decode_groups(
    decode_ids: Sequence[int], num_slots: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(group_rows, group_mask) of AdapterBatch for decode rows with host slot ids
    `decode_ids` (-1: base rows, in no group)."""
    members: list[list[int]] = [[] for _ in range(num_slots)]
    for row, slot in enumerate(decode_ids):
        if slot >= 0:
            members[slot].append(row)
    width = max(1, max(len(m) for m in members))
    rows = [m + [0] * (width - len(m)) for m in members]
    mask = [[1.0] * len(m) + [0.0] * (width - len(m)) for m in members]
    return (
        torch.tensor(rows, dtype=torch.int64, device=device),
        torch.tensor(mask, dtype=torch.float32, device=device),
    )


def runs(slot_ids: Sequence[int], first_row: int) -> tuple[Segment, ...]:
    """Maximal runs of one slot >= 0 among rows [first_row, len): (slot, start, count)."""
    found: list[Segment] = []
    for row in range(first_row, len(slot_ids)):
        slot = slot_ids[row]
        if slot < 0:
            continue
        if found and found[-1][0] == slot and found[-1][1] + found[-1][2] == row:
            found[-1] = (slot, found[-1][1], found[-1][2] + 1)
        else:
            found.append((slot, row, 1))
    return tuple(found)


@dataclass(frozen=True, eq=False)
class DeltaWeights:
    """n slices of slot-stacked low-rank weights at one site (the n targets of a fused
    projection, or one target), as the adapter ops read them:
        delta_i[t] = scalings[i, s] * f_{i,s}(u[t] @ a[i, s].T) @ b[i, s],  s = slot_ids[t].
    A slot's rows beyond its rank are zero in both `a` and `b`, so any op may compute over all
    R rows. `codes` names the non-identity activations present and `loaded` the slots holding
    weights (host facts kept by the pool), so that the reference applies only those activations
    (LoRA-only sites none) and skips slots, or whole stacks, that no row of a batch uses."""

    a: torch.Tensor  # (n, S, R, d_in)
    b: torch.Tensor  # (n, S, R, d_out_max): rank-major (B^T per slot), slices padded to the widest
    ranks: torch.Tensor  # (n, S) int32, 0 = nothing loaded
    scalings: torch.Tensor  # (n, S) fp32
    activations: torch.Tensor  # (n, S) int32 Activation codes
    codes: tuple[int, ...] = ()  # distinct non-identity codes in `activations`
    loaded: frozenset[int] | set[int] | None = None  # slots with weights here (None: maybe any)

"""PoolHooks: the model's AdapterHooks over an AdapterPool, through the public `kernels` ops.

Around each projection y = W x of (layer, target), per token t with slot s = slot_ids[t]:
    pre:  series input-side (gate/up)  x <- x + s_b * U f(D x)
          IA3 input (down)             x <- l_in[s] * x
    post: LoRA / parallel bottleneck   y <- y + s_b * B f(A x)     (LoRA: f = identity)
          series output-side (down)    y <- y + s_b * U f(D y)
          IA3 output (k, v)            y <- l_out[s] * y
One slot holds one adapter, so for any token at most one of these is not the identity and
their order does not matter. A stack is skipped when none of the batch's slots is loaded in it
(the set of slots in a batch is computed once per batch). Adapter math runs in fp32 (the ops
accumulate in fp32; deltas are added in fp32) and the result is cast back to x's dtype.
"""

from __future__ import annotations

from typing import Protocol

import torch

import kernels
from adapters.pool import AdapterPool, ModuleStack, VectorStack


class SlotBatch(Protocol):
    """What the hooks read from the model's ForwardBatch (adapters never import server)."""

    slot_ids: torch.Tensor  # (T,) int32, -1 = base model
    # optional: `adapter_slots`, the distinct slot ids >= 0 computed on the host


class PoolHooks:
    """AdapterHooks (server.model.llama) applying each token's pool slot."""

    def __init__(self, pool: AdapterPool) -> None:
        self.pool = pool
        self._batch: SlotBatch | None = None
        self._slots: frozenset[int] = frozenset()

    def pre(self, layer: int, target: str, x: torch.Tensor, batch: SlotBatch) -> torch.Tensor:
        slots = self._batch_slots(batch)
        if not slots:
            return x
        key = (layer, target)
        series = self.pool.series_in.get(key)
        if series is not None and series.loaded & slots:
            x = add_delta(x, x, series, batch.slot_ids)
        return scale(x, self.pool.ia3_in.get(key), slots, batch.slot_ids)

    def post(
        self, layer: int, target: str, x: torch.Tensor, y: torch.Tensor, batch: SlotBatch
    ) -> torch.Tensor:
        slots = self._batch_slots(batch)
        if not slots:
            return y
        post = self.pool.post.get((layer, target))
        if post is not None and post.loaded & slots:
            y = add_delta(y, x, post, batch.slot_ids)
        return self._after_post(layer, target, y, slots, batch)

    def post_fused(
        self, layer: int, targets: tuple[str, ...], x: torch.Tensor, fused: torch.Tensor,
        sizes: tuple[int, ...], batch: SlotBatch,
    ) -> torch.Tensor:  # fmt: skip
        """`post` on each target's columns of a fused projection (q|k|v, gate|up) of x. The
        LoRA / parallel deltas of all the targets are one adapter op over the pool's joint
        stack when it can serve the batch (no slot whose targets differ in scaling or
        activation); otherwise, and for what acts after them, target by target."""
        slots = self._batch_slots(batch)
        if not slots:
            return fused
        group = self.pool.post_groups.get((layer, targets))
        joint = (group is not None and tuple(sizes) == group.sizes
                 and not group.mixed & slots)  # fmt: skip
        if joint and group.loaded & slots:
            offsets = [sum(sizes[:i]) for i in range(len(sizes))]
            activations = group.activations if group.nonlinear & slots else None
            fused = kernels.add_delta(
                fused, x, group.a, group.b, batch.slot_ids, group.ranks, group.scalings,
                activations, offsets, list(sizes),
            )  # fmt: skip
        start = 0
        for target, size in zip(targets, sizes, strict=True):
            y = fused[:, start : start + size]
            out = (self._after_post(layer, target, y, slots, batch) if joint
                   else self.post(layer, target, x, y, batch))  # fmt: skip
            if out is not y:
                y.copy_(out)
            start += size
        return fused

    def _after_post(
        self, layer: int, target: str, y: torch.Tensor, slots: frozenset[int], batch: SlotBatch
    ) -> torch.Tensor:
        """What acts on a projection's output after its LoRA / parallel delta: series
        bottleneck on the output side, IA3 output scaling."""
        key = (layer, target)
        series = self.pool.series_out.get(key)
        if series is not None and series.loaded & slots:
            y = add_delta(y, y, series, batch.slot_ids)
        return scale(y, self.pool.ia3_out.get(key), slots, batch.slot_ids)

    def acts_before(self, layer: int, targets: tuple[str, ...], batch: SlotBatch) -> bool:
        """Whether `pre` changes any of `targets`' input (series input-side, IA3 input) here."""
        slots = self._batch_slots(batch)
        for target in targets:
            for stack in (self.pool.series_in.get((layer, target)),
                          self.pool.ia3_in.get((layer, target))):
                if stack is not None and stack.loaded & slots:
                    return True
        return False

    def _batch_slots(self, batch: SlotBatch) -> frozenset[int]:
        """Adapter slots used by the batch's tokens: the scheduler's `adapter_slots` when the
        batch has them, else one device read per batch (not per call)."""
        if batch is not self._batch:
            known = getattr(batch, "adapter_slots", None)
            if known is not None:
                self._slots = known
            else:
                ids = batch.slot_ids
                self._slots = frozenset(ids.unique().tolist()) - {-1} if ids.numel() else frozenset()
            self._batch = batch
        return self._slots


def add_delta(
    y: torch.Tensor, u: torch.Tensor, stack: ModuleStack, slot_ids: torch.Tensor
) -> torch.Tensor:
    """y + scalings[s] * B[s] f_s(A[s] u) per token (fp32), in y's dtype; a new tensor."""
    activations = stack.activations if stack.nonlinear else None  # identity: skip f entirely
    return kernels.add_delta(
        y, u, stack.a, stack.b, slot_ids, stack.ranks, stack.scalings, activations
    )


def scale(
    x: torch.Tensor, stack: VectorStack | None, slots: frozenset[int], slot_ids: torch.Tensor
) -> torch.Tensor:
    """IA3: x * vectors[slot] for tokens whose slot has a vector here; x unchanged otherwise."""
    if stack is None or not stack.loaded & slots:
        return x
    return kernels.ia3_scale(x, stack.vectors, slot_ids)

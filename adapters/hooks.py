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
        return scale(x, self.pool.ia3_in[key], slots, batch.slot_ids)

    def post(
        self, layer: int, target: str, x: torch.Tensor, y: torch.Tensor, batch: SlotBatch
    ) -> torch.Tensor:
        slots = self._batch_slots(batch)
        if not slots:
            return y
        key = (layer, target)
        post = self.pool.post[key]
        if post.loaded & slots:
            y = add_delta(y, x, post, batch.slot_ids)
        series = self.pool.series_out.get(key)
        if series is not None and series.loaded & slots:
            y = add_delta(y, y, series, batch.slot_ids)
        return scale(y, self.pool.ia3_out[key], slots, batch.slot_ids)

    def _batch_slots(self, batch: SlotBatch) -> frozenset[int]:
        """Adapter slots used by the batch's tokens; one device read per batch, not per call."""
        if batch is not self._batch:
            ids = batch.slot_ids
            self._slots = frozenset(ids.unique().tolist()) - {-1} if ids.numel() else frozenset()
            self._batch = batch
        return self._slots


def add_delta(
    y: torch.Tensor, u: torch.Tensor, stack: ModuleStack, slot_ids: torch.Tensor
) -> torch.Tensor:
    """y + scalings[s] * B[s] f_s(A[s] u) per token (fp32), in y's dtype; a new tensor."""
    activations = stack.activations if stack.nonlinear else None  # identity: skip f entirely
    h = kernels.lora_shrink(u, stack.a, slot_ids, stack.ranks, stack.scalings, activations)
    out = y.float()  # (T, d_out) fp32 copy (or y itself when already fp32: copy below)
    out = out.clone() if out is y else out
    kernels.lora_expand(out, h, stack.b, slot_ids, stack.ranks, 0, stack.b.shape[1])
    return out.to(y.dtype)


def scale(
    x: torch.Tensor, stack: VectorStack, slots: frozenset[int], slot_ids: torch.Tensor
) -> torch.Tensor:
    """IA3: x * vectors[slot] for tokens whose slot has a vector here; x unchanged otherwise."""
    if not stack.loaded & slots:
        return x
    return kernels.ia3_scale(x, stack.vectors, slot_ids)

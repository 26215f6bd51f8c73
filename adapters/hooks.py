"""PoolHooks: the model's adapter hook points over an AdapterPool, through the `kernels` ops.

At each of a layer's projection sites (SITES: q|k|v, o, gate|up, down), per token t with slot
s = slot_ids[t]:
    pre (per target):  series input-side (gate/up)  x <- x + s_b * U f(D x)
                       IA3 input (e.g. down)        x <- l_in[s] * x
    post (the site):   LoRA / parallel bottleneck   y <- y + s_b * B f(A x)   (all targets, one op)
                       series output-side (down)    y <- y + s_b * U f(D y)
                       IA3 output (e.g. k, v)       y <- l_out[s] * y        (all columns, one op)
One slot holds one adapter, so for a token at most one of these is not the identity and their
order does not matter.

Every stack the pool holds for a layer runs on every step that has adapter tokens, over the
whole batch (rows of slot -1, or of slots with nothing at that stack, add zero): the op
sequence depends on the pool's structure, never on the batch, which is what lets a decode step
be compiled and captured once. `layer(i)` hands the model a layer's stacks as one object
(`LayerAdapters`), rebuilt only when the pool's structure changes; the model passes it to the
hook points, so the same compiled block serves every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterserve.adapters.pool import SITES, AdapterPool, DeltaStack, DeltaStacks, VectorStack
from adapterserve.kernels import AdapterBatch, Ops, ops_for


@dataclass(frozen=True, eq=False)
class SiteAdapters:
    """The stacks at one projection site of one layer: for low-rank adapters one stack per rank
    class (empty tuples where the pool has none), IA3 vectors or None."""

    post: tuple[DeltaStack, ...]
    scale: VectorStack | None
    series_in: tuple[tuple[DeltaStack, ...], ...]  # per target
    ia3_in: tuple[VectorStack | None, ...]  # per target
    series_out: tuple[tuple[DeltaStack, ...], ...]  # per target
    offsets: tuple[int, ...]  # each target's first column in the site's output
    sizes: tuple[int, ...]

    @property
    def splits(self) -> bool:
        """Whether targets need their own inputs (an input-side stack): no fused matmul."""
        return any(self.series_in) or any(s is not None for s in self.ia3_in)


@dataclass(frozen=True, eq=False)
class LayerAdapters:
    sites: tuple[SiteAdapters, ...]  # in SITES order


class PoolHooks:
    """AdapterHooks (server.model.llama) applying each token's pool slot."""

    def __init__(self, pool: AdapterPool, ops: Ops | None = None) -> None:
        self.pool = pool
        self.ops = ops or ops_for(pool.device)
        self._layers: list[LayerAdapters] = []
        self._structure = -1

    def layer(self, i: int) -> LayerAdapters:
        """Layer i's stacks; rebuilt for every layer when the pool's structure has changed."""
        if self._structure != self.pool.structure:
            self._layers = [self._build(layer) for layer in range(self.pool.fingerprint.num_layers)]
            self._structure = self.pool.structure
        return self._layers[i]

    def _build(self, layer: int) -> LayerAdapters:
        pool, fingerprint = self.pool, self.pool.fingerprint
        sites = []
        for site in SITES:
            sizes = tuple(fingerprint.in_out(t)[1] for t in site)
            offsets = tuple(sum(sizes[:i]) for i in range(len(sizes)))
            sites.append(
                SiteAdapters(
                    post=_classes(pool.post.get((layer, site))),
                    scale=pool.post_scale.get((layer, site)),
                    series_in=tuple(_classes(pool.series_in.get((layer, t))) for t in site),
                    ia3_in=tuple(pool.ia3_in.get((layer, t)) for t in site),
                    series_out=tuple(_classes(pool.series_out.get((layer, t))) for t in site),
                    offsets=offsets,
                    sizes=sizes,
                )
            )
        return LayerAdapters(tuple(sites))

    def pre(self, site: SiteAdapters, i: int, x: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        """Target i's input: x with its series input-side delta and IA3 input scale (a new
        tensor when they exist; x is shared by the site's other targets)."""
        series, ia3 = site.series_in[i], site.ia3_in[i]
        if series:
            y = x.clone()
            for stack in series:
                self.ops.add_delta(y, x, stack, batch)
            x = y
        if ia3 is not None:
            x = self.ops.ia3_scale(x, ia3.vectors, batch, ia3.loaded)
        return x

    def post(
        self,
        site: SiteAdapters,
        x: torch.Tensor | tuple[torch.Tensor, ...],
        y: torch.Tensor,
        batch: AdapterBatch,
    ) -> torch.Tensor:
        """The site's output y (T, sum of sizes) from input x (one tensor, or one per target
        when the site splits), with every output-side stack applied; y is updated in place
        where it can be."""
        for stack in site.post:
            if isinstance(x, tuple):
                for i, (u, off, size) in enumerate(zip(x, site.offsets, site.sizes, strict=True)):
                    self.ops.add_delta(
                        y[:, off : off + size], u, stack.slice(i), batch, (0,), (size,)
                    )
            else:
                self.ops.add_delta(y, x, stack, batch, site.offsets, site.sizes)
        for series, off, size in zip(site.series_out, site.offsets, site.sizes, strict=True):
            columns = y[:, off : off + size]
            for stack in series:  # a row's slot sits in one rank class: the others add zero
                self.ops.add_delta(columns, columns, stack, batch)
        if site.scale is not None:
            y = self.ops.ia3_scale(y, site.scale.vectors, batch, site.scale.loaded)
        return y

    def embed(self, x: torch.Tensor, token_ids: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        """Token embeddings x (T, hidden) with each token's embed_tokens LoRA delta (in place):
        per rank class, the token's A column of its slot gathered, then expanded by its B."""
        embed = self.pool.embed
        if embed is None:
            return x
        slots = batch.slot_ids.clamp(
            min=0
        ).long()  # rows of slot -1 add zero (no onehot, no segment)
        for rows, stack in embed.classes.values():
            self.ops.add_delta(x, rows[slots, token_ids], stack, batch)
        return x

    def head(self, logits: torch.Tensor, h: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        """Logits (N, vocab) with the lm_head LoRA delta of each row's slot, from the rows' final
        hidden states h (N, hidden); `batch` is over those N rows (ForwardBatch.head_adapters)."""
        for stack in _classes(self.pool.head):
            self.ops.add_delta(logits, h, stack, batch)
        return logits


def _classes(stacks: DeltaStacks | None) -> tuple[DeltaStack, ...]:
    return () if stacks is None else stacks.stacks()

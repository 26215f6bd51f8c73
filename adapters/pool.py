"""The slot pool: every adapter's weights stacked per site on the device.

Hot-swap is a copy into a slot, never a reallocation (vLLM's `set` / `reset` per slot): a
request's tokens carry the slot index (-1 = base model) that the ops select by.

The model projects at four sites per layer, q|k|v and gate|up fused (SITES). Per site:
- `post[(layer, site)]`: LoRA and parallel bottleneck, y += s * B f(A x) on the site's input,
  one `DeltaStack` with a slice per target (LoRA is f = identity). One op serves the whole
  fused output.
- `post_scale[(layer, site)]`: IA3 on outputs, one `VectorStack` over the site's output columns
  (1.0 where a target or slot has no vector), so q|k|v is scaled in one op.
Per target, on its input side or after its delta:
- `series_in[(layer, target)]`: series bottleneck before the projection (gate, up): x += ...;
- `ia3_in[(layer, target)]`: IA3 on the input (PEFT's feedforward modules, e.g. down);
- `series_out[(layer, target)]`: series bottleneck on the output (down): y += s * U f(D y).
A site with any input-side stack computes each target from its own input (the fused matmul is
split); that is a fact of the pool, not of a batch.

A stack is allocated the first time an adapter uses it and then kept; its rank dimension is a
bucket (a power of two, at least 8) of the largest rank loaded into it so far, and grows (one
reallocation, contents copied) when a larger adapter arrives. `structure` counts allocations
and growths: the hooks and a compiled step depend on the pool's structure, never on which
slots a batch uses. Rows beyond a slot's rank stay zero (the ops may compute over them).
Memory per post stack: S * R * (in + sum of outs) elements; e.g. SmolLM2-135M, 8 slots, r16 on
every target: about 42M fp32 elements (170 MB).

`clear` zeroes a slot everywhere; `load` clears it, then the spec's kind (adapters.kinds)
copies each module's weights into the stack its placement names (`set_module`, `set_vector`).
Prefix and prompt adapters act at admission (K/V and embeddings): the pool keeps their tensors
on the device per slot (`prefix_kv`, `prompt_embeddings`).
"""

from __future__ import annotations

import torch

from adapters.kinds import kind_for
from adapters.spec import TARGETS, AdapterKind, AdapterSpec, BaseFingerprint, adapter_io
from kernels import Activation, DeltaWeights

SITES = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))  # the model's projections
SITE_OF = {target: site for site in SITES for target in site}
MIN_RANK_BUCKET = 8


def rank_bucket(rank: int) -> int:
    """The stack rank that holds `rank`: a power of two, at least MIN_RANK_BUCKET."""
    bucket = MIN_RANK_BUCKET
    while bucket < rank:
        bucket *= 2
    return bucket


class DeltaStack:
    """n slices of slot-stacked low-rank weights (kernels.DeltaWeights): slice i adds
    s[i, slot] * f(u @ a[i, slot].T) @ b[i, slot] to its columns. a (n, S, R, d_in), b (n, S, R,
    d_out_max) rank-major, ranks / scalings / activations (n, S); `codes` are the non-identity
    activations loaded (host), `loaded` the slots holding any slice."""

    def __init__(
        self, targets: tuple[str, ...], d_in: int, sizes: tuple[int, ...], num_slots: int,
        rank: int, device: torch.device, dtype: torch.dtype,
    ) -> None:  # fmt: skip
        self.targets, self.d_in, self.sizes = targets, d_in, sizes
        self.device, self.dtype = device, dtype
        n, S = len(targets), num_slots
        self.a = torch.zeros(n, S, rank, d_in, dtype=dtype, device=device)
        self.b = torch.zeros(n, S, rank, max(sizes), dtype=dtype, device=device)
        self.ranks = torch.zeros(n, S, dtype=torch.int32, device=device)
        self.scalings = torch.zeros(n, S, dtype=torch.float32, device=device)
        self.activations = torch.zeros(n, S, dtype=torch.int32, device=device)
        self.codes: tuple[int, ...] = ()
        self.loaded: set[int] = set()
        self._held: dict[tuple[int, int], int] = {}  # (slice, slot) -> activation code

    @property
    def rank(self) -> int:
        return self.a.shape[2]

    def set(
        self, i: int, slot: int, down: torch.Tensor, up: torch.Tensor, scaling: float, f: int
    ) -> bool:
        """Slice i of `slot` <- down (r, d_in), up (d_out, r). True when the stack had to grow."""
        rank = down.shape[0]
        grew = rank > self.rank
        if grew:
            self._grow(rank_bucket(rank))
        self.a[i, slot].zero_()
        self.b[i, slot].zero_()
        self.a[i, slot, :rank].copy_(down)  # (r, d_in)
        self.b[i, slot, :rank, : up.shape[0]].copy_(up.t())  # (r, d_out): rank-major
        self.ranks[i, slot], self.scalings[i, slot] = rank, scaling
        self.activations[i, slot] = int(f)
        self._held[(i, slot)] = int(f)
        self.loaded.add(slot)
        self._refresh_codes()
        return grew

    def reset(self, slot: int) -> None:
        self.a[:, slot].zero_()
        self.b[:, slot].zero_()
        self.ranks[:, slot], self.scalings[:, slot], self.activations[:, slot] = 0, 0.0, 0
        self.loaded.discard(slot)
        for key in [k for k in self._held if k[1] == slot]:
            del self._held[key]
        self._refresh_codes()

    def slice(self, i: int) -> DeltaWeights:
        """Slice i alone, as views (the split path of a fused site)."""
        part = slice(i, i + 1)
        return DeltaWeights(self.a[part], self.b[part], self.ranks[part], self.scalings[part],
                            self.activations[part], self.codes)  # fmt: skip

    def _refresh_codes(self) -> None:
        self.codes = tuple(sorted({c for c in self._held.values() if c != Activation.IDENTITY}))

    def _grow(self, rank: int) -> None:
        old_a, old_b = self.a, self.b
        n, S, R, _ = old_a.shape
        self.a = torch.zeros(n, S, rank, self.d_in, dtype=self.dtype, device=self.device)
        self.b = torch.zeros(n, S, rank, old_b.shape[3], dtype=self.dtype, device=self.device)
        self.a[:, :, :R].copy_(old_a)
        self.b[:, :, :R].copy_(old_b)


class VectorStack:
    """IA3: x[t] * vectors[slot_ids[t]]; vectors (S, d), 1.0 wherever no vector is loaded."""

    def __init__(self, num_slots: int, d: int, device: torch.device, dtype: torch.dtype) -> None:
        self.vectors = torch.ones(num_slots, d, dtype=dtype, device=device)
        self.loaded: set[int] = set()

    def set(self, slot: int, vector: torch.Tensor, start: int = 0) -> None:
        self.vectors[slot, start : start + vector.shape[0]].copy_(vector)
        self.loaded.add(slot)

    def reset(self, slot: int) -> None:
        self.vectors[slot].fill_(1.0)
        self.loaded.discard(slot)


class SliceWriter:
    """What a kind's loader writes one target's weights through: slice `index` of a site's
    DeltaStack (or a whole single-target stack), or a column range of a VectorStack."""

    def __init__(self, pool: AdapterPool, stack: DeltaStack | VectorStack, index: int = 0,
                 start: int = 0) -> None:  # fmt: skip
        self.pool, self.stack, self.index, self.start = pool, stack, index, start

    def set(self, slot: int, *weights) -> None:
        if isinstance(self.stack, VectorStack):
            (vector,) = weights
            self.stack.set(slot, vector, self.start)
        elif self.stack.set(self.index, slot, *weights):
            self.pool.structure += 1  # the stack grew: a new rank bucket


class AdapterPool:
    """Slot stacks allocated on first use; `load` / `clear` swap slots in place."""

    def __init__(
        self,
        fingerprint: BaseFingerprint,
        num_slots: int,
        max_rank: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        if num_slots <= 0 or max_rank <= 0:
            raise ValueError(
                f"expected num_slots > 0 and max_rank > 0, got {num_slots} and {max_rank}"
            )
        self.fingerprint, self.num_slots, self.max_rank = fingerprint, num_slots, max_rank
        self.device, self.dtype = torch.device(device), dtype
        self.kinds: list[AdapterKind | None] = [None] * num_slots
        self.names: list[str | None] = [None] * num_slots
        self.post: dict[tuple[int, tuple[str, ...]], DeltaStack] = {}
        self.post_scale: dict[tuple[int, tuple[str, ...]], VectorStack] = {}
        self.series_in: dict[tuple[int, str], DeltaStack] = {}
        self.series_out: dict[tuple[int, str], DeltaStack] = {}
        self.ia3_in: dict[tuple[int, str], VectorStack] = {}
        self.prefix_kv: list[torch.Tensor | None] = [None] * num_slots  # (L, 2, nvt, kvh, d)
        self.prompt_embeddings: list[torch.Tensor | None] = [None] * num_slots  # (nvt, hidden)
        self.structure = 0  # bumped whenever a stack is allocated or grows

    # ---- stacks, allocated on first use ---------------------------------------------------
    def module_stack(self, key: tuple[int, str], placement: str, rank: int = 1) -> SliceWriter:
        """Where a (layer, target) module's low-rank weights go: 'parallel' (LoRA too) -> its
        slice of the site's post stack; 'input' / 'output' -> a series stack."""
        layer, target = key
        if placement == "parallel":
            site = SITE_OF[target]
            stack = self._delta((layer, site), self.post, site, rank)
            return SliceWriter(self, stack, site.index(target))
        table = self.series_in if placement == "input" else self.series_out
        d = adapter_io(self.fingerprint, target, placement)[0]
        stack = table.get(key)
        if stack is None:
            stack = table[key] = self._new_delta((target,), d, (d,), rank)
        return SliceWriter(self, stack)

    def vector_stack(self, key: tuple[int, str], placement: str) -> SliceWriter:
        """Where a (layer, target) IA3 vector goes: its columns of the site's output scale, or
        the target's input scale."""
        layer, target = key
        if placement == "input":
            stack = self.ia3_in.get(key)
            if stack is None:
                d = self.fingerprint.in_out(target)[0]
                stack = self.ia3_in[key] = self._new_vectors(d)
            return SliceWriter(self, stack)
        site = SITE_OF[target]
        sizes = [self.fingerprint.in_out(t)[1] for t in site]
        stack = self.post_scale.get((layer, site))
        if stack is None:
            stack = self.post_scale[(layer, site)] = self._new_vectors(sum(sizes))
        return SliceWriter(self, stack, start=sum(sizes[: site.index(target)]))

    def _delta(self, key, table: dict, site: tuple[str, ...], rank: int) -> DeltaStack:
        stack = table.get(key)
        if stack is None:
            d_in = self.fingerprint.in_out(site[0])[0]
            sizes = tuple(self.fingerprint.in_out(t)[1] for t in site)
            stack = table[key] = self._new_delta(site, d_in, sizes, rank)
        return stack

    def _new_delta(self, targets, d_in: int, sizes, rank: int) -> DeltaStack:
        self.structure += 1
        return DeltaStack(targets, d_in, tuple(sizes), self.num_slots, rank_bucket(rank),
                          self.device, self.dtype)  # fmt: skip

    def _new_vectors(self, d: int) -> VectorStack:
        self.structure += 1
        return VectorStack(self.num_slots, d, self.device, self.dtype)

    def splits(self, layer: int, site: tuple[str, ...]) -> bool:
        """Whether a target of `site` has an input-side stack: the site's matmul is split."""
        return any((layer, t) in self.series_in or (layer, t) in self.ia3_in for t in site)

    # ---- slots -----------------------------------------------------------------------------
    def kind_of(self, slot: int) -> AdapterKind | None:
        """The kind loaded in `slot`, None when it is free."""
        self._check_slot(slot)
        return self.kinds[slot]

    def load(self, slot: int, spec: AdapterSpec) -> None:
        """Copy `spec` into `slot` (replacing what was there) where its kind places it;
        ValueError when it does not fit."""
        self._check_slot(slot)
        kind = kind_for(spec.kind)
        self._check_fits(spec)
        kind.check_fits(spec)
        self.clear(slot)
        kind.load(self, slot, spec)
        self.kinds[slot], self.names[slot] = spec.kind, spec.name

    def clear(self, slot: int) -> None:
        """Empty `slot`: zero ranks and weights, IA3 vectors back to 1.0."""
        self._check_slot(slot)
        for table in (self.post, self.post_scale, self.series_in, self.series_out, self.ia3_in):
            for stack in table.values():
                if slot in stack.loaded:
                    stack.reset(slot)
        self.prefix_kv[slot] = self.prompt_embeddings[slot] = None
        self.kinds[slot] = self.names[slot] = None

    def set_module(
        self, slot: int, key: tuple[int, str], placement: str, down: torch.Tensor,
        up: torch.Tensor, scaling: float, activation: int,
    ) -> None:  # fmt: skip
        """y += scaling * up f(down u) for `slot` at `key` (layer, target): placement "parallel"
        (the `post` stacks: LoRA, parallel bottleneck), "input" or "output" (series)."""
        self.module_stack(key, placement, down.shape[0]).set(slot, down, up, scaling, activation)

    def set_vector(
        self, slot: int, key: tuple[int, str], placement: str, vector: torch.Tensor
    ) -> None:
        """IA3: scale the input ("input") or output ("output") of `key` by `vector` for `slot`."""
        self.vector_stack(key, placement).set(slot, vector)

    def on_device(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """A spec's tensor on the pool's device and dtype (prefix K/V, prompt embeddings)."""
        return None if tensor is None else tensor.to(device=self.device, dtype=self.dtype)

    def _check_slot(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot: expected an int in [0, {self.num_slots}), got {slot!r}")

    def _check_fits(self, spec: AdapterSpec) -> None:
        if spec.fingerprint != self.fingerprint:
            raise ValueError(
                f"adapter {spec.name!r} was validated for base {spec.fingerprint}, "
                f"expected {self.fingerprint}"
            )
        if spec.rank > self.max_rank:
            raise ValueError(
                f"adapter {spec.name!r}: expected rank <= {self.max_rank}, got {spec.rank}"
            )
        for layer, target in spec.modules:
            if not 0 <= layer < self.fingerprint.num_layers or target not in TARGETS:
                raise ValueError(f"adapter {spec.name!r}: no module {layer}.{target} in the base")

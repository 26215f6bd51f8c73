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

Low-rank stacks come per rank class (`DeltaStacks`): an adapter's weights go to the stack of
its rank rounded up to a power of two (at least 8), so a rank-8 LoRA is never computed over a
rank-32 adapter's rows. A stack is allocated the first time an adapter uses it and then kept;
`structure` counts allocations and changes of the activations a stack holds (its `codes`, traced
into a compiled step): the hooks and a compiled step depend on the pool's structure, never on
which slots a batch uses. Rows beyond a slot's rank stay zero (the ops may compute
over them). Memory per post stack: S * R * (in + sum of outs) elements; e.g. SmolLM2-135M, 8
slots, r16 on every target: about 42M fp32 elements (170 MB).

`clear` zeroes a slot everywhere. A spec is loaded by its kind (adapters.kinds, `Kind.load`,
called by the registry: the pool never imports the kinds): `check_fits`, `clear`, then the kind
copies each module's weights into the stack its placement names (`set_module`, `set_vector`),
and `record` notes what the slot holds.
Prefix and prompt adapters act at admission (K/V and embeddings): the pool keeps their tensors
on the device per slot (`prefix_kv`, `prompt_embeddings`).

LoRA on the model-level modules: `head` (lm_head) is a DeltaStacks over the final hidden state
with the vocabulary as its output, applied to the rows whose logits are computed; `embed`
(embed_tokens) is an `EmbeddingDeltas`: per rank class, a table of each slot's A columns per
token id (S, vocab, R) gathered by token, then the usual expand through a DeltaStack whose A is
the identity (so the same add_delta op, reference or Triton, applies B per token's slot).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from adapterserve.adapters.spec import (
    MODEL_TARGETS,
    TARGETS,
    AdapterKind,
    AdapterSpec,
    BaseFingerprint,
    adapter_io,
)
from adapterserve.kernels import Activation, DeltaWeights

SITES = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))  # the model's projections
SITE_OF = {target: site for site in SITES for target in site}
MIN_RANK_BUCKET = 8


def rank_bucket(rank: int) -> int:
    """The rank class that holds `rank`: a power of two, at least MIN_RANK_BUCKET."""
    bucket = MIN_RANK_BUCKET
    while bucket < rank:
        bucket *= 2
    return bucket


class DeltaStack:
    """n slices of slot-stacked low-rank weights at one rank class R (kernels.DeltaWeights):
    slice i adds s[i, slot] * f(u @ a[i, slot].T) @ b[i, slot] to its columns. a (n, S, R, d_in)
    is stored slot-major (a[:, s0:s1] of consecutive slots is one contiguous block, all slices
    of those slots together), b (n, S, R, d_out_max) rank-major; ranks / scalings /
    activations (n, S). Host facts: `codes`, the non-identity activations loaded, and `loaded`,
    the slots holding any slice."""

    def __init__(
        self,
        targets: tuple[str, ...],
        d_in: int,
        sizes: tuple[int, ...],
        num_slots: int,
        rank: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.targets, self.d_in, self.sizes = targets, d_in, sizes
        self.offsets = tuple(sum(sizes[:i]) for i in range(len(sizes)))
        n, S = len(targets), num_slots
        slot_major = torch.zeros(S, n, rank, d_in, dtype=dtype, device=device)
        self.a = slot_major.permute(1, 0, 2, 3)  # (n, S, R, d_in) view
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
    ) -> None:
        """Slice i of `slot` <- down (r, d_in), up (d_out, r), r <= R."""
        rank = down.shape[0]
        assert rank <= self.rank, f"rank {rank} in a rank-{self.rank} stack"
        self.a[i, slot].zero_()
        self.b[i, slot].zero_()
        self.a[i, slot, :rank].copy_(down)  # (r, d_in)
        self.b[i, slot, :rank, : up.shape[0]].copy_(up.t())  # (r, d_out): rank-major
        self.ranks[i, slot], self.scalings[i, slot] = rank, scaling
        self.activations[i, slot] = int(f)
        self._held[(i, slot)] = int(f)
        self.loaded.add(slot)
        self._refresh_codes()

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
        return DeltaWeights(
            self.a[part],
            self.b[part],
            self.ranks[part],
            self.scalings[part],
            self.activations[part],
            self.codes,
            self.loaded,
        )

    def _refresh_codes(self) -> None:
        self.codes = tuple(sorted({c for c in self._held.values() if c != Activation.IDENTITY}))


class DeltaStacks:
    """One site's (or target's) DeltaStacks, one per rank class: an adapter's weights go to the
    class of its rank (rank 12 -> the rank-16 stack), so no op computes over a larger adapter's
    rows. Classes are allocated on first use and kept."""

    def __init__(
        self, pool: AdapterPool, targets: tuple[str, ...], d_in: int, sizes: tuple[int, ...]
    ) -> None:
        self.pool, self.targets, self.d_in, self.sizes = pool, targets, d_in, sizes
        self.classes: dict[int, DeltaStack] = {}

    def set(
        self, i: int, slot: int, down: torch.Tensor, up: torch.Tensor, scaling: float, f: int
    ) -> None:
        bucket = rank_bucket(down.shape[0])
        stack = self.classes.get(bucket)
        if stack is None:
            pool = self.pool
            stack = DeltaStack(
                self.targets, self.d_in, self.sizes, pool.num_slots, bucket, pool.device, pool.dtype
            )
            self.classes = dict(sorted({**self.classes, bucket: stack}.items()))
            pool.structure += 1
        codes = stack.codes
        stack.set(i, slot, down, up, scaling, f)
        self._structure_follows(stack, codes)

    def reset(self, slot: int) -> None:
        for stack in self.classes.values():
            if slot in stack.loaded:
                codes = stack.codes
                stack.reset(slot)
                self._structure_follows(stack, codes)

    def _structure_follows(self, stack: DeltaStack, codes_before: tuple[int, ...]) -> None:
        """A stack's `codes` are traced into a compiled step (whether and which activations
        run: the Triton kernels' HAS_ACTIVATION, the reference's `activate`), so a change of
        them is a change of structure: a CUDA graph captured before must not be replayed."""
        if stack.codes != codes_before:
            self.pool.structure += 1

    @property
    def loaded(self) -> set[int]:
        return set().union(*(stack.loaded for stack in self.classes.values()))

    def stacks(self) -> tuple[DeltaStack, ...]:
        return tuple(self.classes.values())


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


class EmbeddingDeltas:
    """LoRA on the token embeddings: delta[t] = s * B[slot] @ A[slot][:, token_t]. Per rank class R
    (allocated on first use, as DeltaStacks): `rows` (S, vocab, R), the slot's A transposed (what
    a token gathers), and a DeltaStack of d_in R whose A is the identity and whose B is the
    slot's B: add_delta(x, rows[slot_ids, token_ids], stack) is the delta."""

    def __init__(self, pool: AdapterPool, vocab: int, hidden: int) -> None:
        self.pool, self.vocab, self.hidden = pool, vocab, hidden
        self.classes: dict[int, tuple[torch.Tensor, DeltaStack]] = {}

    def set(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """a (r, vocab), b (hidden, r)."""
        rank = a.shape[0]
        bucket = rank_bucket(rank)
        if bucket not in self.classes:
            pool = self.pool
            rows = torch.zeros(
                pool.num_slots, self.vocab, bucket, dtype=pool.dtype, device=pool.device
            )
            stack = DeltaStack(
                ("embed_tokens",),
                bucket,
                (self.hidden,),
                pool.num_slots,
                bucket,
                pool.device,
                pool.dtype,
            )
            self.classes = dict(sorted({**self.classes, bucket: (rows, stack)}.items()))
            pool.structure += 1
        rows, stack = self.classes[bucket]
        rows[slot].zero_()
        rows[slot, :, :rank].copy_(a.t())
        stack.set(0, slot, torch.eye(rank, bucket), b, scaling, Activation.IDENTITY)

    def reset(self, slot: int) -> None:
        for rows, stack in self.classes.values():
            if slot in stack.loaded:
                rows[slot].zero_()
                stack.reset(slot)

    @property
    def loaded(self) -> set[int]:
        return set().union(*(stack.loaded for _, stack in self.classes.values()))


class SliceWriter:
    """What a kind's loader writes one target's weights through: slice `index` of a site's
    DeltaStack (or a whole single-target stack), or a column range of a VectorStack."""

    def __init__(
        self, pool: AdapterPool, stack: DeltaStacks | VectorStack, index: int = 0, start: int = 0
    ) -> None:
        self.pool, self.stack, self.index, self.start = pool, stack, index, start

    def set(self, slot: int, *weights) -> None:
        if isinstance(self.stack, VectorStack):
            (vector,) = weights
            self.stack.set(slot, vector, self.start)
        else:
            self.stack.set(self.index, slot, *weights)


class AdapterPool:
    """Slot stacks allocated on first use; a kind's `load` and `clear` swap slots in place."""

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
        self.post: dict[tuple[int, tuple[str, ...]], DeltaStacks] = {}
        self.post_scale: dict[tuple[int, tuple[str, ...]], VectorStack] = {}
        self.series_in: dict[tuple[int, str], DeltaStacks] = {}
        self.series_out: dict[tuple[int, str], DeltaStacks] = {}
        self.ia3_in: dict[tuple[int, str], VectorStack] = {}
        self.prefix_kv: list[torch.Tensor | None] = [None] * num_slots  # (L, 2, nvt, kvh, d)
        self.prompt_embeddings: list[torch.Tensor | None] = [None] * num_slots  # (nvt, hidden)
        self.embed: EmbeddingDeltas | None = None  # LoRA on embed_tokens
        self.head: DeltaStacks | None = None  # LoRA on lm_head
        # bumped whenever a stack (or a stack's rank class) is allocated, and whenever the
        # activations a stack holds (its `codes`) change
        self.structure = 0
        # the base model's float weight of (layer, target), for what adapters derive from it
        # (DoRA's norms); set by the server, which owns the model
        self.base_weight: Callable[[int, str], torch.Tensor] | None = None

    # ---- stacks, allocated on first use ---------------------------------------------------
    def module_stack(self, key: tuple[int, str], placement: str) -> SliceWriter:
        """Where a (layer, target) module's low-rank weights go: 'parallel' (LoRA too) -> its
        slice of the site's post stacks; 'input' / 'output' -> series stacks."""
        layer, target = key
        if placement == "parallel":
            site = SITE_OF[target]
            stacks = self.post.get((layer, site))
            if stacks is None:
                d_in = self.fingerprint.in_out(site[0])[0]
                sizes = tuple(self.fingerprint.in_out(t)[1] for t in site)
                stacks = self.post[(layer, site)] = self._new_deltas(site, d_in, sizes)
            return SliceWriter(self, stacks, site.index(target))
        table = self.series_in if placement == "input" else self.series_out
        stacks = table.get(key)
        if stacks is None:
            d = adapter_io(self.fingerprint, target, placement)[0]
            stacks = table[key] = self._new_deltas((target,), d, (d,))
        return SliceWriter(self, stacks)

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

    def set_model_lora(
        self, slot: int, target: str, a: torch.Tensor, b: torch.Tensor, scaling: float
    ) -> None:
        """LoRA on a model-level module for `slot` (adapters.spec.AdapterSpec.model_modules)."""
        hidden, vocab = self.fingerprint.hidden_size, self.fingerprint.vocab_size
        if target == "embed_tokens":
            if self.embed is None:
                self.embed = EmbeddingDeltas(self, vocab, hidden)
                self.structure += 1
            self.embed.set(slot, a, b, scaling)
        elif target == "lm_head":
            if self.head is None:
                self.head = self._new_deltas(("lm_head",), hidden, (vocab,))
            self.head.set(0, slot, a, b, scaling, Activation.IDENTITY)
        else:
            raise ValueError(f"no model-level module {target!r}")

    def _new_deltas(self, targets, d_in: int, sizes) -> DeltaStacks:
        self.structure += 1
        return DeltaStacks(self, targets, d_in, tuple(sizes))

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

    def check_fits(self, slot: int, spec: AdapterSpec) -> None:
        """ValueError, before a kind's `load` touches `slot`, when the slot is not one of the
        pool's or the spec does not fit it (another base, a rank above max_rank, a module the
        base lacks)."""
        self._check_slot(slot)
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
        for target in spec.model_modules:
            if target not in MODEL_TARGETS:
                raise ValueError(f"adapter {spec.name!r}: no module {target} in the base")

    def record(self, slot: int, spec: AdapterSpec) -> None:
        """Note that `slot` holds `spec`, once its kind has placed the weights."""
        self._check_slot(slot)
        self.kinds[slot], self.names[slot] = spec.kind, spec.name

    def clear(self, slot: int) -> None:
        """Empty `slot`: zero ranks and weights, IA3 vectors back to 1.0."""
        self._check_slot(slot)
        for table in (self.post, self.post_scale, self.series_in, self.series_out, self.ia3_in):
            for stack in table.values():
                if slot in stack.loaded:
                    stack.reset(slot)
        for model_stack in (self.embed, self.head):
            if model_stack is not None and slot in model_stack.loaded:
                model_stack.reset(slot)
        self.prefix_kv[slot] = self.prompt_embeddings[slot] = None
        self.kinds[slot] = self.names[slot] = None

    def set_module(
        self,
        slot: int,
        key: tuple[int, str],
        placement: str,
        down: torch.Tensor,
        up: torch.Tensor,
        scaling: float,
        activation: int,
    ) -> None:
        """y += scaling * up f(down u) for `slot` at `key` (layer, target): placement "parallel"
        (the `post` stacks: LoRA, parallel bottleneck), "input" or "output" (series)."""
        self.module_stack(key, placement).set(slot, down, up, scaling, activation)

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

"""The slot pool: every adapter's weights stacked per (layer, target) on the device.

Hot-swap is a copy into a slot, never a reallocation (vLLM's `set` / `reset` per slot): all
stacks are allocated once, and a request's tokens carry the slot index (-1 = base model) that
the kernels gather by.

Stacks per (layer, target), S = num_slots, r = max_rank, (in, out) = the base linear's shape:
- `post`: LoRA and parallel bottleneck share one `ModuleStack` A (S, r, in), B (S, out, r):
  both are y += s * B f(A x) on the linear's input, LoRA being f = identity. One slot holds
  one adapter, so a slot is either LoRA or parallel on it.
- `series_in` (gate, up): series bottleneck on the input side (in -> in); `series_out`
  (down): series bottleneck on the output side (out -> out).
- `ia3_in` / `ia3_out`: IA3 vectors (S, in) / (S, out), 1.0 where no IA3 adapter is loaded.
Memory: S * r * (in + out) elements per post stack, S * r * 2d per series stack, S * (in + out)
for IA3; e.g. SmolLM2-135M (30 layers, hidden 576, kv 192, intermediate 1536) with S = 8,
r = 16 on every target: 52M elements, about 210 MB in fp32 (105 MB in bf16). A stack is
allocated the first time an adapter uses its (layer, target, placement) and then kept, so
memory follows what the served adapters touch and later loads never reallocate.

The post stacks of the model's fused projections (q|k|v, gate|up) are one `PostGroup` per
layer, allocated together the first time any of them is used (their member stacks are views),
so that one adapter op covers the fused output. The cost: members that no adapter uses still
take their memory, and B is padded to the widest member (k and v to q's width under GQA).

Rows beyond a slot's rank are kept zero (the reference ops compute on them); `clear` zeroes a
slot everywhere, `load` clears, then the spec's kind (adapters.kinds) copies each module's
weights into the stack its placement names (`set_module`, `set_vector`). Prefix and prompt
adapters act at admission (K/V and embeddings): the pool keeps their tensors on the device per
slot (`prefix_kv`, `prompt_embeddings`) for the engine to place into a sequence's cache or batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adapters.kinds import kind_for
from adapters.spec import TARGETS, AdapterKind, AdapterSpec, BaseFingerprint, adapter_io
from kernels import Activation

FUSED_GROUPS = (("q", "k", "v"), ("gate", "up"))  # the model's fused projections, column order
GROUP_OF = {target: group for group in FUSED_GROUPS for target in group}


@dataclass(eq=False)
class ModuleStack:
    """y += scalings[s] * B[s] f_s(A[s] u) for the tokens of slot s; A (S, r, d_in), B (S, d_out, r)."""

    a: torch.Tensor  # (S, r_max, d_in)
    b: torch.Tensor  # (S, d_out, r_max)
    ranks: torch.Tensor  # (S,) int32, 0 = nothing loaded for this module
    scalings: torch.Tensor  # (S,) fp32
    activations: torch.Tensor  # (S,) int32 Activation codes
    loaded: set[int] = field(default_factory=set)  # slots with rank > 0 here
    nonlinear: set[int] = field(default_factory=set)  # loaded slots with f != identity
    group: PostGroup | None = None  # the fused projection's joint stack this one is a view of
    # (rank, scaling, activation) per loaded slot, a host copy (PostGroup reads it, no syncs)
    settings: dict[int, tuple[int, float, int]] = field(default_factory=dict)

    @classmethod
    def empty(cls, slots: int, r_max: int, d_in: int, d_out: int, device, dtype) -> ModuleStack:
        def zeros(*shape, dtype=dtype):
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(
            a=zeros(slots, r_max, d_in),
            b=zeros(slots, d_out, r_max),
            ranks=zeros(slots, dtype=torch.int32),
            scalings=zeros(slots, dtype=torch.float32),
            activations=zeros(slots, dtype=torch.int32),
        )

    def set(self, slot: int, down: torch.Tensor, up: torch.Tensor, scaling: float, f: int) -> None:
        rank = down.shape[0]
        self.a[slot, :rank].copy_(down)  # (r, d_in)
        self.b[slot, :, :rank].copy_(up)  # (d_out, r)
        self.ranks[slot], self.scalings[slot], self.activations[slot] = rank, scaling, int(f)
        self.loaded.add(slot)
        if f != Activation.IDENTITY:
            self.nonlinear.add(slot)
        self.settings[slot] = (rank, float(scaling), int(f))
        if self.group is not None:
            self.group.refresh(slot)

    def reset(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.ranks[slot], self.scalings[slot], self.activations[slot] = 0, 0.0, 0
        self.loaded.discard(slot)
        self.nonlinear.discard(slot)
        self.settings.pop(slot, None)
        if self.group is not None:
            self.group.refresh(slot)


@dataclass(eq=False)
class PostGroup:
    """The `post` stacks of a fused projection (q|k|v or gate|up) in one allocation, so that one
    adapter op (n slices in one launch) serves them all: A (n, S, r, in), B (n, S, out_max, r)
    with member i's B rows beyond its out size kept zero. Each member's ModuleStack is a view.

    Shared per slot: `ranks` = the largest rank over the members (a member's rows beyond its own
    rank are zero, so the extra columns add nothing), `scalings` and `activations` = the
    members' common values. A slot whose members differ in scaling or activation (rank or alpha
    patterns) is `mixed`: batches using it go member by member."""

    targets: tuple[str, ...]
    sizes: tuple[int, ...]  # each member's out features, in the fused output's column order
    a: torch.Tensor  # (n, S, r_max, in)
    b: torch.Tensor  # (n, S, out_max, r_max)
    ranks: torch.Tensor  # (S,) int32
    scalings: torch.Tensor  # (S,) fp32
    activations: torch.Tensor  # (S,) int32
    members: dict[str, ModuleStack] = field(default_factory=dict)
    loaded: set[int] = field(default_factory=set)  # slots loaded in any member
    nonlinear: set[int] = field(default_factory=set)
    mixed: set[int] = field(default_factory=set)

    @classmethod
    def empty(
        cls, targets: tuple[str, ...], slots: int, r_max: int, d_in: int, sizes: tuple[int, ...],
        device, dtype,
    ) -> PostGroup:  # fmt: skip
        n, out_max = len(targets), max(sizes)
        a = torch.zeros(n, slots, r_max, d_in, dtype=dtype, device=device)
        b = torch.zeros(n, slots, out_max, r_max, dtype=dtype, device=device)
        group = cls(
            targets, sizes, a, b,
            ranks=torch.zeros(slots, dtype=torch.int32, device=device),
            scalings=torch.zeros(slots, dtype=torch.float32, device=device),
            activations=torch.zeros(slots, dtype=torch.int32, device=device),
        )  # fmt: skip
        for i, (target, size) in enumerate(zip(targets, sizes, strict=True)):
            group.members[target] = ModuleStack(
                a=a[i], b=b[i, :, :size],
                ranks=torch.zeros(slots, dtype=torch.int32, device=device),
                scalings=torch.zeros(slots, dtype=torch.float32, device=device),
                activations=torch.zeros(slots, dtype=torch.int32, device=device),
                group=group,
            )  # fmt: skip
        return group

    def refresh(self, slot: int) -> None:
        """Recompute the slot's shared rank / scaling / activation from its members."""
        found = [m.settings[slot] for m in self.members.values() if slot in m.settings]
        for where in (self.loaded, self.nonlinear, self.mixed):
            where.discard(slot)
        if not found:
            self.ranks[slot], self.scalings[slot], self.activations[slot] = 0, 0.0, 0
            return
        rank = max(r for r, _, _ in found)
        scaling, f = found[0][1], found[0][2]
        self.ranks[slot], self.scalings[slot], self.activations[slot] = rank, scaling, f
        self.loaded.add(slot)
        if f != Activation.IDENTITY:
            self.nonlinear.add(slot)
        if any((s, g) != (scaling, f) for _, s, g in found):
            self.mixed.add(slot)


@dataclass(eq=False)
class VectorStack:
    """IA3: x[t] * vectors[slot_ids[t]]; vectors (S, d), 1.0 for slots without IA3 here."""

    vectors: torch.Tensor  # (S, d)
    loaded: set[int] = field(default_factory=set)

    def set(self, slot: int, vector: torch.Tensor) -> None:
        self.vectors[slot].copy_(vector)
        self.loaded.add(slot)

    def reset(self, slot: int) -> None:
        self.vectors[slot].fill_(1.0)
        self.loaded.discard(slot)


class AdapterPool:
    """Preallocated slot stacks for every (layer, target); `load` / `clear` swap slots in place."""

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
        self.post: dict[tuple[int, str], ModuleStack] = {}
        self.post_groups: dict[tuple[int, tuple[str, ...]], PostGroup] = {}  # (layer, targets)
        self.series_in: dict[tuple[int, str], ModuleStack] = {}
        self.series_out: dict[tuple[int, str], ModuleStack] = {}
        self.ia3_in: dict[tuple[int, str], VectorStack] = {}
        self.ia3_out: dict[tuple[int, str], VectorStack] = {}
        self.prefix_kv: list[torch.Tensor | None] = [None] * num_slots  # (L, 2, nvt, kvh, d)
        self.prompt_embeddings: list[torch.Tensor | None] = [None] * num_slots  # (nvt, hidden)

    def _module_stack(self, key: tuple[int, str], placement: str) -> ModuleStack:
        """The stack for `placement` (parallel = post, input, output) at key, allocated once."""
        stacks = {"parallel": self.post, "input": self.series_in, "output": self.series_out}
        found = stacks[placement].get(key)
        if found is None and placement == "parallel" and key[1] in GROUP_OF:
            targets = GROUP_OF[key[1]]
            sizes = tuple(self.fingerprint.in_out(t)[1] for t in targets)
            d_in = self.fingerprint.in_out(key[1])[0]
            group = PostGroup.empty(targets, self.num_slots, self.max_rank, d_in, sizes,
                                    self.device, self.dtype)  # fmt: skip
            self.post_groups[(key[0], targets)] = group
            for target, member in group.members.items():
                self.post[(key[0], target)] = member
            found = group.members[key[1]]
        if found is None:
            if placement == "parallel":
                d_in, d_out = self.fingerprint.in_out(key[1])
            else:
                d_in = d_out = adapter_io(self.fingerprint, key[1], placement)[0]
            found = ModuleStack.empty(
                self.num_slots, self.max_rank, d_in, d_out, self.device, self.dtype
            )
            stacks[placement][key] = found
        return found

    def _vector_stack(self, key: tuple[int, str], placement: str) -> VectorStack:
        stacks = self.ia3_in if placement == "input" else self.ia3_out
        found = stacks.get(key)
        if found is None:
            d_in, d_out = self.fingerprint.in_out(key[1])
            d = d_in if placement == "input" else d_out
            found = VectorStack(torch.ones(self.num_slots, d, dtype=self.dtype, device=self.device))
            stacks[key] = found
        return found

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
        for stacks in (self.post, self.series_in, self.series_out, self.ia3_in, self.ia3_out):
            for stack in stacks.values():
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
        self._module_stack(key, placement).set(slot, down, up, scaling, activation)

    def set_vector(
        self, slot: int, key: tuple[int, str], placement: str, vector: torch.Tensor
    ) -> None:
        """IA3: scale the input ("input") or output ("output") of `key` by `vector` for `slot`."""
        self._vector_stack(key, placement).set(slot, vector)

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

"""The interface of an adapter kind, and the per-request state it hands the engine.

A `Kind` owns everything that differs between adapter kinds, in the order an adapter meets it:
1. `parse`: the config and tensors of an adapter directory (read once, by
   adapters.formats.load_adapter) -> a validated `AdapterSpec`;
2. `load`: the spec's weights -> a slot of the `AdapterPool`, in the stacks where they act
   (`place`); the registry calls it, so the pool never imports the kinds;
3. `bind`: a request that holds the adapter's slot -> a `Binding` (what its tokens carry);
4. `admit`: at the request's (re)admission, its `Binding` -> the sequence's KV cache (prefix
   tuning's virtual K/V; nothing for the others).
The kinds that act at the model's hook points (LoRA, bottlenecks, IA3) share `bind` and `place`
here; prefix and prompt tuning override them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from adapterserve.adapters.spec import (
    TARGETS,
    AdapterKind,
    AdapterSpec,
    BaseFingerprint,
    refuse_options,
)

if TYPE_CHECKING:
    from adapterserve.adapters.pool import AdapterPool

__all__ = ["AdapterFiles", "Binding", "KVCacheWriter", "Kind", "NOT_SERVED"]

# Why an option is refused, for the options several kinds share (field -> why).
NOT_SERVED = MappingProxyType(
    {
        "modules_to_save": (
            "full trained copies of base modules (an lm_head or embedding of vocab x hidden per "
            "adapter) are not served per request; LoRA on embed_tokens / lm_head is"
        ),
        "fan_in_fan_out": "only Linear (out, in) weight layouts are served",
    }
)


class KVCacheWriter(Protocol):
    """What an admission step writes into (server.model.llama.KVCache; adapters never import
    server)."""

    def write_all_layers(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """kv (L, 2, n, kvh, d) -> flat cache `slots` (n,) of every layer."""
        ...


@dataclass(frozen=True, eq=False)
class Binding:
    """A request's view of its adapter's slot, from `Kind.bind`.

    slot_id: the per-token pool slot the hook points apply (LoRA, series, parallel, IA3); -1 none.
    num_virtual: virtual tokens the request's prompt starts with (prefix and prompt tuning).
    prefix_kv: (L, 2, num_virtual, kvh, d) K/V written into the cache at admission (prefix).
    virtual_embeds: (num_virtual, dim) embeddings of the virtual positions (prompt tuning).
    """

    slot_id: int = -1
    num_virtual: int = 0
    prefix_kv: torch.Tensor | None = None
    virtual_embeds: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class AdapterFiles:
    """One adapter as read from its directory, and the limits it must fit."""

    config: Mapping[str, Any]  # adapter_config.json
    tensors: Mapping[str, torch.Tensor]  # adapter_model.safetensors, on the CPU
    name: str
    fingerprint: BaseFingerprint
    max_rank: int
    # the base model's float weight (out, in) of (layer, target), dequantized if need be: what
    # DoRA's norms are taken of; None where no model is at hand (offline validation)
    base_weight: Callable[[int, str], torch.Tensor] | None = None


class Kind(ABC):
    """The behaviour of one `AdapterKind`; a stateless singleton in adapters.kinds.KINDS."""

    kind: ClassVar[AdapterKind]
    peft_type: ClassVar[str]  # the config's peft_type (upper case) this kind parses
    # config options refused when set (field -> why), in the order they are checked
    unsupported: ClassVar[Mapping[str, str]] = MappingProxyType(
        {"modules_to_save": NOT_SERVED["modules_to_save"]}
    )
    weights: ClassVar[type | None] = None  # its modules' weights class; None: acts at admission

    def selects(self, config: Mapping[str, Any]) -> bool:
        """Whether a config of this kind's peft_type is this kind (BOTTLENECK: series or
        parallel)."""
        return True

    @property
    def uses_slot_ids(self) -> bool:
        """Whether it acts through the hook points (vs. at admission)."""
        return self.weights is not None

    # ---- parse ---------------------------------------------------------------------------
    def parse(self, files: AdapterFiles) -> AdapterSpec:
        """The validated spec; AdapterFormatError names the config field or tensor at fault."""
        refuse_options(files.config, self.unsupported)
        return self.read(files)

    @abstractmethod
    def read(self, files: AdapterFiles) -> AdapterSpec:
        """`parse` once the unsupported options are refused."""

    def module_spec(self, files: AdapterFiles, modules: dict, rank: int) -> AdapterSpec:
        """A spec of per-(layer, target) weights; targets in TARGETS order."""
        return AdapterSpec(
            name=files.name,
            kind=self.kind,
            fingerprint=files.fingerprint,
            rank=rank,
            targets=tuple(t for t in TARGETS if any(key[1] == t for key in modules)),
            modules=MappingProxyType(modules),
        )

    # ---- pool ------------------------------------------------------------------------------
    def check_fits(self, spec: AdapterSpec) -> None:
        """ValueError, before the pool touches a slot, for weights this kind does not load."""
        for (layer, target), weights in spec.modules.items():
            if self.weights is None or not isinstance(weights, self.weights):
                raise ValueError(f"{layer}.{target}: unsupported module weights {type(weights)}")

    def load(self, pool: AdapterPool, slot: int, spec: AdapterSpec) -> None:
        """Copy `spec` into `slot` of `pool`, replacing what was there; ValueError, before the
        slot is touched, when the spec does not fit the pool or is not of this kind."""
        pool.check_fits(slot, spec)
        if spec.kind != self.kind:
            raise ValueError(
                f"adapter {spec.name!r}: expected a {self.kind.value} spec, got {spec.kind.value}"
            )
        self.check_fits(spec)
        pool.clear(slot)
        self.place(pool, slot, spec)
        pool.record(slot, spec)

    def place(self, pool: AdapterPool, slot: int, spec: AdapterSpec) -> None:
        """Copy the spec's weights into `slot` (cleared) of the pool stacks they act in."""
        for key, weights in spec.modules.items():
            self.load_module(pool, slot, key, weights)

    def load_module(self, pool: AdapterPool, slot: int, key: tuple[int, str], weights) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no per-module weights")

    # ---- requests --------------------------------------------------------------------------
    def bind(self, pool: AdapterPool, slot: int, num_virtual: int) -> Binding:
        """A request holding `slot`: its tokens carry the slot id to the hook points."""
        return Binding(slot_id=slot, num_virtual=num_virtual)

    def admit(self, binding: Binding, cache: KVCacheWriter, slots: torch.Tensor) -> None:
        """At (re)admission, with `slots` (num_virtual,) the sequence's first flat cache slots
        (already allocated): nothing, but for kinds that place state in the cache."""
        return None

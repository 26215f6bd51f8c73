"""Adapter kinds: one class per kind owns its parse, pool placement, binding and admission step
(adapters.kinds.base.Kind). Adding a kind is one new file here plus one line in KINDS (and its
name in adapters.spec.AdapterKind, the names the API shows).

Which kind an adapter is follows from its adapter_config.json: `peft_type` picks the kinds
that parse it, and each one's `selects(config)` decides among them (LLM-Adapters' BOTTLENECK is
parallel when use_parallel_adapter is set, else series).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from adapterserve.adapters.kinds.base import AdapterFiles, Binding, Kind, KVCacheWriter
from adapterserve.adapters.kinds.ia3 import IA3
from adapterserve.adapters.kinds.lora import Lora
from adapterserve.adapters.kinds.parallel import ParallelBottleneck
from adapterserve.adapters.kinds.prefix import PrefixTuning
from adapterserve.adapters.kinds.prompt import PromptTuning
from adapterserve.adapters.kinds.series import SeriesBottleneck
from adapterserve.adapters.spec import AdapterFormatError, AdapterKind

__all__ = [
    "KINDS",
    "AdapterFiles",
    "Binding",
    "Kind",
    "KVCacheWriter",
    "kind_for",
    "kind_for_config",
]

# The registration table: one line per kind.
KINDS: tuple[Kind, ...] = (
    Lora(),
    SeriesBottleneck(),
    ParallelBottleneck(),
    PrefixTuning(),
    PromptTuning(),
    IA3(),
)
BY_KIND: Mapping[AdapterKind, Kind] = MappingProxyType({kind.kind: kind for kind in KINDS})
PEFT_TYPES = tuple(sorted({kind.peft_type for kind in KINDS}))


def kind_for(kind: AdapterKind) -> Kind:
    """The behaviour of `kind` (a spec's, a pool slot's, a registry entry's)."""
    return BY_KIND[kind]


def kind_for_config(config: Mapping[str, Any]) -> Kind:
    """The kind that parses an adapter with this adapter_config.json; AdapterFormatError naming
    the accepted peft_types for any other."""
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() not in PEFT_TYPES:
        raise AdapterFormatError(
            "peft_type", f"peft_type: expected one of {list(PEFT_TYPES)}, got {peft_type!r}"
        )
    chosen = [k for k in KINDS if k.peft_type == peft_type.upper() and k.selects(config)]
    assert len(chosen) == 1, f"{peft_type}: {len(chosen)} kinds select this config"
    return chosen[0]

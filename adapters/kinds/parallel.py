"""Parallel bottleneck (LLM-Adapters BOTTLENECK, use_parallel_adapter true) on any target,
LLM-Adapters' "parallel_adapter": y = W x + s * U f(D x), in the pool's `post` stacks beside
LoRA (d_in = the linear's in, d_out = its out).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from adapterserve.adapters.kinds.bottleneck import Bottleneck, uses_parallel_adapter
from adapterserve.adapters.spec import TARGETS, AdapterKind


class ParallelBottleneck(Bottleneck):
    kind = AdapterKind.PARALLEL
    placements = MappingProxyType(dict.fromkeys(TARGETS, "parallel"))
    misplaced = "parallel adapters sit on q/k/v/o/gate/up/down projections; got {target}_proj"

    def selects(self, config: Mapping[str, Any]) -> bool:
        return uses_parallel_adapter(config)

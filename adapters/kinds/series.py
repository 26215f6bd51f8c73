"""Series bottleneck (LLM-Adapters BOTTLENECK, use_parallel_adapter false), by target as
LLM-Adapters maps Llama's modules:
- gate_proj, up_proj -> "mh_adapter", the input side: y = W (x + s * U f(D x)), the pool's
  `series_in` stacks (d_in = d_out = the linear's in);
- down_proj -> "output_adapter", the output side: z = W x, y = z + s * U f(D z), the pool's
  `series_out` stacks (d_in = d_out = the linear's out).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from adapterserve.adapters.kinds.bottleneck import Bottleneck, uses_parallel_adapter
from adapterserve.adapters.spec import AdapterKind

SERIES_PLACEMENT = MappingProxyType({"gate": "input", "up": "input", "down": "output"})


class SeriesBottleneck(Bottleneck):
    kind = AdapterKind.SERIES
    placements = SERIES_PLACEMENT
    misplaced = (
        "series adapters sit on gate_proj/up_proj/down_proj only (LLM-Adapters' Llama "
        "mapping); got {target}_proj (use_parallel_adapter is false)"
    )

    def selects(self, config: Mapping[str, Any]) -> bool:
        return not uses_parallel_adapter(config)

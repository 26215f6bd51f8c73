"""PEFT IA3 (peft_type IA3): one learned vector `ia3_l` per targeted linear; the pool's `ia3_in` /
`ia3_out` vector stacks.

From peft 0.21 (tuners/ia3/layer.py, model.py): a module in `feedforward_modules` (list: the
module name ends with one; str: re.fullmatch, here with RE2 under the bounds of
adapters.formats.patterns) scales its input, ia3_l (1, in), y = W(l * x);
any other target scales its output, ia3_l (out, 1), y = l * (W x). For Llama PEFT targets
k_proj, v_proj (output) and down_proj (feedforward, input). Flat (features,) vectors are
accepted too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from adapterserve.adapters.formats.modules import ModuleLayout, group_modules
from adapterserve.adapters.formats.patterns import MAX_PATTERN_KEYS, compile_pattern
from adapterserve.adapters.kinds.base import NOT_SERVED, AdapterFiles, Kind
from adapterserve.adapters.spec import (
    AdapterFormatError,
    AdapterKind,
    AdapterSpec,
    IA3Weights,
    check_tensor,
)

if TYPE_CHECKING:
    from adapterserve.adapters.pool import AdapterPool

LAYOUT = ModuleLayout(
    weight=re.compile(r"(?P<name>ia3_l)(?:\.[A-Za-z0-9_-]+)?"),
    names=("ia3_l",),
    unexpected=lambda key: f"tensor {key!r}: expected only ia3_l vectors of q..down projections",
    empty="expected ia3_l vectors, got none",
)


class IA3(Kind):
    kind = AdapterKind.IA3
    peft_type = "IA3"
    unsupported = NOT_SERVED
    weights = IA3Weights

    def read(self, files: AdapterFiles) -> AdapterSpec:
        is_feedforward = feedforward_rule(files.config.get("feedforward_modules"))
        modules = {}
        grouped = group_modules(files.tensors, files.fingerprint, LAYOUT)
        for (layer, target), found in grouped.items():
            key, is_input = found.keys["ia3_l"], is_feedforward(found.module)
            in_features, out_features = files.fingerprint.in_out(target)
            tensor = files.tensors[key]
            shape = (1, in_features) if is_input else (out_features, 1)
            vector = check_tensor(
                key, tensor, shape if tensor.dim() == 2 else (shape[0] * shape[1],)
            )
            modules[layer, target] = IA3Weights(vector.flatten(), "input" if is_input else "output")
        return self.module_spec(files, modules, rank=0)

    def load_module(
        self, pool: AdapterPool, slot: int, key: tuple[int, str], weights: IA3Weights
    ) -> None:
        pool.set_vector(slot, key, weights.placement, weights.vector)


def feedforward_rule(feedforward: object) -> Callable[[str], bool]:
    """Mirror of peft's IA3Model._check_target_module_feedforward, as a test of a module name."""
    if feedforward is None:  # PEFT's Llama default
        feedforward = ["down_proj"]
    if isinstance(feedforward, str):
        regex = compile_pattern("feedforward_modules", feedforward)
        return lambda module: regex.fullmatch(module) is not None
    if not isinstance(feedforward, list) or not all(isinstance(f, str) for f in feedforward):
        raise AdapterFormatError(
            "feedforward_modules",
            f"feedforward_modules: expected a list of names or a regex, got {feedforward!r:.80}",
        )
    if len(feedforward) > MAX_PATTERN_KEYS:  # each name is tried on every module
        raise AdapterFormatError(
            "feedforward_modules",
            f"feedforward_modules: expected at most {MAX_PATTERN_KEYS} names, "
            f"got {len(feedforward)}",
        )
    return lambda module: any(module.endswith(f) for f in feedforward)

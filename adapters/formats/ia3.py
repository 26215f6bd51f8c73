"""PEFT IA3 (peft_type IA3): one learned vector `ia3_l` per targeted linear.

From peft 0.21 (tuners/ia3/layer.py, model.py): a module in `feedforward_modules` (list: the
module name ends with one; str: re.fullmatch, here with RE2 under the bounds of
adapters.formats.patterns) scales its input, ia3_l (1, in), y = W(l * x);
any other target scales its output, ia3_l (out, 1), y = l * (W x). For Llama PEFT targets
k_proj, v_proj (output) and down_proj (feedforward, input). Flat (features,) vectors are
accepted too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch

from adapters.formats.patterns import MAX_PATTERN_KEYS, compile_pattern
from adapters.spec import (
    TARGETS,
    AdapterFormatError,
    AdapterKind,
    AdapterSpec,
    BaseFingerprint,
    IA3Weights,
    check_tensor,
    parse_module_key,
    refuse_options,
)

UNSUPPORTED = {
    "modules_to_save": "full copies of base modules are not served per request",
    "fan_in_fan_out": "only Linear (out, in) weight layouts are served",
}
WEIGHT_NAME = re.compile(r"ia3_l(?:\.[A-Za-z0-9_-]+)?")


def parse(
    config: Mapping,
    tensors: Mapping[str, torch.Tensor],
    name: str,
    fingerprint: BaseFingerprint,
    max_rank: int,
) -> AdapterSpec:
    refuse_options(config, UNSUPPORTED)
    is_feedforward = feedforward_rule(config.get("feedforward_modules"))
    modules = {}
    for key in sorted(tensors):
        module_key = parse_module_key(key, fingerprint)
        if module_key is None or not WEIGHT_NAME.fullmatch(module_key.rest):
            raise AdapterFormatError(
                key, f"tensor {key!r}: expected only ia3_l vectors of q..down projections"
            )
        is_input = is_feedforward(module_key.module)
        in_features, out_features = fingerprint.in_out(module_key.target)
        tensor = tensors[key]
        shape = (1, in_features) if is_input else (out_features, 1)
        vector = check_tensor(key, tensor, shape if tensor.dim() == 2 else (shape[0] * shape[1],))
        placement = "input" if is_input else "output"
        modules[module_key.layer, module_key.target] = IA3Weights(vector.flatten(), placement)
    if not modules:
        raise AdapterFormatError("adapter_model.safetensors", "expected ia3_l vectors, got none")
    return AdapterSpec(
        name=name,
        kind=AdapterKind.IA3,
        fingerprint=fingerprint,
        rank=0,
        targets=tuple(t for t in TARGETS if any(key[1] == t for key in modules)),
        modules=MappingProxyType(modules),
    )


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

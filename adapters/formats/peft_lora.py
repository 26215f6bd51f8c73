"""PEFT LoRA (peft_type LORA): lora_A (r, in) / lora_B (out, r) per targeted linear.

scaling = alpha / r, or alpha / sqrt(r) with use_rslora, where r and alpha are the module's own
values from rank_pattern / alpha_pattern (else `r` / `lora_alpha`). Pattern keys are regexes
matched against the end of the module name, as peft.utils.other.get_pattern_key does (peft
0.21): the first key with re.match(rf"(.*\\.)?({key})$", module_name) wins. They are matched
with RE2 under the bounds of adapters.formats.patterns, never with Python's backtracking `re`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from types import MappingProxyType

import torch

from adapters.formats.patterns import first_match, pattern_table
from adapters.spec import (
    TARGETS,
    AdapterFormatError,
    AdapterKind,
    AdapterSpec,
    BaseFingerprint,
    LoraWeights,
    ModuleKey,
    check_number,
    check_rank,
    check_tensor,
    parse_module_key,
    refuse_options,
)

UNSUPPORTED = {
    "use_dora": "DoRA needs a per-module magnitude vector this server does not apply",
    "modules_to_save": "full copies of base modules are not served per request",
    "fan_in_fan_out": "only Linear (out, in) weight layouts are served",
    "lora_bias": "LoRA B biases are not served",
    "layer_replication": "layer replication changes the base model",
    "trainable_token_indices": "trainable token embeddings are not served",
    "target_parameters": "LoRA on raw parameters is not served",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not served",
    "use_qalora": "QA-LoRA input pooling is not served",
}
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed")
WEIGHT_NAME = re.compile(r"lora_(?P<half>A|B)(?:\.[A-Za-z0-9_-]+)?\.weight")


def parse(
    config: Mapping,
    tensors: Mapping[str, torch.Tensor],
    name: str,
    fingerprint: BaseFingerprint,
    max_rank: int,
) -> AdapterSpec:
    check_options(config)
    r = check_rank("r", config.get("r", 8), max_rank)
    alpha = check_number("lora_alpha", config.get("lora_alpha", 8))
    rank_pattern = pattern_table(config, "rank_pattern", lambda p, v: check_rank(p, v, max_rank))
    alpha_pattern = pattern_table(config, "alpha_pattern", check_number)
    modules = {}
    for (layer, target), (module, a_key, b_key) in pair_tensors(tensors, fingerprint).items():
        check_layer(config, layer, a_key)
        rank = first_match(rank_pattern, module, r)
        in_features, out_features = fingerprint.in_out(target)
        a = check_tensor(a_key, tensors[a_key], (rank, in_features))
        b = check_tensor(b_key, tensors[b_key], (out_features, rank))
        module_alpha = first_match(alpha_pattern, module, alpha)
        scaling = module_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        modules[layer, target] = LoraWeights(a=a, b=b, scaling=scaling)
    return AdapterSpec(
        name=name,
        kind=AdapterKind.LORA,
        fingerprint=fingerprint,
        rank=max(w.rank for w in modules.values()),
        targets=tuple(t for t in TARGETS if any(key[1] == t for key in modules)),
        modules=MappingProxyType(modules),
    )


def check_options(config: Mapping) -> None:
    refuse_options(config, UNSUPPORTED)
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(
            "bias", f"bias: expected 'none' (biases are not served), got {config['bias']!r}"
        )
    targets = config.get("target_modules")
    names = [targets] if isinstance(targets, str) else list(targets or [])
    for target in names:
        if isinstance(target, str) and any(e in target for e in EMBEDDING_MODULES):
            raise AdapterFormatError(
                "target_modules",
                "target_modules: expected only q/k/v/o/gate/up/down projections "
                f"(embedding and lm_head targets are not served), got {target!r}",
            )


def pair_tensors(
    tensors: Mapping[str, torch.Tensor], fingerprint: BaseFingerprint
) -> dict[tuple[int, str], tuple[str, str, str]]:
    """(layer, target) -> (module name, lora_A key, lora_B key); refuses any other tensor."""
    halves: dict[tuple[int, str], dict[str, str]] = {}
    names: dict[tuple[int, str], str] = {}
    for key in sorted(tensors):
        module_key, half = lora_key(key, fingerprint)
        halves.setdefault((module_key.layer, module_key.target), {})[half] = key
        names[module_key.layer, module_key.target] = module_key.module
    if not halves:
        raise AdapterFormatError(
            "adapter_model.safetensors", "expected lora_A/lora_B weights, got no tensors"
        )
    for pair in halves.values():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise AdapterFormatError(
                next(iter(pair.values())), f"expected a {missing} weight beside it, got none"
            )
    return {k: (names[k], v["A"], v["B"]) for k, v in halves.items()}


def lora_key(key: str, fingerprint: BaseFingerprint) -> tuple[ModuleKey, str]:
    module_key = parse_module_key(key, fingerprint)
    weight = WEIGHT_NAME.fullmatch(module_key.rest) if module_key else None
    if module_key is None or weight is None:
        what = "embedding/lm_head" if any(e in key for e in EMBEDDING_MODULES) else "unknown"
        raise AdapterFormatError(
            key,
            f"tensor {key!r}: {what} module; expected lora_A/lora_B weights of "
            "q/k/v/o/gate/up/down projections only",
        )
    return module_key, weight["half"]


def check_layer(config: Mapping, layer: int, key: str) -> None:
    """layers_to_transform, when given, must cover every layer that has weights."""
    layers = config.get("layers_to_transform")
    if layers is None:
        return
    allowed = [layers] if isinstance(layers, int) else layers
    if not isinstance(allowed, list) or not all(isinstance(i, int) for i in allowed):
        raise AdapterFormatError(
            "layers_to_transform", f"layers_to_transform: expected int or list, got {layers!r}"
        )
    if layer not in allowed:
        raise AdapterFormatError(
            key,
            f"tensor {key!r}: expected a layer in layers_to_transform {sorted(allowed)}, "
            f"got {layer}",
        )

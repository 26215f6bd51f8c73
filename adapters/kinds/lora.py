"""LoRA (PEFT peft_type LORA): y = W x + scaling * B (A x), lora_A (r, in) / lora_B (out, r) per
targeted linear; in the pool's `post` stacks (the bottleneck form with f = identity).

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
from typing import TYPE_CHECKING

import torch

from adapters.formats.modules import ModuleLayout, group_modules
from adapters.formats.patterns import first_match, pattern_table
from adapters.kinds.base import NOT_SERVED, AdapterFiles, Kind
from adapters.spec import (
    AdapterFormatError,
    AdapterKind,
    AdapterSpec,
    LoraWeights,
    check_number,
    check_rank,
    check_tensor,
    refuse_bias,
)
from kernels import Activation

if TYPE_CHECKING:
    from adapters.pool import AdapterPool

EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed")


def unexpected_key(key: str) -> str:
    what = "embedding/lm_head" if any(e in key for e in EMBEDDING_MODULES) else "unknown"
    return (
        f"tensor {key!r}: {what} module; expected lora_A/lora_B weights of "
        "q/k/v/o/gate/up/down projections only"
    )


LAYOUT = ModuleLayout(
    weight=re.compile(r"(?P<name>lora_A|lora_B)(?:\.[A-Za-z0-9_-]+)?\.weight"),
    names=("lora_A", "lora_B"),
    unexpected=unexpected_key,
    empty="expected lora_A/lora_B weights, got no tensors",
)
DORA_LAYOUT = ModuleLayout(  # use_dora: a magnitude vector (out,) beside A and B
    weight=re.compile(
        r"(?P<name>lora_A|lora_B|lora_magnitude_vector)(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?"
    ),
    names=("lora_A", "lora_B", "lora_magnitude_vector"),
    unexpected=unexpected_key,
    empty="expected lora_A/lora_B weights, got no tensors",
)


class Lora(Kind):
    kind = AdapterKind.LORA
    peft_type = "LORA"
    unsupported = MappingProxyType({
        **NOT_SERVED,
        "lora_bias": "LoRA B biases are not served",
        "layer_replication": "layer replication changes the base model",
        "trainable_token_indices": "trainable token embeddings are not served",
        "target_parameters": "LoRA on raw parameters is not served",
        "alora_invocation_tokens": "activated LoRA (aLoRA) is not served",
        "use_qalora": "QA-LoRA input pooling is not served",
    })  # fmt: skip
    weights = LoraWeights

    def read(self, files: AdapterFiles) -> AdapterSpec:
        config, max_rank = files.config, files.max_rank
        refuse_bias(config)
        check_targets(config)
        r = check_rank("r", config.get("r", 8), max_rank)
        alpha = check_number("lora_alpha", config.get("lora_alpha", 8))
        rank_pattern = pattern_table(
            config, "rank_pattern", lambda p, v: check_rank(p, v, max_rank)
        )
        alpha_pattern = pattern_table(config, "alpha_pattern", check_number)
        dora = bool(config.get("use_dora"))
        if dora and files.base_weight is None:
            raise AdapterFormatError(
                "use_dora", "use_dora: DoRA's norms need the base model's weights, which this "
                "reader has not got (it validates an adapter without a model)",
            )  # fmt: skip
        modules = {}
        grouped = group_modules(files.tensors, files.fingerprint, DORA_LAYOUT if dora else LAYOUT)
        for (layer, target), found in grouped.items():
            a_key, b_key = found.keys["lora_A"], found.keys["lora_B"]
            check_layer(config, layer, a_key)
            rank = first_match(rank_pattern, found.module, r)
            in_features, out_features = files.fingerprint.in_out(target)
            a = check_tensor(a_key, files.tensors[a_key], (rank, in_features))
            b = check_tensor(b_key, files.tensors[b_key], (out_features, rank))
            module_alpha = first_match(alpha_pattern, found.module, alpha)
            scaling = module_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
            output_scale = None
            if dora:
                m_key = found.keys["lora_magnitude_vector"]
                magnitude = check_tensor(m_key, files.tensors[m_key], (out_features,))
                output_scale = dora_scale(files.base_weight(layer, target), a, b, scaling,
                                          magnitude, m_key)  # fmt: skip
            modules[layer, target] = LoraWeights(a=a, b=b, scaling=scaling, output_scale=output_scale)
        return self.module_spec(files, modules, rank=max(w.rank for w in modules.values()))

    def load_module(
        self, pool: AdapterPool, slot: int, key: tuple[int, str], weights: LoraWeights
    ) -> None:
        pool.set_module(slot, key, "parallel", weights.a, weights.b, weights.scaling,
                        Activation.IDENTITY)  # fmt: skip
        if weights.output_scale is not None:  # DoRA: the site's output scale, after the delta
            pool.set_vector(slot, key, "output", weights.output_scale)


def dora_scale(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
               magnitude: torch.Tensor, key: str) -> torch.Tensor:  # fmt: skip
    """DoRA's g = magnitude / ||W + scaling * b @ a|| per output row, as peft computes it at
    inference (tuners/lora/dora.py: the norm of the merged weight over its input dim, detached),
    in float64 so that a near-zero norm is seen, not rounded to one."""
    merged = weight.double() + scaling * (b.double() @ a.double())
    norm = torch.linalg.norm(merged, dim=1)
    if not bool((norm > 0).all()):
        raise AdapterFormatError(key, f"tensor {key!r}: a row of W + scaling * B A is zero")
    return (magnitude.double() / norm).float()


def check_targets(config: Mapping) -> None:
    targets = config.get("target_modules")
    names = [targets] if isinstance(targets, str) else list(targets or [])
    for target in names:
        if isinstance(target, str) and any(e in target for e in EMBEDDING_MODULES):
            raise AdapterFormatError(
                "target_modules",
                "target_modules: expected only q/k/v/o/gate/up/down projections "
                f"(embedding and lm_head targets are not served), got {target!r}",
            )


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

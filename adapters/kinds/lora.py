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
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from adapterserve.adapters.formats.modules import ModuleLayout, group_modules
from adapterserve.adapters.formats.patterns import first_match, pattern_table
from adapterserve.adapters.kinds.base import NOT_SERVED, AdapterFiles, Kind
from adapterserve.adapters.spec import (
    MODEL_TARGETS,
    AdapterFormatError,
    AdapterKind,
    AdapterSpec,
    LoraWeights,
    check_number,
    check_rank,
    check_tensor,
    refuse_bias,
)
from adapterserve.kernels import Activation

if TYPE_CHECKING:
    from adapterserve.adapters.pool import AdapterPool

EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed")

# LoRA on the model-level modules (adapters.spec.MODEL_TARGETS), e.g.
# "base_model.model.model.embed_tokens.lora_embedding_A" and
# "base_model.model.lm_head.lora_A.weight". peft also saves a copy of the base embedding or head
# beside them ("<module>.base_layer.weight", save_embedding_layers): its shape is checked (a
# resized vocabulary is refused) and its values are not used: the server serves its own base.
MODEL_KEY = re.compile(
    r"(?:base_model\.model\.)?(?P<module>model\.embed_tokens|lm_head)\.(?P<rest>.+)"
)
MODEL_WEIGHTS = {
    "embed_tokens": re.compile(r"(?P<name>lora_embedding_A|lora_embedding_B)(?:\.[A-Za-z0-9_-]+)?"),
    "lm_head": re.compile(r"(?P<name>lora_A|lora_B)(?:\.[A-Za-z0-9_-]+)?\.weight"),
}
DORA_MODEL_REFUSAL = (
    "tensor {key}: DoRA on embed_tokens / lm_head is not served (DoRA is served on the seven "
    "projections)"
)
MODEL_NAMES = {
    "embed_tokens": ("lora_embedding_A", "lora_embedding_B"),
    "lm_head": ("lora_A", "lora_B"),
}


def unexpected_key(key: str) -> str:
    if any(e in key for e in EMBEDDING_MODULES):
        return (
            f"tensor {key!r}: not a LoRA weight of embed_tokens (lora_embedding_A/B) or lm_head "
            "(lora_A/B); full copies of modules (modules_to_save) and trainable token rows are "
            "not served"
        )
    return (
        f"tensor {key!r}: unknown module; expected lora_A/lora_B weights of q/k/v/o/gate/up/down "
        "projections, or LoRA on embed_tokens / lm_head"
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
    unsupported = MappingProxyType(
        {
            **NOT_SERVED,
            "lora_bias": "LoRA B biases are not served",
            "layer_replication": "layer replication changes the base model",
            "trainable_token_indices": "trainable token embeddings are not served",
            "target_parameters": "LoRA on raw parameters is not served",
            "alora_invocation_tokens": "activated LoRA (aLoRA) is not served",
            "use_qalora": "QA-LoRA input pooling is not served",
        }
    )
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
                "use_dora",
                "use_dora: DoRA's norms need the base model's weights, which this "
                "reader has not got (it validates an adapter without a model)",
            )
        modules = {}
        layer_tensors, model_keys = split_model_keys(files.tensors)
        if dora and model_keys:
            key = next(iter(next(iter(model_keys.values())).values()))
            raise AdapterFormatError(key, DORA_MODEL_REFUSAL.format(key=repr(key)))
        grouped = {}
        if layer_tensors or not model_keys:
            grouped = group_modules(
                layer_tensors, files.fingerprint, DORA_LAYOUT if dora else LAYOUT
            )
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
                output_scale = dora_scale(
                    files.base_weight(layer, target), a, b, scaling, magnitude, m_key
                )
            modules[layer, target] = LoraWeights(
                a=a, b=b, scaling=scaling, output_scale=output_scale
            )
        model_modules = {}
        for target, keys in model_keys.items():
            module = "model.embed_tokens" if target == "embed_tokens" else "lm_head"
            rank = first_match(rank_pattern, module, r)
            alpha_ = first_match(alpha_pattern, module, alpha)
            model_modules[target] = model_weights(
                files,
                target,
                keys,
                rank,
                alpha_ / (math.sqrt(rank) if config.get("use_rslora") else rank),
            )
        spec = self.module_spec(
            files, modules, rank=max(w.rank for w in [*modules.values(), *model_modules.values()])
        )
        if not model_modules:
            return spec
        return replace(
            spec,
            targets=spec.targets + tuple(t for t in MODEL_TARGETS if t in model_modules),
            model_modules=MappingProxyType(model_modules),
        )

    def load_module(
        self, pool: AdapterPool, slot: int, key: tuple[int, str], weights: LoraWeights
    ) -> None:
        pool.set_module(
            slot, key, "parallel", weights.a, weights.b, weights.scaling, Activation.IDENTITY
        )
        if weights.output_scale is not None:  # DoRA: the site's output scale, after the delta
            pool.set_vector(slot, key, "output", weights.output_scale)

    def place(self, pool: AdapterPool, slot: int, spec: AdapterSpec) -> None:
        super().place(pool, slot, spec)
        for target, weights in spec.model_modules.items():
            pool.set_model_lora(slot, target, weights.a, weights.b, weights.scaling)


def split_model_keys(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, str]]]:
    """(the per-layer tensors, {model target: {weight name or "base_layer": key}})."""
    layers: dict[str, torch.Tensor] = {}
    found: dict[str, dict[str, str]] = {}
    for key, tensor in tensors.items():
        match = MODEL_KEY.fullmatch(key)
        if match is None:
            layers[key] = tensor
            continue
        target = match["module"].removeprefix("model.")
        if match["rest"] == "base_layer.weight":
            found.setdefault(target, {})["base_layer"] = key
            continue
        weight = MODEL_WEIGHTS[target].fullmatch(match["rest"])
        if weight is None and match["rest"].startswith("lora_magnitude_vector"):
            raise AdapterFormatError(key, DORA_MODEL_REFUSAL.format(key=repr(key)))
        if weight is None:
            raise AdapterFormatError(key, unexpected_key(key))
        found.setdefault(target, {})[weight["name"]] = key
    return layers, found


def model_weights(
    files: AdapterFiles, target: str, keys: Mapping[str, str], rank: int, scaling: float
) -> LoraWeights:
    """LoRA on embed_tokens or lm_head, checked against the base's vocabulary and width."""
    vocab, hidden = files.fingerprint.vocab_size, files.fingerprint.hidden_size
    names = MODEL_NAMES[target]
    if "base_layer" in keys:  # the base's own copy: only its shape is checked
        check_tensor(keys["base_layer"], files.tensors[keys["base_layer"]], (vocab, hidden))
    missing = [name for name in names if name not in keys]
    if missing:
        where = next(iter(keys.values()))
        raise AdapterFormatError(
            where, f"tensor {where!r}: expected a {target} {missing[0]} weight beside it, got none"
        )
    a_shape, b_shape = (
        ((rank, vocab), (hidden, rank))
        if target == "embed_tokens"
        else ((rank, hidden), (vocab, rank))
    )
    a = check_tensor(keys[names[0]], files.tensors[keys[names[0]]], a_shape)
    b = check_tensor(keys[names[1]], files.tensors[keys[names[1]]], b_shape)
    return LoraWeights(a=a, b=b, scaling=scaling)


def dora_scale(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    key: str,
) -> torch.Tensor:
    """DoRA's g = magnitude / ||W + scaling * b @ a|| per output row, as peft computes it at
    inference (tuners/lora/dora.py: the norm of the merged weight over its input dim, detached),
    in float64 so that a near-zero norm is seen, not rounded to one."""
    merged = weight.double() + scaling * (b.double() @ a.double())
    norm = torch.linalg.norm(merged, dim=1)
    if not bool((norm > 0).all()):
        raise AdapterFormatError(key, f"tensor {key!r}: a row of W + scaling * B A is zero")
    return (magnitude.double() / norm).float()


def check_targets(config: Mapping) -> None:
    """Embedding-like targets other than embed_tokens and lm_head (wte, embed_in, ...) name
    modules this server's Llama family does not have."""
    targets = config.get("target_modules")
    names = [targets] if isinstance(targets, str) else list(targets or [])
    for target in names:
        if (
            isinstance(target, str)
            and any(e in target for e in EMBEDDING_MODULES)
            and target.split(".")[-1] not in MODEL_TARGETS
        ):
            raise AdapterFormatError(
                "target_modules",
                "target_modules: expected q/k/v/o/gate/up/down projections, embed_tokens or "
                f"lm_head, got {target!r}",
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

"""LLM-Adapters bottleneck adapters (peft_type BOTTLENECK): series (AdapterH/AdapterP) and parallel.

Read from AGI-Edgerunners/LLM-Adapters, peft/src/peft/tuners/bottleneck.py and
peft/src/peft/utils/save_and_load.py:
- BottleneckConfig fields: bottleneck_size (256), non_linearity ("tanh", a key of
  transformers' ACT2FN), adapter_dropout (training only), target_modules (list: module names
  ending with one; str: re.fullmatch; here the weights name their modules, and a str is only
  checked, adapters.formats.patterns), use_parallel_adapter (False), scaling (float, or
  "learned" = an extra nn.Parameter `adapter_scaling`), bias ("none"|"all"|"adapter_only"),
  init_weights (init only), modules_to_save. finetune.py also passes use_adapterp, which only
  selects the targets; placement still follows the target (below), so it needs no handling.
- Each targeted Linear gains adapter_down = Linear(d_in, size, bias=False) and adapter_up =
  Linear(size, d_out, bias=False); state-dict keys "<module>.adapter_down.weight" (size, d_in)
  and "<module>.adapter_up.weight" (d_out, size). Llama adapter_type mapping: gate_proj and
  up_proj -> "mh_adapter" (d_in = d_out = linear's in; y = W(x + s*up(f(down(x))))),
  down_proj -> "output_adapter" (d_in = d_out = linear's out; z = Wx, y = z + s*up(f(down(z)))),
  any target with use_parallel_adapter -> "parallel_adapter" (y = Wx + s*up(f(down(x)))).
LLM-Adapters saves adapter_model.bin (pickle); users convert it to safetensors offline.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

import torch

from adapters.spec import (
    TARGETS,
    AdapterFormatError,
    AdapterKind,
    AdapterSpec,
    BaseFingerprint,
    BottleneckWeights,
    Placement,
    adapter_io,
    check_number,
    check_rank,
    check_tensor,
    parse_module_key,
    refuse_options,
)
from kernels import Activation

# transformers ACT2FN names -> the kernels' activation codes (same math: gelu is exact erf;
# gelu_new and gelu_pytorch_tanh are the tanh approximation; swish is silu).
ACTIVATIONS = {
    "linear": Activation.IDENTITY,
    "identity": Activation.IDENTITY,
    "relu": Activation.RELU,
    "gelu": Activation.GELU,
    "gelu_new": Activation.GELU_TANH,
    "gelu_pytorch_tanh": Activation.GELU_TANH,
    "silu": Activation.SILU,
    "swish": Activation.SILU,
    "sigmoid": Activation.SIGMOID,
    "tanh": Activation.TANH,
}
SERIES_PLACEMENT: dict[str, Placement] = {"gate": "input", "up": "input", "down": "output"}
UNSUPPORTED = {"modules_to_save": "full copies of base modules are not served per request"}
WEIGHT_NAME = re.compile(r"adapter_(?P<half>down|up)\.weight")


def parse(
    config: Mapping,
    tensors: Mapping[str, torch.Tensor],
    name: str,
    fingerprint: BaseFingerprint,
    max_rank: int,
) -> AdapterSpec:
    refuse_options(config, UNSUPPORTED)
    size = check_rank("bottleneck_size", config.get("bottleneck_size", 256), max_rank)
    activation = parse_activation(config.get("non_linearity", "tanh"))
    scaling = parse_scaling(config.get("scaling", 1.0))
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(
            "bias", f"bias: expected 'none' (biases are not served), got {config['bias']!r}"
        )
    parallel = bool(config.get("use_parallel_adapter", False))
    modules = {}
    for (layer, target), keys in pair_tensors(tensors, fingerprint).items():
        placement = placement_for(target, parallel, keys["down"])
        d_in, d_out = adapter_io(fingerprint, target, placement)
        down = check_tensor(keys["down"], tensors[keys["down"]], (size, d_in))
        up = check_tensor(keys["up"], tensors[keys["up"]], (d_out, size))
        modules[layer, target] = BottleneckWeights(down, up, scaling, activation, placement)
    return AdapterSpec(
        name=name,
        kind=AdapterKind.PARALLEL if parallel else AdapterKind.SERIES,
        fingerprint=fingerprint,
        rank=size,
        targets=tuple(t for t in TARGETS if any(key[1] == t for key in modules)),
        modules=MappingProxyType(modules),
    )


def parse_activation(non_linearity: object) -> Activation:
    if not isinstance(non_linearity, str) or non_linearity.lower() not in ACTIVATIONS:
        raise AdapterFormatError(
            "non_linearity",
            f"non_linearity: expected one of {sorted(ACTIVATIONS)}, got {non_linearity!r}",
        )
    return ACTIVATIONS[non_linearity.lower()]


def parse_scaling(scaling: object) -> float:
    if scaling == "learned":
        raise AdapterFormatError(
            "scaling", "scaling: 'learned' is not served; expected a number, got 'learned'"
        )
    return check_number("scaling", scaling)


def placement_for(target: str, parallel: bool, key: str) -> Placement:
    if parallel:
        return "parallel"
    if target not in SERIES_PLACEMENT:
        raise AdapterFormatError(
            key,
            f"tensor {key!r}: series adapters sit on gate_proj/up_proj/down_proj only "
            f"(LLM-Adapters' Llama mapping); got {target}_proj (use_parallel_adapter is false)",
        )
    return SERIES_PLACEMENT[target]


def pair_tensors(
    tensors: Mapping[str, torch.Tensor], fingerprint: BaseFingerprint
) -> dict[tuple[int, str], dict[str, str]]:
    """(layer, target) -> {"down": key, "up": key}; refuses any other tensor."""
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key in sorted(tensors):
        module_key = parse_module_key(key, fingerprint)
        weight = WEIGHT_NAME.fullmatch(module_key.rest) if module_key else None
        if module_key is None or weight is None:
            raise AdapterFormatError(
                key,
                f"tensor {key!r}: expected only adapter_down/adapter_up weights of "
                "q/k/v/o/gate/up/down projections",
            )
        pairs.setdefault((module_key.layer, module_key.target), {})[weight["half"]] = key
    if not pairs:
        raise AdapterFormatError(
            "adapter_model.safetensors", "expected adapter_down/adapter_up weights, got none"
        )
    for pair in pairs.values():
        if set(pair) != {"down", "up"}:
            missing = "adapter_up" if "down" in pair else "adapter_down"
            raise AdapterFormatError(
                next(iter(pair.values())), f"expected a {missing} weight beside it, got none"
            )
    return pairs

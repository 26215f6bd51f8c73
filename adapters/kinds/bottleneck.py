"""LLM-Adapters bottleneck adapters (peft_type BOTTLENECK): what series and parallel share.

Read from AGI-Edgerunners/LLM-Adapters, peft/src/peft/tuners/bottleneck.py and
peft/src/peft/utils/save_and_load.py:
- BottleneckConfig fields: bottleneck_size (256), non_linearity ("tanh", a key of
  transformers' ACT2FN), adapter_dropout (training only), target_modules (list: module names
  ending with one; str: re.fullmatch; here the weights name their modules, and a str is only
  checked, adapters.formats.patterns), use_parallel_adapter (False), scaling (float, or
  "learned" = an nn.Parameter `adapter_scaling` of shape (1,) per module, initialized to 1,
  trained and saved with the weights as "<module>.adapter_scaling": served as that module's
  scaling), bias ("none"|"all"|"adapter_only"),
  init_weights (init only), modules_to_save. finetune.py also passes use_adapterp, which only
  selects the targets; placement still follows the target (adapters.kinds.series), so it needs
  no handling.
- Each targeted Linear gains adapter_down = Linear(d_in, size, bias=False) and adapter_up =
  Linear(size, d_out, bias=False); state-dict keys "<module>.adapter_down.weight" (size, d_in)
  and "<module>.adapter_up.weight" (d_out, size); (d_in, d_out) follow the placement
  (adapters.spec.BottleneckWeights).
LLM-Adapters saves adapter_model.bin (pickle); users convert it to safetensors offline.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from adapterserve.adapters.formats.modules import ModuleLayout, group_modules
from adapterserve.adapters.kinds.base import AdapterFiles, Kind
from adapterserve.adapters.spec import (
    AdapterFormatError,
    AdapterSpec,
    BottleneckWeights,
    Placement,
    adapter_io,
    check_number,
    check_rank,
    check_tensor,
    refuse_bias,
)
from adapterserve.kernels import Activation

if TYPE_CHECKING:
    from adapterserve.adapters.pool import AdapterPool

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
LAYOUT = ModuleLayout(
    weight=re.compile(r"(?P<name>adapter_down|adapter_up)\.weight"),
    names=("adapter_down", "adapter_up"),
    unexpected=lambda key: (
        f"tensor {key!r}: expected only adapter_down/adapter_up weights of "
        "q/k/v/o/gate/up/down projections"
    ),
    empty="expected adapter_down/adapter_up weights, got none",
)
LEARNED_LAYOUT = ModuleLayout(  # scaling "learned": a trained scalar beside the two weights
    weight=re.compile(r"(?P<name>adapter_(?:down|up)(?=\.weight$)|adapter_scaling$)(?:\.weight)?"),
    names=("adapter_down", "adapter_up", "adapter_scaling"),
    unexpected=lambda key: (
        f"tensor {key!r}: expected only adapter_down/adapter_up weights and adapter_scaling "
        "(scaling: 'learned') of q/k/v/o/gate/up/down projections"
    ),
    empty="expected adapter_down/adapter_up weights, got none",
)


def uses_parallel_adapter(config: Mapping[str, Any]) -> bool:
    return bool(config.get("use_parallel_adapter", False))


class Bottleneck(Kind):
    """down -> f -> up, scaled, at the placement `placements` gives its target."""

    peft_type = "BOTTLENECK"
    weights = BottleneckWeights
    placements: ClassVar[Mapping[str, Placement]]  # target -> placement; absent: not served
    misplaced: ClassVar[str]  # why a target is not served ({target} is filled in)

    def read(self, files: AdapterFiles) -> AdapterSpec:
        config = files.config
        size = check_rank("bottleneck_size", config.get("bottleneck_size", 256), files.max_rank)
        activation = parse_activation(config.get("non_linearity", "tanh"))
        learned = config.get("scaling", 1.0) == "learned"
        scaling = 1.0 if learned else parse_scaling(config.get("scaling", 1.0))
        refuse_bias(config)
        modules = {}
        grouped = group_modules(
            files.tensors, files.fingerprint, LEARNED_LAYOUT if learned else LAYOUT
        )
        for (layer, target), found in grouped.items():
            if learned:
                key = found.keys["adapter_scaling"]
                scaling = float(check_tensor(key, files.tensors[key], (1,))[0])
            down_key, up_key = found.keys["adapter_down"], found.keys["adapter_up"]
            if target not in self.placements:
                raise AdapterFormatError(
                    down_key, f"tensor {down_key!r}: " + self.misplaced.format(target=target)
                )
            placement = self.placements[target]
            d_in, d_out = adapter_io(files.fingerprint, target, placement)
            down = check_tensor(down_key, files.tensors[down_key], (size, d_in))
            up = check_tensor(up_key, files.tensors[up_key], (d_out, size))
            modules[layer, target] = BottleneckWeights(down, up, scaling, activation, placement)
        return self.module_spec(files, modules, rank=size)

    def check_fits(self, spec: AdapterSpec) -> None:
        super().check_fits(spec)
        for (_, target), weights in spec.modules.items():
            expected = self.placements.get(target)
            if weights.placement != expected:
                raise ValueError(
                    f"adapter {spec.name!r}: {weights.placement} placement on {target} is not "
                    f"served, expected {expected!r}"
                )

    def load_module(
        self, pool: AdapterPool, slot: int, key: tuple[int, str], weights: BottleneckWeights
    ) -> None:
        pool.set_module(
            slot,
            key,
            weights.placement,
            weights.down,
            weights.up,
            weights.scaling,
            weights.activation,
        )


def parse_activation(non_linearity: object) -> Activation:
    if not isinstance(non_linearity, str) or non_linearity.lower() not in ACTIVATIONS:
        raise AdapterFormatError(
            "non_linearity",
            f"non_linearity: expected one of {sorted(ACTIVATIONS)}, got {non_linearity!r}",
        )
    return ACTIVATIONS[non_linearity.lower()]


def parse_scaling(scaling: object) -> float:
    """A number ("learned" is read per module, from the weights)."""
    return check_number("scaling", scaling)

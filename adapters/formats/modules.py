"""A state dict's tensors grouped by the (layer, target) linear they belong to.

PEFT and LLM-Adapters name every per-module tensor "<module>.<weight>", e.g.
"base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight" (module 3.q, weight lora_A).
Each kind that acts at the hook points describes its weights with a `ModuleLayout`; `group_modules`
refuses any other tensor, and a module that lacks one of the weights the layout names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from adapterserve.adapters.formats import WEIGHTS_FILE
from adapterserve.adapters.spec import AdapterFormatError, BaseFingerprint, parse_module_key


@dataclass(frozen=True)
class ModuleLayout:
    """How a kind names its tensors after the module name."""

    weight: re.Pattern[str]  # fullmatch of what follows the module name; group `name` says which
    names: tuple[str, ...]  # the weights every module has ("lora_A", "lora_B")
    unexpected: Callable[[str], str]  # the refusal of a tensor key that is none of them
    empty: str  # the refusal of a state dict without any


@dataclass(frozen=True)
class ModuleTensors:
    """One module's tensor keys: `keys[name]` for each name of the layout."""

    module: str  # PEFT's module name, "model.layers.3.self_attn.q_proj" (config patterns match it)
    keys: Mapping[str, str]


def group_modules(
    tensors: Mapping[str, torch.Tensor], fingerprint: BaseFingerprint, layout: ModuleLayout
) -> dict[tuple[int, str], ModuleTensors]:
    """(layer, target) -> that module's tensor keys, in the order of its first key (sorted)."""
    keys: dict[tuple[int, str], dict[str, str]] = {}
    modules: dict[tuple[int, str], str] = {}
    for key in sorted(tensors):
        module_key = parse_module_key(key, fingerprint)
        weight = layout.weight.fullmatch(module_key.rest) if module_key else None
        if module_key is None or weight is None:
            raise AdapterFormatError(key, layout.unexpected(key))
        where = (module_key.layer, module_key.target)
        keys.setdefault(where, {})[weight["name"]] = key
        modules[where] = module_key.module
    if not keys:
        raise AdapterFormatError(WEIGHTS_FILE, layout.empty)
    for found in keys.values():
        missing = [name for name in layout.names if name not in found]
        if missing:
            raise AdapterFormatError(
                next(iter(found.values())), f"expected a {missing[0]} weight beside it, got none"
            )
    return {where: ModuleTensors(modules[where], found) for where, found in keys.items()}

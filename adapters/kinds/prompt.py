"""PEFT prompt tuning (peft_type PROMPT_TUNING): `prompt_embeddings` (num_virtual_tokens, hidden).

The virtual token embeddings replace the embeddings of the request's first num_virtual
positions (placeholder ids the engine puts in front of the prompt). Only decoder-only models
(num_transformer_submodules 1) are served. `check_prompt_config` and `prompt_tensor` are shared
with prefix tuning, which stores its virtual K/V the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from adapterserve.adapters.kinds.base import AdapterFiles, Binding, Kind
from adapterserve.adapters.spec import AdapterFormatError, AdapterKind, AdapterSpec, check_tensor

if TYPE_CHECKING:
    from adapterserve.adapters.pool import AdapterPool


class PromptTuning(Kind):
    kind = AdapterKind.PROMPT
    peft_type = "PROMPT_TUNING"

    def read(self, files: AdapterFiles) -> AdapterSpec:
        hidden = files.fingerprint.hidden_size
        num_virtual = check_prompt_config(files.config, "token_dim", hidden)
        embeddings = prompt_tensor(files.tensors, (num_virtual, hidden))
        return AdapterSpec(
            files.name,
            self.kind,
            files.fingerprint,
            rank=0,
            targets=(),
            modules=MappingProxyType({}),
            prompt_embeddings=embeddings,
            num_virtual_tokens=num_virtual,
        )

    def place(self, pool: AdapterPool, slot: int, spec: AdapterSpec) -> None:
        """No stack: the embeddings stay on the device, per slot, until a request binds them."""
        pool.prompt_embeddings[slot] = pool.on_device(spec.prompt_embeddings)

    def bind(self, pool: AdapterPool, slot: int, num_virtual: int) -> Binding:
        """The embeddings of the request's virtual positions (its batch rows take them in place
        of token embeddings); its tokens apply no hook (slot id -1)."""
        return Binding(num_virtual=num_virtual, virtual_embeds=pool.prompt_embeddings[slot])


def check_prompt_config(config: Mapping, dim_field: str, expected_dim: int) -> int:
    """Shared by prompt and prefix tuning: -> num_virtual_tokens after checking the config."""
    count = config.get("num_virtual_tokens")
    if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= 4096:
        raise AdapterFormatError(
            "num_virtual_tokens",
            f"num_virtual_tokens: expected an integer in 1..4096, got {count!r}",
        )
    submodules = config.get("num_transformer_submodules", 1)
    if submodules not in (None, 1):
        raise AdapterFormatError(
            "num_transformer_submodules",
            f"num_transformer_submodules: expected 1 (decoder-only), got {submodules!r}",
        )
    dim = config.get(dim_field)
    if dim is not None and dim != expected_dim:
        raise AdapterFormatError(
            dim_field,
            f"{dim_field}: expected {expected_dim} for this base model, got {dim!r}",
        )
    return count


def prompt_tensor(tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The one tensor `prompt_embeddings`, checked against `shape`."""
    extra = sorted(set(tensors) - {"prompt_embeddings"})
    if extra:
        raise AdapterFormatError(
            extra[0], f"tensor {extra[0]!r}: expected only 'prompt_embeddings', got {extra}"
        )
    if "prompt_embeddings" not in tensors:
        raise AdapterFormatError(
            "adapter_model.safetensors", "expected a 'prompt_embeddings' tensor, got none"
        )
    return check_tensor("prompt_embeddings", tensors["prompt_embeddings"], shape)

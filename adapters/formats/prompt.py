"""PEFT prompt tuning (peft_type PROMPT_TUNING): `prompt_embeddings` (num_virtual_tokens, hidden).

The virtual token embeddings are prepended to the input embeddings at admission. Only
decoder-only models (num_transformer_submodules 1) are served.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch

from adapters.spec import (
    AdapterFormatError,
    AdapterKind,
    AdapterSpec,
    BaseFingerprint,
    check_tensor,
    refuse_options,
)

UNSUPPORTED = {"modules_to_save": "full copies of base modules are not served per request"}


def parse(
    config: Mapping,
    tensors: Mapping[str, torch.Tensor],
    name: str,
    fingerprint: BaseFingerprint,
    max_rank: int,
) -> AdapterSpec:
    refuse_options(config, UNSUPPORTED)
    num_virtual_tokens = check_prompt_config(config, "token_dim", fingerprint.hidden_size)
    embeddings = prompt_tensor(tensors, (num_virtual_tokens, fingerprint.hidden_size))
    return AdapterSpec(
        name=name,
        kind=AdapterKind.PROMPT,
        fingerprint=fingerprint,
        rank=0,
        targets=(),
        modules=MappingProxyType({}),
        prompt_embeddings=embeddings,
        num_virtual_tokens=num_virtual_tokens,
    )


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

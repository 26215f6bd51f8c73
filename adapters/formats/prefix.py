"""PEFT prefix tuning (peft_type PREFIX_TUNING, no projection).

Layout, from peft 0.21 PeftModel.get_prompt and utils/other.py _prepare_prompt_learning_config:
for GQA models peft sets token_dim = num_key_value_heads * head_dim and num_attention_heads =
num_key_value_heads; `prompt_embeddings` (nvt, num_layers * 2 * token_dim) is viewed as
(nvt, num_layers * 2, kv_heads, head_dim), permuted to (num_layers * 2, kv_heads, nvt,
head_dim) and split in pairs: row 2*l is layer l's keys, row 2*l + 1 its values.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch

from adapters.formats.prompt import check_prompt_config, prompt_tensor
from adapters.spec import (
    AdapterFormatError,
    AdapterKind,
    AdapterSpec,
    BaseFingerprint,
    refuse_options,
)

UNSUPPORTED = {
    "modules_to_save": "full copies of base modules are not served per request",
    "prefix_projection": "the prefix MLP encoder is not served; export the projected prefix",
}


def parse(
    config: Mapping,
    tensors: Mapping[str, torch.Tensor],
    name: str,
    fingerprint: BaseFingerprint,
    max_rank: int,
) -> AdapterSpec:
    refuse_options(config, UNSUPPORTED)
    check_layout(config, fingerprint)
    nvt = check_prompt_config(config, "token_dim", fingerprint.kv_dim)
    layers, kv_heads, head_dim = (
        fingerprint.num_layers,
        fingerprint.num_kv_heads,
        fingerprint.head_dim,
    )
    flat = prompt_tensor(tensors, (nvt, 2 * layers * fingerprint.kv_dim))
    prefix_kv = flat.view(nvt, layers, 2, kv_heads, head_dim)  # (nvt, L, 2, kvh, d)
    prefix_kv = prefix_kv.permute(1, 2, 0, 3, 4).contiguous()  # (L, 2, nvt, kvh, d)
    return AdapterSpec(
        name=name,
        kind=AdapterKind.PREFIX,
        fingerprint=fingerprint,
        rank=0,
        targets=(),
        modules=MappingProxyType({}),
        prefix_kv=prefix_kv,
        num_virtual_tokens=nvt,
    )


def check_layout(config: Mapping, fingerprint: BaseFingerprint) -> None:
    """num_layers and num_attention_heads (peft stores the KV head count there) must match."""
    expected = {
        "num_layers": fingerprint.num_layers,
        "num_attention_heads": fingerprint.num_kv_heads,
    }
    for field, value in expected.items():
        got = config.get(field)
        if got is not None and got != value:
            raise AdapterFormatError(
                field, f"{field}: expected {value} for this base model, got {got!r}"
            )

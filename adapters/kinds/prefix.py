"""PEFT prefix tuning (peft_type PREFIX_TUNING, no projection): per-layer virtual K/V, written
into the sequence's first cache slots at admission (`admit`), as if computed.

Layout, from peft 0.21 PeftModel.get_prompt and utils/other.py _prepare_prompt_learning_config:
for GQA models peft sets token_dim = num_key_value_heads * head_dim and num_attention_heads =
num_key_value_heads; `prompt_embeddings` (nvt, num_layers * 2 * token_dim) is viewed as
(nvt, num_layers * 2, kv_heads, head_dim), permuted to (num_layers * 2, kv_heads, nvt,
head_dim) and split in pairs: row 2*l is layer l's keys, row 2*l + 1 its values.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from adapterserve.adapters.kinds.base import NOT_SERVED, AdapterFiles, Binding, Kind, KVCacheWriter
from adapterserve.adapters.kinds.prompt import check_prompt_config, prompt_tensor
from adapterserve.adapters.spec import AdapterFormatError, AdapterKind, AdapterSpec, BaseFingerprint

if TYPE_CHECKING:
    from adapterserve.adapters.pool import AdapterPool


class PrefixTuning(Kind):
    kind = AdapterKind.PREFIX
    peft_type = "PREFIX_TUNING"
    unsupported = MappingProxyType(
        {
            "modules_to_save": NOT_SERVED["modules_to_save"],
            "prefix_projection": "the prefix MLP encoder is not served; export the projected prefix",
        }
    )

    def read(self, files: AdapterFiles) -> AdapterSpec:
        fp = files.fingerprint
        check_layout(files.config, fp)
        nvt = check_prompt_config(files.config, "token_dim", fp.kv_dim)
        layers, kv_heads, head_dim = fp.num_layers, fp.num_kv_heads, fp.head_dim
        flat = prompt_tensor(files.tensors, (nvt, 2 * layers * fp.kv_dim))
        prefix_kv = flat.view(nvt, layers, 2, kv_heads, head_dim)  # (nvt, L, 2, kvh, d)
        prefix_kv = prefix_kv.permute(1, 2, 0, 3, 4).contiguous()  # (L, 2, nvt, kvh, d)
        return AdapterSpec(
            files.name,
            self.kind,
            fp,
            rank=0,
            targets=(),
            modules=MappingProxyType({}),
            prefix_kv=prefix_kv,
            num_virtual_tokens=nvt,
        )

    def place(self, pool: AdapterPool, slot: int, spec: AdapterSpec) -> None:
        pool.prefix_kv[slot] = pool.on_device(spec.prefix_kv)

    def bind(self, pool: AdapterPool, slot: int, num_virtual: int) -> Binding:
        """The slot's virtual K/V, for `admit`; its tokens apply no hook (slot id -1)."""
        return Binding(num_virtual=num_virtual, prefix_kv=pool.prefix_kv[slot])

    def admit(self, binding: Binding, cache: KVCacheWriter, slots: torch.Tensor) -> None:
        """The virtual K/V fill the sequence's first `num_virtual` cache slots, every layer."""
        cache.write_all_layers(slots, binding.prefix_kv)


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

"""Synthetic adapters of every kind are accepted by the server's own format parsers."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterserve.adapters.formats import load_adapter
from adapterserve.adapters.spec import AdapterKind, BaseFingerprint
from adapterserve.loadtest.synthetic import (
    KINDS,
    BaseDims,
    make_adapter,
    plan_adapters,
    write_adapter,
)

TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=384,
)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rank", [16, 8])
def test_every_kind_loads(kind: str, rank: int, tmp_path: Path) -> None:
    config, tensors = make_adapter(BaseDims.from_config(TINY), kind, rank, seed=1)
    directory = write_adapter(tmp_path / kind, config, tensors)
    spec = load_adapter(directory, kind, BaseFingerprint.from_hf_config(TINY), max_rank=64)
    assert spec.kind == AdapterKind(kind)
    if kind in ("lora", "series", "parallel"):
        assert spec.rank == rank
    if kind in ("prefix", "prompt"):
        assert spec.num_virtual_tokens == rank


def test_plan_is_round_robin_and_names_sort_in_order() -> None:
    plans = plan_adapters(8, ["lora", "ia3"], [64, 32, 16, 8])
    assert [p.kind for p in plans[:4]] == ["lora", "ia3", "lora", "ia3"]
    assert [p.rank for p in plans[:5]] == [64, 32, 16, 8, 64]
    assert [p.name for p in plans] == sorted(p.name for p in plans)
    with pytest.raises(ValueError, match="kinds"):
        plan_adapters(2, ["dora"], [8])


def test_base_dims_need_the_config_fields() -> None:
    with pytest.raises(ValueError, match="--base-config"):
        BaseDims.from_config({"hidden_size": 64})
    dims = BaseDims.from_config({**TINY, "num_key_value_heads": None})
    assert dims.kv_dim == 64  # no GQA field: as many KV heads as heads

"""A Sequence takes its adapter's state from the kind's Binding; prefix tuning's admission step
writes its virtual K/V into the sequence's first cache slots (no model, no engine)."""

from __future__ import annotations

import torch

from adapterserve.adapters.kinds import Binding, kind_for
from adapterserve.adapters.spec import AdapterKind
from adapterserve.server.engine.sampling import SamplingParams
from adapterserve.server.engine.scheduler import Sequence
from adapterserve.server.model.llama import KVCache, ModelArgs

ARGS = ModelArgs(
    vocab_size=64, dim=16, intermediate_size=40, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4
)


def sequence(prompt: list[int]) -> Sequence:
    return Sequence("r", list(prompt), SamplingParams(), "m", stream=None)


def test_hook_binding_sets_the_slot_and_keeps_the_prompt():
    seq = sequence([5, 6])
    seq.bind(Binding(slot_id=2))
    assert (seq.slot_id, seq.num_virtual, seq.prompt_ids) == (2, 0, [5, 6])
    assert seq.prefix_kv is None and seq.virtual_embeds is None


def test_virtual_binding_prepends_placeholders_and_reads_back():
    embeds = torch.randn(3, 16)
    seq = sequence([5, 6])
    seq.bind(Binding(num_virtual=3, virtual_embeds=embeds))
    assert (seq.slot_id, seq.num_virtual, seq.prompt_ids) == (-1, 3, [0, 0, 0, 5, 6])
    binding = seq.binding
    assert (binding.slot_id, binding.num_virtual) == (-1, 3)
    assert binding.virtual_embeds is embeds and binding.prefix_kv is None


def test_cache_slots_follow_the_block_table():
    seq = sequence([1] * 6)
    seq.block_table = [7, 2]
    assert seq.cache_slots(range(6), 4) == [28, 29, 30, 31, 8, 9]
    assert seq.cache_slots(range(4, 6), 4) == [8, 9]


def test_prefix_admission_writes_the_first_cache_slots():
    kv = torch.randn(ARGS.n_layers, 2, 5, ARGS.n_kv_heads, ARGS.head_dim)  # (L, 2, nvt, kvh, d)
    cache = KVCache(ARGS, 4, 4, torch.float32, "cpu")
    seq = sequence([9])
    seq.bind(Binding(num_virtual=5, prefix_kv=kv))
    seq.block_table = [3, 1]
    slots = torch.tensor(seq.cache_slots(range(seq.num_virtual), 4))
    kind_for(AdapterKind.PREFIX).admit(seq.binding, cache, slots)
    assert torch.equal(cache.k[:, 3], kv[:, 0, :4]) and torch.equal(cache.v[:, 3], kv[:, 1, :4])
    assert torch.equal(cache.k[:, 1, 0], kv[:, 0, 4]) and torch.equal(cache.v[:, 1, 0], kv[:, 1, 4])
    assert not cache.k[:, 1, 1:].any() and not cache.k[:, (0, 2)].any()

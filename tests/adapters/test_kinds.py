"""adapterserve.adapters.kinds: which kind a config is, and each kind's pool placement, binding and admission
step (no model: specs are built by hand on the tiny fingerprint)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import pytest
import torch

from adapterserve.adapters.kinds import KINDS, Binding, kind_for, kind_for_config
from adapterserve.adapters.pool import SITE_OF, AdapterPool
from adapterserve.adapters.spec import (
    AdapterFormatError,
    AdapterKind,
    AdapterSpec,
    BaseFingerprint,
    BottleneckWeights,
    IA3Weights,
    LoraWeights,
    adapter_io,
)
from adapterserve.kernels import Activation

NUM_VIRTUAL = 3

# --- which kind --------------------------------------------------------------------------------

CONFIGS = {
    "lora": ({"peft_type": "LORA", "r": 4}, AdapterKind.LORA),
    "lora-lower-case": ({"peft_type": "lora"}, AdapterKind.LORA),
    "series": ({"peft_type": "BOTTLENECK"}, AdapterKind.SERIES),
    "series-explicit": (
        {"peft_type": "BOTTLENECK", "use_parallel_adapter": False},
        AdapterKind.SERIES,
    ),
    "parallel": ({"peft_type": "BOTTLENECK", "use_parallel_adapter": True}, AdapterKind.PARALLEL),
    "prefix": ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3}, AdapterKind.PREFIX),
    "prompt": ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}, AdapterKind.PROMPT),
    "ia3": ({"peft_type": "IA3"}, AdapterKind.IA3),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_config_selects_its_kind(case: str):
    config, expected = CONFIGS[case]
    assert kind_for_config(config).kind is expected


@pytest.mark.parametrize("peft_type", ["LOHA", "", None, 3, ["LORA"]])
def test_unknown_peft_type_names_the_accepted_ones(peft_type):
    with pytest.raises(AdapterFormatError) as caught:
        kind_for_config({"peft_type": peft_type})
    assert caught.value.param == "peft_type"
    accepted = ["BOTTLENECK", "IA3", "LORA", "PREFIX_TUNING", "PROMPT_TUNING"]
    assert str(caught.value) == f"peft_type: expected one of {accepted}, got {peft_type!r}"


def test_every_adapter_kind_has_one_registered_class():
    assert sorted(k.kind.value for k in KINDS) == sorted(k.value for k in AdapterKind)
    assert all(kind_for(k.kind) is k for k in KINDS)
    assert {k.kind for k in KINDS if k.uses_slot_ids} == {
        AdapterKind.LORA,
        AdapterKind.SERIES,
        AdapterKind.PARALLEL,
        AdapterKind.IA3,
    }


# --- specs by hand -----------------------------------------------------------------------------


def module_spec(kind: AdapterKind, fp: BaseFingerprint, modules: dict, rank: int) -> AdapterSpec:
    targets = tuple(sorted({t for _, t in modules}))
    return AdapterSpec(kind.value, kind, fp, rank, targets, MappingProxyType(modules))


def bottleneck(fp: BaseFingerprint, target: str, placement: str, rank: int = 2):
    d_in, d_out = adapter_io(fp, target, placement)
    return BottleneckWeights(
        torch.randn(rank, d_in), torch.randn(d_out, rank), 0.5, Activation.TANH, placement
    )


def modules_of(kind: AdapterKind, fp: BaseFingerprint) -> dict:
    """A few modules of `kind`, as its parser would place them."""
    lora = LoraWeights(torch.randn(2, 64), torch.randn(64, 2), 2.0)
    return {
        AdapterKind.LORA: lambda: {(0, "q"): lora},
        AdapterKind.SERIES: lambda: {
            (0, "gate"): bottleneck(fp, "gate", "input"),
            (1, "down"): bottleneck(fp, "down", "output"),
        },
        AdapterKind.PARALLEL: lambda: {(1, "v"): bottleneck(fp, "v", "parallel")},
        AdapterKind.IA3: lambda: {
            (0, "k"): IA3Weights(torch.rand(fp.kv_dim), "output"),
            (1, "down"): IA3Weights(torch.rand(128), "input"),
        },
    }[kind]()


def spec_of(kind: AdapterKind, fp: BaseFingerprint) -> AdapterSpec:
    if kind is AdapterKind.PREFIX:
        kv = torch.randn(fp.num_layers, 2, NUM_VIRTUAL, fp.num_kv_heads, fp.head_dim)
        return AdapterSpec(
            "prefix",
            kind,
            fp,
            0,
            (),
            MappingProxyType({}),
            prefix_kv=kv,
            num_virtual_tokens=NUM_VIRTUAL,
        )
    if kind is AdapterKind.PROMPT:
        embeds = torch.randn(NUM_VIRTUAL, fp.hidden_size)
        return AdapterSpec(
            "prompt",
            kind,
            fp,
            0,
            (),
            MappingProxyType({}),
            prompt_embeddings=embeds,
            num_virtual_tokens=NUM_VIRTUAL,
        )
    rank = 0 if kind is AdapterKind.IA3 else 2
    return module_spec(kind, fp, modules_of(kind, fp), rank)


class RecordingCache:
    """A KVCacheWriter that records what an admission step writes."""

    def __init__(self) -> None:
        self.writes: list[tuple[torch.Tensor, torch.Tensor]] = []

    def write_all_layers(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        self.writes.append((slots, kv))


@pytest.fixture
def pool(fingerprint: BaseFingerprint) -> AdapterPool:
    return AdapterPool(fingerprint, 3, 4, "cpu", torch.float32)


# --- pool placement ----------------------------------------------------------------------------

QKV = ("q", "k", "v")
STACKS = {  # post and post_scale stacks are per projection site (q|k|v fused), the others per target
    AdapterKind.LORA: {"post": [(0, QKV)]},
    AdapterKind.SERIES: {"series_in": [(0, "gate")], "series_out": [(1, "down")]},
    AdapterKind.PARALLEL: {"post": [(1, QKV)]},
    AdapterKind.IA3: {"post_scale": [(0, QKV)], "ia3_in": [(1, "down")]},
    AdapterKind.PREFIX: {},
    AdapterKind.PROMPT: {},
}


def placed(pool: AdapterPool, layer: int, target: str, placement: str):
    """(stack, slice index, first column) where a target's weights of `placement` went (these
    ranks all fall in the smallest rank class)."""
    if placement in ("parallel", "scale"):
        site = SITE_OF[target]
        table = pool.post if placement == "parallel" else pool.post_scale
        sizes = [pool.fingerprint.in_out(t)[1] for t in site]
        i = site.index(target)
        found = table[(layer, site)]
        return (found if placement == "scale" else found.stacks()[0]), i, sum(sizes[:i])
    table = {"input": pool.series_in, "output": pool.series_out, "ia3_in": pool.ia3_in}[placement]
    found = table[(layer, target)]
    return (found if placement == "ia3_in" else found.stacks()[0]), 0, 0


@pytest.mark.parametrize("kind", list(AdapterKind), ids=lambda k: k.value)
def test_load_places_each_module_in_its_kinds_stack(pool: AdapterPool, fingerprint, kind):
    spec = spec_of(kind, fingerprint)
    kind_for(kind).load(pool, 1, spec)
    assert pool.kind_of(1) is kind and pool.names[1] == spec.name
    loaded = {
        name: sorted(key for key, stack in getattr(pool, name).items() if 1 in stack.loaded)
        for name in ("post", "series_in", "series_out", "ia3_in", "post_scale")
    }
    assert {name: keys for name, keys in loaded.items() if keys} == STACKS[kind]
    for (layer, target), weights in spec.modules.items():
        if isinstance(weights, LoraWeights):
            stack, i, _ = placed(pool, layer, target, "parallel")
            assert torch.equal(stack.a[i, 1, :2], weights.a)
            assert torch.equal(stack.b[i, 1, :2, : weights.b.shape[0]], weights.b.t())
        elif isinstance(weights, IA3Weights):
            where = "ia3_in" if weights.placement == "input" else "scale"
            stack, _, start = placed(pool, layer, target, where)
            got = stack.vectors[1, start : start + weights.vector.shape[0]]
            assert torch.equal(got, weights.vector)
        else:
            stack, i, _ = placed(pool, layer, target, weights.placement)
            assert torch.equal(stack.b[i, 1, :2, : weights.up.shape[0]], weights.up.t())
            assert int(stack.activations[i, 1]) == Activation.TANH
    assert (pool.prefix_kv[1] is not None) == (kind is AdapterKind.PREFIX)
    assert (pool.prompt_embeddings[1] is not None) == (kind is AdapterKind.PROMPT)


@pytest.mark.parametrize(
    "kind,modules",
    [
        (AdapterKind.SERIES, lambda fp: {(0, "q"): bottleneck(fp, "q", "parallel")}),
        (AdapterKind.SERIES, lambda fp: {(0, "down"): bottleneck(fp, "down", "input")}),
        (AdapterKind.PARALLEL, lambda fp: {(0, "up"): bottleneck(fp, "up", "input")}),
        (AdapterKind.LORA, lambda fp: {(0, "k"): IA3Weights(torch.ones(32), "output")}),
        (
            AdapterKind.IA3,
            lambda fp: {(0, "q"): LoraWeights(torch.ones(2, 64), torch.ones(64, 2), 1.0)},
        ),
        (AdapterKind.PREFIX, lambda fp: {(0, "k"): IA3Weights(torch.ones(32), "output")}),
    ],
    ids=[
        "series-parallel-placement",
        "series-down-input",
        "parallel-input",
        "lora-ia3-weights",
        "ia3-lora-weights",
        "prefix-with-modules",
    ],
)
def test_weights_the_kind_does_not_place_are_refused_untouched(pool, fingerprint, kind, modules):
    kind_for(AdapterKind.LORA).load(pool, 2, spec_of(AdapterKind.LORA, fingerprint))
    with pytest.raises(ValueError):
        kind_for(kind).load(pool, 2, module_spec(kind, fingerprint, modules(fingerprint), 2))
    assert pool.kind_of(2) is AdapterKind.LORA and 2 in pool.post[0, QKV].loaded


# --- binding and admission ---------------------------------------------------------------------


# kind -> (the slot id its tokens carry, the Binding field holding the slot's pool tensor)
BINDINGS = {
    AdapterKind.LORA: (1, None),
    AdapterKind.SERIES: (1, None),
    AdapterKind.PARALLEL: (1, None),
    AdapterKind.IA3: (1, None),
    AdapterKind.PREFIX: (-1, "prefix_kv"),
    AdapterKind.PROMPT: (-1, "virtual_embeds"),
}


@pytest.mark.parametrize("kind", list(AdapterKind), ids=lambda k: k.value)
def test_bind_and_admit(pool: AdapterPool, fingerprint, kind):
    """Hook kinds bind their slot id; prefix and prompt tuning bind their virtual tokens and the
    slot's tensor; only prefix tuning writes at admission (its K/V at the given slots)."""
    spec = spec_of(kind, fingerprint)
    kind_for(kind).load(pool, 1, spec)
    slot_id, field = BINDINGS[kind]
    binding = kind_for(kind).bind(pool, 1, spec.num_virtual_tokens)
    assert (binding.slot_id, binding.num_virtual) == (slot_id, spec.num_virtual_tokens)
    held = {"prefix_kv": pool.prefix_kv[1], "virtual_embeds": pool.prompt_embeddings[1]}
    for name, tensor in held.items():
        assert getattr(binding, name) is (tensor if name == field else None), name
    cache, slots = RecordingCache(), torch.arange(8, 8 + binding.num_virtual)
    kind_for(kind).admit(binding, cache, slots)
    written = [(s is slots, kv is pool.prefix_kv[1]) for s, kv in cache.writes]
    assert written == ([(True, True)] if kind is AdapterKind.PREFIX else [])


def test_binding_defaults_to_the_base_model():
    binding = Binding()
    assert (binding.slot_id, binding.num_virtual) == (-1, 0)
    assert binding.prefix_kv is None and binding.virtual_embeds is None


def test_the_step_path_imports_without_parsing_dependencies():
    """The benchmark device image has torch and triton only: the pool, the kinds and the
    scheduler must import without re2 or safetensors (parsing imports them when it runs)."""
    code = (
        "import sys\n"
        "for name in ('re2', 'safetensors', 'pydantic', 'fastapi'): sys.modules[name] = None\n"
        "import adapterserve.adapters.pool, adapterserve.adapters.hooks, adapterserve.adapters.kinds, adapterserve.server.engine.scheduler\n"
        "print('IMPORTED')\n"
    )
    done = subprocess.run(
        [sys.executable, "-P", "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
        timeout=120,
    )
    assert "IMPORTED" in done.stdout, done.stderr[-2000:]

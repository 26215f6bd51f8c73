"""Random adapters of every kind, shaped like what adapters.formats parses, for benchmarks that
build an AdapterPool directly (no files): bench_kernels' end-to-end runs."""

from __future__ import annotations

import torch

from adapterserve.kernels.reference import Activation


def fingerprint_of(model_args):
    from adapterserve.adapters.spec import BaseFingerprint

    a = model_args
    return BaseFingerprint(
        hidden_size=a.dim,
        num_layers=a.n_layers,
        num_heads=a.n_heads,
        num_kv_heads=a.n_kv_heads,
        head_dim=a.head_dim,
        intermediate_size=a.intermediate_size,
        vocab_size=a.vocab_size,
    )


def random_spec(
    name: str,
    kind: str,
    fingerprint,
    rank: int,
    num_virtual: int,
    seed: int,
    lora_targets: tuple[str, ...] | None = None,
):
    """A random AdapterSpec of `kind`, shaped like what the format parsers produce:
    lora on `lora_targets` (default: all seven projections); series bottleneck on gate/up
    (input side) and down (output side); parallel bottleneck on gate, up and down; IA3 on k, v
    (output) and down (input);
    prefix K/V and prompt embeddings of `num_virtual` tokens. Weights are small (std 0.02) so
    deltas are comparable to the random base's activations."""
    from adapterserve.adapters.spec import (
        TARGETS,
        AdapterKind,
        AdapterSpec,
        BottleneckWeights,
        IA3Weights,
        LoraWeights,
        adapter_io,
    )

    g = torch.Generator().manual_seed(seed)
    fp, kind = fingerprint, AdapterKind(kind)

    def randn(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def bottleneck(target: str, placement: str) -> BottleneckWeights:
        d_in, d_out = adapter_io(fp, target, placement)
        return BottleneckWeights(
            randn(rank, d_in), randn(d_out, rank), 1.0, Activation.TANH, placement
        )

    per_layer = {
        AdapterKind.LORA: lambda: {
            t: LoraWeights(randn(rank, fp.in_out(t)[0]), randn(fp.in_out(t)[1], rank), 2.0)
            for t in lora_targets or TARGETS
        },
        AdapterKind.SERIES: lambda: {
            "gate": bottleneck("gate", "input"),
            "up": bottleneck("up", "input"),
            "down": bottleneck("down", "output"),
        },
        AdapterKind.PARALLEL: lambda: {
            t: bottleneck(t, "parallel") for t in ("gate", "up", "down")
        },
        AdapterKind.IA3: lambda: {
            "k": IA3Weights(1 + randn(fp.kv_dim, std=0.3), "output"),
            "v": IA3Weights(1 + randn(fp.kv_dim, std=0.3), "output"),
            "down": IA3Weights(1 + randn(fp.intermediate_size, std=0.3), "input"),
        },
    }
    modules, prefix_kv, prompt, nvt = {}, None, None, 0
    if kind in per_layer:
        for layer in range(fp.num_layers):
            modules.update({(layer, t): w for t, w in per_layer[kind]().items()})
    elif kind is AdapterKind.PREFIX:
        nvt = num_virtual
        prefix_kv = randn(fp.num_layers, 2, nvt, fp.num_kv_heads, fp.head_dim, std=1.0)
    else:
        nvt, prompt = num_virtual, randn(num_virtual, fp.hidden_size, std=1.0)
    ranked = kind in (AdapterKind.LORA, AdapterKind.SERIES, AdapterKind.PARALLEL)
    targets = tuple(sorted({t for _, t in modules}))
    return AdapterSpec(
        name, kind, fp, rank if ranked else 0, targets, modules, prefix_kv, prompt, nvt
    )

"""Public adapter and attention ops. The one place that picks an implementation.

ADAPTERSERVE_KERNELS=triton|reference forces a path; unset, CUDA tensors go through Triton
(when it is installed) and CPU tensors through the PyTorch reference. Triton on CPU tensors
needs TRITON_INTERPRET=1 (set before triton is first imported). triton is imported lazily, so
`import adapterserve.kernels` works without it.

`ops_for(device)` resolves the choice once (an engine does this when it is built) into an
`Ops` table whose functions torch.compile traces without a graph break: the reference adapter
ops are plain traceable torch code (inductor fuses them), while the Triton launches, the paged
attention (whose reference gathers a data-sized key range) and the in-place KV cache write are
registered custom ops (`torch.library`), opaque to the compiler. Run eagerly (not while
dynamo traces), `Ops` calls their implementations directly: a custom op's dispatch, paid per
call over 30 layers' attention and cache writes, is a visible share of an eager CPU step
(BENCHMARKS.md, 'Figures quoted from the code' and the eager custom-op bypass rerun in
'Quantized base: fp32 vs int8 vs int4 (issue 14)'). The module-level functions
(`kernels.add_delta`, ...) dispatch at every call, for tests and tools.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from adapterserve.kernels import reference
from adapterserve.kernels.batch import AdapterBatch, DeltaWeights, Segment, runs
from adapterserve.kernels.reference import Activation, attend, gather_kv, rows_mm

__all__ = [
    "Activation",
    "AdapterBatch",
    "DeltaWeights",
    "Ops",
    "Segment",
    "add_delta",
    "attend",
    "gather_kv",
    "ia3_scale",
    "ops_for",
    "paged_decode_attention",
    "rows_mm",
    "runs",
    "use_triton",
    "write_kv",
]


@functools.cache
def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except ValueError:  # sys.modules["triton"] is None: imports of it are blocked
        return False


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on `tensor` runs the Triton kernel (read at each call: tests flip the env)."""
    return _triton_for(tensor.device.type)


def _triton_for(device_type: str) -> bool:
    choice = os.environ.get("ADAPTERSERVE_KERNELS", "").strip().lower()
    if choice not in ("", "triton", "reference"):
        raise ValueError(f"ADAPTERSERVE_KERNELS must be 'triton' or 'reference', got {choice!r}")
    if choice == "reference" or (choice == "" and device_type != "cuda"):
        return False
    if not _triton_installed():
        if choice == "triton":
            raise RuntimeError("ADAPTERSERVE_KERNELS=triton but triton is not installed")
        return False
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("ADAPTERSERVE_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1")
    return True


def _triton(module: str, name: str) -> Callable:
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


# ---------------------------------------------------------------- custom ops


@torch.library.custom_op("adapterserve::paged_decode_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    triton: bool,
) -> torch.Tensor:
    impl = (
        _triton("attention", "paged_decode_attention")
        if triton
        else reference.paged_decode_attention
    )
    return impl(q, k_cache, v_cache, block_tables, context_lens, scale)


@_attention_op.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, scale, triton):
    return torch.empty_like(q)


@torch.library.custom_op("adapterserve::write_kv", mutates_args=("k_cache", "v_cache"))
def _write_kv_op(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    reference.write_kv(k_cache, v_cache, slots, k, v)


@_write_kv_op.register_fake
def _(k_cache, v_cache, slots, k, v):
    return None


@torch.library.custom_op("adapterserve::add_delta_triton", mutates_args=("y",))
def _add_delta_triton_op(
    y: torch.Tensor,
    u: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    activations: torch.Tensor,
    has_activation: bool,
    slot_ids: torch.Tensor,
    num_decode: int,
    segments: list[int],
    rows: torch.Tensor | None,
    offsets: list[int],
    sizes: list[int],
) -> None:
    weights = DeltaWeights(a, b, ranks, scalings, activations, (1,) if has_activation else ())
    batch = _triton_batch(slot_ids, num_decode, segments, rows)
    _triton("bottleneck", "add_delta")(y, u, weights, batch, offsets, sizes)


@_add_delta_triton_op.register_fake
def _(
    y,
    u,
    a,
    b,
    ranks,
    scalings,
    activations,
    has_activation,
    slot_ids,
    num_decode,
    segments,
    rows,
    offsets,
    sizes,
):
    return None


@torch.library.custom_op("adapterserve::ia3_scale_triton", mutates_args=())
def _ia3_triton_op(x: torch.Tensor, vectors: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    return _triton("ia3", "ia3_scale")(x, vectors, _triton_batch(slot_ids, 0, [], None))


@_ia3_triton_op.register_fake
def _(x, vectors, slot_ids):
    return torch.empty_like(x)


def _triton_batch(
    slot_ids: torch.Tensor, num_decode: int, segments: list[int], rows: torch.Tensor | None
) -> AdapterBatch:
    """The AdapterBatch fields the Triton kernels read, rebuilt inside a custom op (whose
    arguments must be tensors and plain values): segments come flattened (slot, start, count)."""
    triples = tuple(tuple(segments[i : i + 3]) for i in range(0, len(segments), 3))
    no_columns = slot_ids.new_zeros((num_decode, 0), dtype=torch.float32)  # only its rows count
    return AdapterBatch.assemble(slot_ids, no_columns, no_columns, triples, rows)  # type: ignore[arg-type]


def _flat(segments: Sequence[Segment]) -> list[int]:
    return [value for segment in segments for value in segment]


# ---------------------------------------------------------------- the op table


@dataclass(frozen=True)
class Ops:
    """The adapter and attention ops of one implementation (see the module docstring)."""

    triton: bool

    def add_delta(
        self,
        y: torch.Tensor,
        u: torch.Tensor,
        weights: DeltaWeights,
        batch: AdapterBatch,
        y_offsets: Sequence[int] = (0,),
        y_slice_sizes: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """See kernels.reference.add_delta (in place on y, returned)."""
        if not self.triton:
            return reference.add_delta(y, u, weights, batch, y_offsets, y_slice_sizes)
        n = weights.b.shape[0]
        sizes = list(y_slice_sizes) if y_slice_sizes is not None else [weights.b.shape[-1]] * n
        if not torch.compiler.is_compiling():
            _triton("bottleneck", "add_delta")(y, u, weights, batch, list(y_offsets), sizes)
            return y
        _add_delta_triton_op(
            y,
            u,
            weights.a,
            weights.b,
            weights.ranks,
            weights.scalings,
            weights.activations,
            bool(weights.codes),
            batch.slot_ids,
            batch.num_decode,
            _flat(batch.segments),
            batch.rows,
            list(y_offsets),
            sizes,
        )
        return y

    def ia3_scale(
        self,
        x: torch.Tensor,
        vectors: torch.Tensor,
        batch: AdapterBatch,
        loaded: frozenset[int] | set[int] | None = None,
    ) -> torch.Tensor:
        """See kernels.reference.ia3_scale."""
        if not self.triton:
            return reference.ia3_scale(x, vectors, batch, loaded)
        if not torch.compiler.is_compiling():
            return _triton("ia3", "ia3_scale")(x, vectors, batch)
        return _ia3_triton_op(x, vectors, batch.slot_ids)

    def paged_decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """See kernels.reference.paged_decode_attention."""
        if not torch.compiler.is_compiling():
            impl = (
                _triton("attention", "paged_decode_attention")
                if self.triton
                else reference.paged_decode_attention
            )
            return impl(q, k_cache, v_cache, block_tables, context_lens, scale)
        return _attention_op(q, k_cache, v_cache, block_tables, context_lens, scale, self.triton)

    def write_kv(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """See kernels.reference.write_kv."""
        if not torch.compiler.is_compiling():
            reference.write_kv(k_cache, v_cache, slots, k, v)
        else:
            _write_kv_op(k_cache, v_cache, slots, k, v)


def ops_for(device: torch.device | str) -> Ops:
    """The op table for tensors on `device`, as ADAPTERSERVE_KERNELS and the device choose."""
    return Ops(_triton_for(torch.device(device).type))


def add_delta(y: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return ops_for(y.device).add_delta(y, *args, **kwargs)


def ia3_scale(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return ops_for(x.device).ia3_scale(x, *args, **kwargs)


def paged_decode_attention(q: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return ops_for(q.device).paged_decode_attention(q, *args, **kwargs)


def write_kv(k_cache: torch.Tensor, *args, **kwargs) -> None:
    ops_for(k_cache.device).write_kv(k_cache, *args, **kwargs)

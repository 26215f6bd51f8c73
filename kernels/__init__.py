"""Public adapter and attention ops. The one place that picks an implementation.

ADAPTERSERVE_KERNELS=triton|reference forces a path; unset, CUDA tensors go through Triton
(when it is installed) and CPU tensors through the PyTorch reference. Triton on CPU tensors
needs TRITON_INTERPRET=1 (set before triton is first imported). triton is imported lazily, so
`import kernels` works without it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable

import torch

from kernels import reference
from kernels.reference import Activation, gather_kv
from kernels.segments import Segments, segments

__all__ = [
    "Activation",
    "Segments",
    "add_delta",
    "bottleneck",
    "gather_kv",
    "ia3_scale",
    "lora_expand",
    "lora_shrink",
    "paged_decode_attention",
    "segments",
    "use_triton",
]


@functools.cache
def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except ValueError:  # sys.modules["triton"] is None: imports of it are blocked
        return False


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on `tensor` runs the Triton kernel (read at each call: tests flip the env)."""
    choice = os.environ.get("ADAPTERSERVE_KERNELS", "").strip().lower()
    if choice not in ("", "triton", "reference"):
        raise ValueError(f"ADAPTERSERVE_KERNELS must be 'triton' or 'reference', got {choice!r}")
    if choice == "reference" or (choice == "" and not tensor.is_cuda):
        return False
    if not _triton_installed():
        if choice == "triton":
            raise RuntimeError("ADAPTERSERVE_KERNELS=triton but triton is not installed")
        return False
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("ADAPTERSERVE_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1")
    return True


def _dispatch(module: str, name: str) -> Callable:
    """`name` from kernels/<module>.py (imported on first Triton use) or from the reference."""
    ref = getattr(reference, name)

    @functools.wraps(ref)
    def op(first: torch.Tensor, *args, **kwargs):
        if use_triton(first):
            return getattr(importlib.import_module(f"kernels.{module}"), name)(first, *args, **kwargs)
        return ref(first, *args, **kwargs)

    return op


lora_shrink = _dispatch("lora", "lora_shrink")
lora_expand = _dispatch("lora", "lora_expand")
bottleneck = _dispatch("bottleneck", "bottleneck")
add_delta = _dispatch("bottleneck", "add_delta")
ia3_scale = _dispatch("ia3", "ia3_scale")
paged_decode_attention = _dispatch("attention", "paged_decode_attention")

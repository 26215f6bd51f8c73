"""Public adapter and attention ops. The one place that picks an implementation.

Only the PyTorch reference exists so far; the Triton kernels (issue: Triton kernels) plug in here.
"""

from kernels.reference import gather_kv, paged_decode_attention

__all__ = ["gather_kv", "paged_decode_attention"]

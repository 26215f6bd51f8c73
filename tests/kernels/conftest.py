"""Kernel tests run Triton on CPU through its interpreter; this must precede any triton import."""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _has_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except ValueError:  # sys.modules["triton"] is None: imports of it are blocked
        return False


HAS_TRITON = _has_triton()


@pytest.fixture
def triton_module():
    """Import kernels.<name> (a Triton file), or skip the test when triton is not installed."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed: Triton kernels untested (reference tests still run)")
    return lambda name: importlib.import_module(f"adapterserve.kernels.{name}")


@pytest.fixture
def poison_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.empty / empty_like return NaN-filled floats, so any element a kernel fails to write
    shows up as NaN (assert_close rejects NaN unless equal_nan)."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(empty_like(*a, **k)))

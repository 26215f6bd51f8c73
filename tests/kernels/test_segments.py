"""segments(): slot ids -> tokens grouped by slot, checked against a plain Python grouping."""

from __future__ import annotations

import pytest
import torch

from kernels.segments import segments
from tests.kernels.helpers import PATTERNS, slot_ids_for


def test_docstring_example() -> None:
    segs = segments(torch.tensor([2, -1, 0, 2, 0], dtype=torch.int32))
    assert segs.order.tolist() == [2, 4, 0, 3]
    assert segs.slots.tolist() == [0, 2]
    assert segs.counts.tolist() == [2, 2]
    assert segs.starts.tolist() == [0, 2]
    assert (segs.num_segments, segs.max_count) == (2, 2)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_matches_python_grouping(pattern: str, dtype: torch.dtype) -> None:
    slot_ids = slot_ids_for(pattern, 29, 5, torch.Generator().manual_seed(0)).to(dtype)
    groups: dict[int, list[int]] = {}
    for t, s in enumerate(slot_ids.tolist()):
        if s >= 0:
            groups.setdefault(s, []).append(t)  # tokens in their original order: a stable sort
    segs = segments(slot_ids)
    assert segs.slots.tolist() == sorted(groups)
    assert segs.order.tolist() == [t for s in sorted(groups) for t in groups[s]]
    assert segs.counts.tolist() == [len(groups[s]) for s in sorted(groups)]
    for start, count, slot in zip(
        segs.starts.tolist(), segs.counts.tolist(), segs.slots.tolist(), strict=True
    ):
        assert (slot_ids[segs.order[start : start + count]] == slot).all()
    assert segs.max_count == max((len(g) for g in groups.values()), default=0)


@pytest.mark.parametrize("slot_ids", [[], [-1, -1, -1]], ids=["no_tokens", "all_base"])
def test_no_adapter_tokens_give_no_segments(slot_ids: list[int]) -> None:
    segs = segments(torch.tensor(slot_ids, dtype=torch.int32))
    assert segs.order.numel() == segs.num_segments == segs.max_count == 0
    assert segs.order.dtype == segs.slots.dtype == torch.int64


def test_is_frozen() -> None:
    segs = segments(torch.tensor([0], dtype=torch.int32))
    with pytest.raises(AttributeError):
        segs.max_count = 3  # type: ignore[misc]

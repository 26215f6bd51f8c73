"""Summaries, SLO attainment, ratios and target specs, on hand-made results."""

from __future__ import annotations

import pytest

from adapterserve.loadtest.client import RequestResult, Target
from adapterserve.loadtest.report import Slo, ratios, summarize


def result(
    index: int, status: str = "completed", ttft: float = 0.1, e2e: float = 1.0
) -> RequestResult:
    return RequestResult(
        index,
        "m",
        status=status,
        ttft_s=ttft if status == "completed" else None,
        e2e_s=e2e if status == "completed" else None,
        itl_s=[0.1] * 9 if status == "completed" else [],
        output_tokens=10 if status == "completed" else 0,
        prompt_tokens=5,
        requested_input=5,
    )


def test_summary_counts_throughput_and_slo() -> None:
    results = [result(0), result(1, ttft=2.0, e2e=3.0), result(2, "failed"), result(3, "rejected")]
    run = summarize(results, duration_s=2.0, slo=Slo(ttft_s=1.0))
    assert run["requests"] == {"sent": 4, "completed": 2, "failed": 1, "rejected": 1}
    assert run["throughput"]["requests_per_s"] == 1.0
    assert run["throughput"]["output_tokens_per_s"] == 10.0
    assert run["throughput"]["total_tokens_per_s"] == 15.0  # prompt tokens count
    assert run["latency"]["tpot_s"]["mean"] == pytest.approx(
        ((1.0 - 0.1) / 9 + (3.0 - 2.0) / 9) / 2
    )
    assert run["latency"]["itl_s"]["count"] == 18
    assert run["slo"]["attainment"] == 0.25  # only request 0: TTFT 0.1 <= 1; failures miss


def test_ratios_are_first_over_other() -> None:
    runs = [
        {"target": {"label": "ours"}, "throughput": {"requests_per_s": 4.0}},
        {"target": {"label": "peft"}, "throughput": {"requests_per_s": 0.5}},
    ]
    table = ratios(runs)
    assert table["peft"]["throughput.requests_per_s"] == 8.0
    assert table["peft"]["latency.ttft_s.mean"] is None  # absent on both: no ratio


def test_target_specs() -> None:
    assert Target.parse("http://h:1/") == Target("http://h:1", "http://h:1", False)
    assert Target.parse("base=http://h:1#base-only") == Target("http://h:1", "base", True)
    with pytest.raises(ValueError, match="expected a target"):
        Target.parse("h:1")

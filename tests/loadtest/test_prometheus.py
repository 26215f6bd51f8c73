"""Prometheus text parsing and the adapter metrics derived from two scrapes."""

from __future__ import annotations

from adapterserve.loadtest.prometheus import MetricNames, adapter_metrics, parse_prometheus, total

BEFORE = """\
# HELP adapterserve_adapter_loads_total Adapter loads
# TYPE adapterserve_adapter_loads_total counter
adapterserve_adapter_loads_total{source="disk"} 2.0
adapterserve_adapter_loads_total{source="host"} 1.0
adapterserve_adapter_acquires_total{result="hit"} 10.0
adapterserve_adapter_acquires_total{result="miss"} 3.0
adapterserve_step_distinct_adapters_sum 40.0
adapterserve_step_distinct_adapters_count 20.0
adapterserve_step_distinct_adapters_bucket{le="+Inf"} 20.0
weird line without value
escaped{path="a\\"b",x="1"} 7 1700000000000
"""
AFTER = (
    BEFORE.replace('source="disk"} 2.0', 'source="disk"} 6.0')
    .replace('result="hit"} 10.0', 'result="hit"} 25.0')
    .replace('result="miss"} 3.0', 'result="miss"} 8.0')
    .replace("distinct_adapters_sum 40.0", "distinct_adapters_sum 100.0")
    .replace("distinct_adapters_count 20.0", "distinct_adapters_count 40.0")
)


def test_parse_prometheus_text() -> None:
    samples = parse_prometheus(BEFORE)
    assert total(samples, "adapterserve_adapter_loads_total") == 3.0
    assert total(samples, "adapterserve_adapter_loads_total", source="host") == 1.0
    assert samples["escaped"] == [({"path": 'a"b', "x": "1"}, 7.0)]
    assert samples["adapterserve_step_distinct_adapters_bucket"][0][0] == {"le": "+Inf"}
    assert "weird" not in samples
    assert total(samples, "absent") is None


def test_adapter_metrics_are_deltas_over_the_run() -> None:
    metrics = adapter_metrics(parse_prometheus(BEFORE), parse_prometheus(AFTER), MetricNames())
    assert metrics["distinct_adapters_per_step"]["value"] == 3.0  # (100 - 40) / (40 - 20)
    assert metrics["adapter_loads"]["value"] == 4.0
    assert metrics["cache_hit_rate"]["value"] == 15 / 20  # hits 15, misses 5


def test_absent_metrics_are_null_with_a_note() -> None:
    text = "adapterserve_requests_total 3\n"
    metrics = adapter_metrics(parse_prometheus(text), parse_prometheus(text), MetricNames())
    for entry in metrics.values():
        assert entry["value"] is None and entry["metric"] is None and "no" in entry["note"]


def test_separate_hit_and_miss_counters_are_found_by_pattern() -> None:
    before = "other_adapter_cache_hits_total 1\nother_adapter_cache_misses_total 1\n"
    after = "other_adapter_cache_hits_total 4\nother_adapter_cache_misses_total 2\n"
    metrics = adapter_metrics(parse_prometheus(before), parse_prometheus(after), MetricNames())
    assert metrics["cache_hit_rate"]["value"] == 3 / 4

"""Prometheus text exposition parsing and the adapter metrics a load-test report needs.

The server's metric names are configurable (`MetricNames`); when a configured name is absent,
the first family matching a fallback pattern is used, and when none matches the value is null
with a note saying so. Counters are read as the difference between a scrape before and after
the run, so earlier traffic does not leak into the report.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$"
)
LABEL = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse_prometheus(text: str) -> Samples:
    """Metric sample name -> [(labels, value)]; comments, blank and malformed lines skipped."""
    samples: Samples = defaultdict(list)
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        if match is None:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        labels = {
            m["key"]: bytes(m["value"], "utf-8").decode("unicode_escape")
            for m in LABEL.finditer(match["labels"] or "")
        }
        samples[match["name"]].append((labels, value))
    return dict(samples)


def total(samples: Samples, name: str, **labels: str) -> float | None:
    """Sum of a sample's values over label sets matching `labels`; None if absent."""
    if name not in samples:
        return None
    return sum(
        value
        for sample_labels, value in samples[name]
        if all(sample_labels.get(k) == v for k, v in labels.items())
    )


@dataclass(frozen=True)
class MetricNames:
    """Names (without _total/_sum/_count suffixes) of the server metrics the report reads.

    distinct_per_step: a histogram observed once per engine step with the number of distinct
    adapters in that step. loads: a counter of adapter loads into device slots.
    cache_lookups: a counter of admissions with an adapter, labelled result="hit" (already in
    a device slot) or "miss"; used when present, else separate cache_hits / cache_misses
    counters. Defaults are adapterserve's names.
    """

    distinct_per_step: str = "adapterserve_step_distinct_adapters"
    loads: str = "adapterserve_adapter_loads"
    cache_lookups: str = "adapterserve_adapter_acquires"
    cache_hits: str = "adapterserve_adapter_cache_hits"
    cache_misses: str = "adapterserve_adapter_cache_misses"


# Used only when a configured name is absent; `adapter(?!serve)` skips the adapterserve_ prefix.
FALLBACKS = {
    "distinct_per_step": re.compile(r"distinct_adapter|adapter(?!serve).*distinct"),
    "loads": re.compile(r"adapter(?!serve)\w*_loads?$"),
    "cache_hits": re.compile(r"adapter(?!serve)\w*_hits?$"),
    "cache_misses": re.compile(r"adapter(?!serve)\w*_miss(es)?$"),
}


def family(
    samples: Samples, configured: str, fallback: re.Pattern | None, suffix: str
) -> str | None:
    """The sample name to read: the configured family + suffix, else a fallback match."""
    for name in (configured + suffix, configured):
        if name in samples:
            return name
    if fallback is None:
        return None
    for name in sorted(samples):
        if name.endswith(suffix) and fallback.search(name.removesuffix(suffix)):
            return name
    return None


def counter_delta(before: Samples, after: Samples, name: str) -> float:
    return (total(after, name) or 0.0) - (total(before, name) or 0.0)


def adapter_metrics(before: Samples, after: Samples, names: MetricNames) -> dict[str, dict]:
    """distinct adapters per step (mean over the run's steps), adapter loads and cache hit
    rate during the run: each {"value": float | None, "metric": name | None, "note": str}."""
    return {
        "distinct_adapters_per_step": _distinct(before, after, names),
        "adapter_loads": _loads(before, after, names),
        "cache_hit_rate": _hit_rate(before, after, names),
    }


def _absent(what: str) -> dict:
    return {"value": None, "metric": None, "note": f"server /metrics has no {what} metric"}


def _distinct(before: Samples, after: Samples, names: MetricNames) -> dict:
    pattern = FALLBACKS["distinct_per_step"]
    sum_name = family(after, names.distinct_per_step, pattern, "_sum")
    count_name = family(after, names.distinct_per_step, pattern, "_count")
    if sum_name is None or count_name is None:
        gauge = family(after, names.distinct_per_step, pattern, "")
        if gauge is None:
            return _absent("distinct-adapters-per-step")
        return {"value": total(after, gauge), "metric": gauge, "note": "gauge at run end"}
    steps = counter_delta(before, after, count_name)
    if steps <= 0:
        return {"value": None, "metric": sum_name, "note": "no engine steps during the run"}
    mean = counter_delta(before, after, sum_name) / steps
    return {"value": mean, "metric": sum_name, "note": "mean over the run's engine steps"}


def _loads(before: Samples, after: Samples, names: MetricNames) -> dict:
    name = family(after, names.loads, FALLBACKS["loads"], "_total")
    if name is None:
        return _absent("adapter-loads")
    return {"value": counter_delta(before, after, name), "metric": name, "note": "during the run"}


def _hit_rate(before: Samples, after: Samples, names: MetricNames) -> dict:
    lookups = family(after, names.cache_lookups, None, "_total")
    if lookups is not None:
        hits = _labelled(before, after, lookups, "hit")
        misses = counter_delta(before, after, lookups) - hits
        metric = f'{lookups}{{result="hit"|"miss"}}'
    else:
        hits_name = family(after, names.cache_hits, FALLBACKS["cache_hits"], "_total")
        misses_name = family(after, names.cache_misses, FALLBACKS["cache_misses"], "_total")
        if hits_name is None or misses_name is None:
            return _absent("adapter cache hit/miss")
        hits = counter_delta(before, after, hits_name)
        misses = counter_delta(before, after, misses_name)
        metric = f"{hits_name} / ({hits_name} + {misses_name})"
    if hits + misses <= 0:
        return {"value": None, "metric": metric, "note": "no adapter lookups during the run"}
    return {"value": hits / (hits + misses), "metric": metric, "note": "during the run"}


def _labelled(before: Samples, after: Samples, name: str, result: str) -> float:
    return (total(after, name, result=result) or 0.0) - (total(before, name, result=result) or 0.0)

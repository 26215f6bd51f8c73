"""Turn per-request results into the BENCHMARKS.md metrics, print tables, compute ratios."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.table import Table

from adapterserve.loadtest.client import RequestResult

LATENCIES = ("ttft_s", "tpot_s", "itl_s", "e2e_s")
# metric path -> higher is better? (for ratio wording)
RATIO_METRICS = {
    "throughput.requests_per_s": True,
    "throughput.output_tokens_per_s": True,
    "throughput.total_tokens_per_s": True,
    "latency.ttft_s.mean": False,
    "latency.ttft_s.p99": False,
    "latency.tpot_s.mean": False,
    "latency.e2e_s.mean": False,
    "slo.attainment": True,
}


@dataclass(frozen=True)
class Slo:
    """Per-request thresholds in seconds; None = not checked. A request attains the SLO when
    it completed and met every set threshold; failed and rejected requests miss it."""

    ttft_s: float | None = 6.0
    tpot_s: float | None = None
    e2e_s: float | None = None

    def met(self, result: RequestResult) -> bool:
        if result.status != "completed":
            return False
        checks = (
            (self.ttft_s, result.ttft_s),
            (self.tpot_s, result.tpot_s),
            (self.e2e_s, result.e2e_s),
        )
        return all(
            limit is None or (value is not None and value <= limit) for limit, value in checks
        )


def stats(values: Sequence[float]) -> dict[str, float | None]:
    """mean, median, p90, p99 (linear interpolation); all None for no values."""
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None, "count": 0}
    p50, p90, p99 = np.percentile(np.asarray(values, dtype=float), [50, 90, 99])
    return {
        "mean": statistics.fmean(values),
        "median": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "count": len(values),
    }


def latency_values(results: Sequence[RequestResult], metric: str) -> list[float]:
    done = [r for r in results if r.status == "completed"]
    if metric == "itl_s":
        return [gap for r in done for gap in r.itl_s]
    return [v for r in done if (v := getattr(r, metric)) is not None]


def summarize(results: Sequence[RequestResult], duration_s: float, slo: Slo) -> dict:
    """Counts, throughput, latency stats and SLO attainment of one run."""
    done = [r for r in results if r.status == "completed"]
    statuses = Counter(r.status for r in results)
    output_tokens = sum(r.output_tokens for r in done)
    prompt_known = all(r.prompt_tokens is not None for r in done)
    prompt_tokens = sum((r.prompt_tokens if prompt_known else r.requested_input) or 0 for r in done)
    span = max(duration_s, 1e-9)
    errors = Counter(r.error for r in results if r.error)
    return {
        "requests": {
            "sent": len(results),
            "completed": statuses["completed"],
            "failed": statuses["failed"],
            "rejected": statuses["rejected"],
        },
        "duration_s": duration_s,
        "throughput": {
            "requests_per_s": len(done) / span,
            "output_tokens_per_s": output_tokens / span,
            "total_tokens_per_s": (output_tokens + prompt_tokens) / span,
            "total_tokens_include_prompt": True,
            "prompt_tokens_source": "server usage" if prompt_known else "requested input length",
            "output_tokens": output_tokens,
            "prompt_tokens": prompt_tokens,
        },
        "latency": {metric: stats(latency_values(results, metric)) for metric in LATENCIES},
        "slo": {
            "ttft_s": slo.ttft_s,
            "tpot_s": slo.tpot_s,
            "e2e_s": slo.e2e_s,
            "attainment": sum(slo.met(r) for r in results) / len(results) if results else None,
        },
        "errors": [{"error": e, "count": c} for e, c in errors.most_common(10)],
    }


def lookup(run: dict, path: str) -> float | None:
    value: object = run
    for key in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value if isinstance(value, (int, float)) else None


def ratios(runs: Sequence[dict]) -> dict[str, dict[str, float | None]]:
    """For every run after the first: first run's value / this run's value, per metric.
    On throughput > 1 means the first target is faster; on latency < 1 means it is faster."""
    reference = runs[0]
    table = {}
    for run in runs[1:]:
        row = {}
        for path in RATIO_METRICS:
            mine, theirs = lookup(reference, path), lookup(run, path)
            row[path] = mine / theirs if mine is not None and theirs else None
        table[run["target"]["label"]] = row
    return table


def _fmt(value: object, scale: float = 1.0, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value * scale:.{digits}f}"
    return str(value)


def print_run(run: dict, console: Console) -> None:
    """The one-run table: counts, throughput, latency percentiles (ms), SLO, adapter metrics."""
    req, tput, slo = run["requests"], run["throughput"], run["slo"]
    title = f"{run['target']['label']}  ({run['workload']['name']}, {run['workload']['num_adapters']} adapters)"
    table = Table(title=title, show_header=True)
    for column in ("metric", "mean", "median", "p90", "p99"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for metric in LATENCIES:
        s = run["latency"][metric]
        table.add_row(
            f"{metric[:-2].upper()} (ms)",
            *(_fmt(s[k], 1000, 1) for k in ("mean", "median", "p90", "p99")),
        )
    console.print(table)
    server = run["server_metrics"]
    console.print(
        f"sent {req['sent']}  completed {req['completed']}  failed {req['failed']}  "
        f"rejected {req['rejected']}  duration {run['duration_s']:.1f} s\n"
        f"{tput['requests_per_s']:.3f} req/s  {tput['output_tokens_per_s']:.1f} output tok/s  "
        f"{tput['total_tokens_per_s']:.1f} total tok/s (incl. prompt tokens)  "
        f"SLO attainment {_fmt(slo['attainment'])} (TTFT <= {slo['ttft_s']} s, "
        f"TPOT <= {slo['tpot_s']} s, e2e <= {slo['e2e_s']} s)\n"
        f"adapters registered {_fmt(run['adapters']['registered'])}  "
        + "  ".join(f"{k} {_fmt(v['value'])}" for k, v in server.items())
    )
    for error in run["errors"][:3]:
        console.print(f"  [red]{error['count']}x[/red] {error['error']}")


def print_ratios(
    table: dict[str, dict[str, float | None]], reference: str, console: Console
) -> None:
    if not table:
        return
    out = Table(
        title=f"ratios: {reference} / other (throughput > 1 and latency < 1 favour {reference})"
    )
    out.add_column("metric")
    for label in table:
        out.add_column(label, justify="right")
    for path in RATIO_METRICS:
        out.add_row(path, *(_fmt(row[path], digits=2) for row in table.values()))
    console.print(out)


def print_sweep(runs: Sequence[dict], console: Console) -> None:
    out = Table(title="sweep over the number of adapters")
    for column in (
        "target",
        "adapters",
        "req/s",
        "out tok/s",
        "mean TTFT ms",
        "p99 TTFT ms",
        "SLO",
    ):
        out.add_column(column, justify="right")
    for run in runs:
        ttft = run["latency"]["ttft_s"]
        out.add_row(
            run["target"]["label"],
            str(run["workload"]["num_adapters"]),
            _fmt(run["throughput"]["requests_per_s"]),
            _fmt(run["throughput"]["output_tokens_per_s"], digits=1),
            _fmt(ttft["mean"], 1000, 1),
            _fmt(ttft["p99"], 1000, 1),
            _fmt(run["slo"]["attainment"]),
        )
    console.print(out)

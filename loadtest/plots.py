"""PNG plots: latency CDFs per run, and throughput / TTFT against the number of adapters."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CDF_METRICS = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "end-to-end latency"))


def run_label(run: dict) -> str:
    return f"{run['target']['label']} ({run['workload']['num_adapters']} adapters)"


def plot_cdfs(runs: Sequence[dict], samples: Sequence[dict[str, list[float]]], path: Path) -> Path:
    """One panel per latency metric; one empirical CDF per run. `samples[i]` holds run i's
    raw per-request values in seconds."""
    fig, axes = plt.subplots(1, len(CDF_METRICS), figsize=(5 * len(CDF_METRICS), 4))
    for ax, (metric, title) in zip(axes, CDF_METRICS, strict=True):
        for run, values in zip(runs, samples, strict=True):
            data = np.sort(np.asarray(values.get(metric, []), dtype=float)) * 1000
            if data.size:
                ax.step(
                    data,
                    np.arange(1, data.size + 1) / data.size,
                    where="post",
                    label=run_label(run),
                )
        # log x: baselines can be orders of magnitude apart
        ax.set(title=title, xlabel="ms (log)", ylabel="fraction of requests", ylim=(0, 1.02))
        if ax.has_data():
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(runs: Sequence[dict], path: Path) -> Path:
    """Request throughput and mean / p99 TTFT against the number of adapters, per target."""
    by_target: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_target[run["target"]["label"]].append(run)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, points in by_target.items():
        points.sort(key=lambda r: r["workload"]["num_adapters"])
        n = [r["workload"]["num_adapters"] for r in points]
        (line,) = left.plot(
            n, [r["throughput"]["requests_per_s"] for r in points], "o-", label=label
        )
        color = line.get_color()  # one colour per target: mean solid, p99 dashed
        mean = [_ms(r["latency"]["ttft_s"]["mean"]) for r in points]
        p99 = [_ms(r["latency"]["ttft_s"]["p99"]) for r in points]
        right.plot(n, mean, "o-", color=color, label=f"{label} mean")
        right.plot(n, p99, "x--", color=color, label=f"{label} p99")
    left.set(title="throughput", xlabel="adapters", ylabel="req/s", xscale="log")
    right.set(title="TTFT", xlabel="adapters", ylabel="ms (log)", xscale="log", yscale="log")
    ticks = sorted({r["workload"]["num_adapters"] for r in runs})
    for ax in (left, right):
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ms(value: float | None) -> float:
    return float("nan") if value is None else value * 1000

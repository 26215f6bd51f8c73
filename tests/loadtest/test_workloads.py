"""Arrival, popularity and mix generators give the distributions BENCHMARKS.md states."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adapterserve.loadtest.workloads import (
    TraceConfig,
    build_trace,
    gamma_intervals,
    mix_adapters,
    mix_group_sizes,
    power_law_adapters,
    skewed_group_sizes,
)

SAMPLES = 5000


@pytest.mark.parametrize(("rate", "cv"), [(2.0, 1.0), (10.0, 0.5), (5.0, 2.0), (1.0, 4.0)])
def test_gamma_arrivals_have_the_rate_and_cv(rate: float, cv: float) -> None:
    gaps = gamma_intervals(np.random.default_rng(1), rate, cv, SAMPLES)
    # The mean gap has standard error (1/rate)·cv/sqrt(n); the sample std of a Gamma has
    # relative standard error ~ 0.5·sqrt((2 + excess kurtosis 6·cv²)/n) (delta method on s²).
    # Five standard errors: a correct generator fails with probability < 1e-6.
    mean_tolerance = 5 * cv / math.sqrt(SAMPLES)
    cv_tolerance = 5 * 0.5 * math.sqrt((2 + 6 * cv**2) / SAMPLES)
    assert abs(gaps.mean() * rate - 1) < mean_tolerance
    assert abs(gaps.std(ddof=1) / gaps.mean() / cv - 1) < cv_tolerance


def test_poisson_is_cv_one_and_infinite_rate_sends_at_once() -> None:
    gaps = gamma_intervals(np.random.default_rng(2), 4.0, 1.0, SAMPLES)
    assert abs(np.median(gaps) * 4.0 - math.log(2)) < 0.05  # exponential median ln2/rate
    assert not gamma_intervals(np.random.default_rng(2), math.inf, 1.0, 10).any()
    with pytest.raises(ValueError, match="rate and cv"):
        gamma_intervals(np.random.default_rng(2), 0.0, 1.0, 10)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.1])
def test_power_law_popularity(alpha: float) -> None:
    n = 8
    picks = power_law_adapters(np.random.default_rng(3), n, alpha, SAMPLES)
    assert picks.min() >= 0 and picks.max() <= n - 1
    edges = (np.arange(n + 1) / n) ** alpha  # P(index = k) = ((k+1)/n)^a - (k/n)^a
    expected = np.diff(edges)
    observed = np.bincount(picks, minlength=n) / SAMPLES
    # Binomial standard error per bin; five of them (plus a floor for near-empty bins).
    tolerance = 5 * np.sqrt(expected * (1 - expected) / SAMPLES) + 1e-3
    assert np.all(np.abs(observed - expected) < tolerance), (observed, expected)


def test_punica_mixes_group_sizes() -> None:
    assert mix_group_sizes("distinct", 10) == [1] * 10
    assert mix_group_sizes("identical", 10) == [10]
    uniform = mix_group_sizes("uniform", 10)  # ceil(sqrt 10) = 4 adapters, equal counts
    assert len(uniform) == 4 and sum(uniform) == 10 and max(uniform) - min(uniform) <= 1
    assert mix_group_sizes("uniform", 64) == [8] * 8
    # floor(1.5^k) for k = 0..8 is 1,1,2,3,5,7,11,17,25 (sum 72; 38 more would pass 100);
    # the remaining 28 join the most popular group.
    assert skewed_group_sizes(100) == [53, 17, 11, 7, 5, 3, 2, 1, 1]
    assert sum(skewed_group_sizes(1000)) == 1000
    with pytest.raises(ValueError, match="mix"):
        mix_group_sizes("zipf", 10)  # type: ignore[arg-type]


@pytest.mark.parametrize("mix", ["distinct", "uniform", "skewed", "identical"])
def test_mix_adapters_are_shuffled_with_the_stated_counts(mix: str) -> None:
    picks = mix_adapters(np.random.default_rng(4), mix, 100)  # type: ignore[arg-type]
    sizes = mix_group_sizes(mix, 100)  # type: ignore[arg-type]
    assert np.bincount(picks, minlength=len(sizes)).tolist() == sizes
    if len(sizes) > 1:
        assert not np.all(np.diff(picks) >= 0), "FCFS order must be shuffled"


def test_trace_is_reproducible_and_lengths_uniform() -> None:
    config = TraceConfig(count=2000, num_adapters=4, seed=7, rate=3.0, input_len=(8, 64))
    trace = build_trace(config)
    assert trace == build_trace(config)
    assert trace != build_trace(TraceConfig(count=2000, num_adapters=4, seed=8, rate=3.0))
    inputs = np.array([r.input_len for r in trace])
    assert inputs.min() == 8 and inputs.max() == 63
    assert abs(inputs.mean() - 35.5) < 5 * 16.2 / math.sqrt(2000)  # U{8..63}: sd ~ 16.2
    arrivals = [r.arrival_s for r in trace]
    assert arrivals == sorted(arrivals)
    # Changing the rate redraws arrivals only: adapters and lengths stay per request.
    other = build_trace(
        TraceConfig(count=2000, num_adapters=4, seed=7, rate=9.0, input_len=(8, 64))
    )
    assert [(r.adapter, r.input_len, r.output_len) for r in other] == [
        (r.adapter, r.input_len, r.output_len) for r in trace
    ]

"""Request traces: arrival times, adapter choice and lengths, all drawn from one seeded RNG.

A trace is a list of `TraceRequest`s; the same trace is replayed against every target of a
comparison, so differences come from the servers, not from the draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Mix = Literal["distinct", "uniform", "skewed", "identical"]
MIXES: tuple[Mix, ...] = ("distinct", "uniform", "skewed", "identical")


@dataclass(frozen=True)
class TraceRequest:
    """One request: send at `arrival_s` after the start (open loop), on adapter `adapter`
    (index into the adapter list; -1 = the base model), with these token lengths."""

    index: int
    arrival_s: float
    adapter: int
    input_len: int
    output_len: int


def gamma_intervals(rng: np.random.Generator, rate: float, cv: float, count: int) -> np.ndarray:
    """Inter-arrival gaps ~ Gamma(shape 1/cv², scale cv²/rate): mean 1/rate, CV = cv.

    cv = 1 is a Poisson process (exponential gaps); rate = inf sends everything at t = 0.
    """
    if math.isinf(rate):
        return np.zeros(count)
    if rate <= 0 or cv <= 0:
        raise ValueError(f"rate and cv must be > 0, got rate={rate}, cv={cv}")
    return rng.gamma(shape=1.0 / cv**2, scale=cv**2 / rate, size=count)


def power_law_adapters(
    rng: np.random.Generator, num_adapters: int, alpha: float, count: int
) -> np.ndarray:
    """Adapter index floor(n·X), X ~ power(alpha) (density alpha·x^(alpha-1) on [0, 1]).

    alpha = 1 is uniform; smaller alpha concentrates requests on low indices.
    """
    if num_adapters < 1 or alpha <= 0:
        raise ValueError(f"need num_adapters >= 1 and alpha > 0, got {num_adapters}, {alpha}")
    x = rng.power(alpha, size=count)
    return np.minimum((num_adapters * x).astype(np.int64), num_adapters - 1)


def skewed_group_sizes(count: int, base: float = 1.5) -> list[int]:
    """Punica's Zipf-1.5 mix: group k has floor(1.5^k) requests (k = 0, 1, ...) while the
    sizes fit in `count`; the remainder joins the most popular (largest) group.
    Returned most popular first, so adapter 0 is the most requested."""
    sizes: list[int] = []
    while sum(sizes) + math.floor(base ** len(sizes)) <= count:
        sizes.append(math.floor(base ** len(sizes)))
    sizes.sort(reverse=True)
    sizes[0] += count - sum(sizes)
    return sizes


def mix_group_sizes(mix: Mix, count: int) -> list[int]:
    """Requests per adapter for one of Punica's popularity mixes over `count` requests."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if mix == "distinct":
        return [1] * count
    if mix == "uniform":
        groups = math.ceil(math.sqrt(count))
        return [count // groups + (1 if g < count % groups else 0) for g in range(groups)]
    if mix == "skewed":
        return skewed_group_sizes(count)
    if mix == "identical":
        return [count]
    raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")


def mix_adapters(rng: np.random.Generator, mix: Mix, count: int) -> np.ndarray:
    """Adapter index per request for a Punica mix, shuffled (FCFS order is the shuffle)."""
    sizes = mix_group_sizes(mix, count)
    adapters = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(adapters)
    return adapters


def mix_adapter_count(mix: Mix, count: int) -> int:
    """How many adapters a mix over `count` requests needs."""
    return len(mix_group_sizes(mix, count))


def uniform_lengths(rng: np.random.Generator, low: int, high: int, count: int) -> np.ndarray:
    """Integer lengths uniform on [low, high)."""
    if not 1 <= low < high:
        raise ValueError(f"lengths need 1 <= low < high, got [{low}, {high})")
    return rng.integers(low, high, size=count)


@dataclass(frozen=True)
class TraceConfig:
    """What to draw. `mix` None = workload A/C (power law over `num_adapters`); a mix = B.
    `rate` None = closed loop (arrival times all 0, order only)."""

    count: int
    num_adapters: int
    seed: int = 0
    rate: float | None = None
    cv: float = 1.0
    alpha: float = 1.0
    mix: Mix | None = None
    input_len: tuple[int, int] = (8, 64)
    output_len: tuple[int, int] = (8, 64)


def build_trace(config: TraceConfig) -> list[TraceRequest]:
    """Draw the whole trace (separate streams per quantity, so changing the rate keeps the
    adapters and lengths of each request)."""
    seeds = np.random.SeedSequence(config.seed).spawn(4)
    arrival_rng, adapter_rng, input_rng, output_rng = (np.random.default_rng(s) for s in seeds)
    n = config.count
    if config.rate is None:
        arrivals = np.zeros(n)
    else:
        arrivals = np.cumsum(gamma_intervals(arrival_rng, config.rate, config.cv, n))
    if config.mix is not None:
        adapters = mix_adapters(adapter_rng, config.mix, n)
    else:
        adapters = power_law_adapters(adapter_rng, config.num_adapters, config.alpha, n)
    inputs = uniform_lengths(input_rng, *config.input_len, n)
    outputs = uniform_lengths(output_rng, *config.output_len, n)
    return [
        TraceRequest(i, float(arrivals[i]), int(adapters[i]), int(inputs[i]), int(outputs[i]))
        for i in range(n)
    ]


def trim_to_duration(trace: list[TraceRequest], duration_s: float) -> list[TraceRequest]:
    """Open loop with a duration: the requests that arrive before `duration_s`."""
    return [r for r in trace if r.arrival_s < duration_s]


def count_for_duration(rate: float, duration_s: float) -> int:
    """Enough draws that a Gamma process at `rate` almost surely outlasts `duration_s`
    (mean + 10 standard deviations of a Poisson count, plus slack for large CV)."""
    mean = rate * duration_s
    return int(mean + 10 * math.sqrt(mean) + 100) * 2

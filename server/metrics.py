"""Every Prometheus metric, defined once, on a registry owned by one app (no global state)."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Metrics:
    """adapterserve_* metrics. The engine and the routers call the `on_*` / `set_*` methods."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "adapterserve_requests", "Finished requests", ["model", "outcome"], registry=r
        )
        self.prompt_tokens = Counter(
            "adapterserve_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "adapterserve_generation_tokens", "Tokens generated", ["model"], registry=r
        )
        self.ttft = Histogram(
            "adapterserve_time_to_first_token_seconds",
            "Arrival to first output token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "adapterserve_time_per_output_token_seconds",
            "Mean time between output tokens per request",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "adapterserve_e2e_request_latency_seconds",
            "Arrival to finish",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            "adapterserve_requests_running", "Sequences in the running batch", registry=r
        )
        self.waiting = Gauge(
            "adapterserve_requests_waiting", "Sequences waiting for admission", registry=r
        )
        self.kv_blocks_used = Gauge(
            "adapterserve_kv_blocks_used", "KV cache blocks in use", registry=r
        )
        self.kv_blocks_total = Gauge(
            "adapterserve_kv_blocks_total", "KV cache blocks in all", registry=r
        )
        self.step_tokens = Histogram(
            "adapterserve_step_tokens",
            "Tokens processed per engine step",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.prefix_cache_blocks = Gauge(
            "adapterserve_prefix_cache_blocks",
            "KV cache blocks by state: used (held by "
            "sequences), cached (unused, K/V kept for reuse), free",
            ["state"],
            registry=r,
        )
        self.prefix_cache_queries = Counter(
            "adapterserve_prefix_cache_queries",
            "Tokens looked up in the prefix cache at admission",
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            "adapterserve_prefix_cache_hits",
            "Tokens found in the prefix cache at admission (not computed again)",
            registry=r,
        )
        self.prefix_cache_hit_rate = Gauge(
            "adapterserve_prefix_cache_hit_rate", "hits / queries since start", registry=r
        )
        self._prefix_seen = (0, 0)
        self.engine_restarts = Counter(
            "adapterserve_engine_restarts",
            "Engine core processes started again after one died",
            registry=r,
        )
        self.preemptions = Counter(
            "adapterserve_preemptions", "Sequences preempted for lack of KV blocks", registry=r
        )
        # adapters
        self.adapters = Gauge(
            "adapterserve_adapters",
            "Registered adapters by tier (device slot, host, disk)",
            ["tier"],
            registry=r,
        )
        self.adapter_loads = Counter(
            "adapterserve_adapter_loads",
            "Adapter loads into a device slot, by where they came "
            "from (host: a copy; disk: parsed first)",
            ["source"],
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "adapterserve_adapter_load_seconds",
            "Time to load an adapter (disk: parse; host: copy into a slot)",
            ["source"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_evictions = Counter(
            "adapterserve_adapter_evictions",
            "Adapters evicted from a tier (LRU)",
            ["tier"],
            registry=r,
        )
        self.adapter_acquires = Counter(
            "adapterserve_adapter_acquires",
            "Requests admitted with an adapter, by whether it was "
            "already in a device slot (hit) or had to be loaded (miss)",
            ["result"],
            registry=r,
        )
        self.step_adapters = Histogram(
            "adapterserve_step_distinct_adapters",
            "Distinct adapters in an engine step",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.eval_jobs = Gauge(
            "adapterserve_evaluation_jobs", "Evaluation jobs by state", ["state"], registry=r
        )
        self.eval_examples = Counter(
            "adapterserve_evaluation_examples_scored",
            "Evaluation examples scored",
            ["model", "dataset"],
            registry=r,
        )

    def on_request_done(
        self,
        model: str,
        outcome: str,
        prompt_tokens: int,
        output_tokens: int,
        ttft: float | None,
        e2e: float,
    ) -> None:
        self.requests.labels(model, outcome).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(output_tokens)
        self.e2e.labels(model).observe(e2e)
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
            if output_tokens > 1:
                self.tpot.labels(model).observe((e2e - ttft) / (output_tokens - 1))

    def on_request_rejected(self, model: str, outcome: str) -> None:
        """A request refused before reaching the engine (validation error, queue full, ...)."""
        self.requests.labels(model, outcome).inc()

    def on_step(
        self, num_tokens: int, running: int, waiting: int, kv_used: int, kv_total: int
    ) -> None:
        self.step_tokens.observe(num_tokens)
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_blocks_used.set(kv_used)
        self.kv_blocks_total.set(kv_total)

    def on_prefix_cache(self, used: int, cached: int, free: int, queries: int, hits: int) -> None:
        """Block states now, and the totals of tokens queried and hit since start."""
        for state, count in (("used", used), ("cached", cached), ("free", free)):
            self.prefix_cache_blocks.labels(state).set(count)
        seen_queries, seen_hits = self._prefix_seen
        if queries > seen_queries:
            self.prefix_cache_queries.inc(queries - seen_queries)
        if hits > seen_hits:
            self.prefix_cache_hits.inc(hits - seen_hits)
        self._prefix_seen = (queries, hits)
        self.prefix_cache_hit_rate.set(hits / queries if queries else 0.0)

    def set_eval_jobs(self, counts: dict[str, int]) -> None:
        """Number of evaluation jobs in each state (queued, running, succeeded, ...)."""
        for state, count in counts.items():
            self.eval_jobs.labels(state).set(count)

    def on_eval_example(self, model: str, dataset: str) -> None:
        self.eval_examples.labels(model, dataset).inc()

    # RegistryObserver (adapters.registry), called from the engine and loader threads
    def on_adapter_load(self, source: str, seconds: float) -> None:
        self.adapter_loads.labels(source).inc()
        self.adapter_load_seconds.labels(source).observe(seconds)

    def on_adapter_evict(self, tier: str) -> None:
        self.adapter_evictions.labels(tier).inc()

    def on_adapter_tiers(self, counts: dict[str, int]) -> None:
        for tier, count in counts.items():
            self.adapters.labels(tier).set(count)

    def on_adapter_acquire(self, hit: bool) -> None:
        self.adapter_acquires.labels("hit" if hit else "miss").inc()

    def on_step_adapters(self, count: int) -> None:
        self.step_adapters.observe(count)

    def forget_model(self, model: str) -> None:
        """Drop every series labelled with `model` (a deleted adapter), so that label series
        do not grow with upload/delete cycles."""
        self._forget("model", model)

    def forget_dataset(self, dataset: str) -> None:
        self._forget("dataset", dataset)

    def _forget(self, label: str, value: str) -> None:
        for metric in (
            self.requests,
            self.prompt_tokens,
            self.generation_tokens,
            self.ttft,
            self.tpot,
            self.e2e,
            self.eval_examples,
        ):
            if label not in metric._labelnames:
                continue
            where = metric._labelnames.index(label)
            # prometheus_client has no public way to list a metric's label sets
            for values in [v for v in metric._metrics if v[where] == value]:
                metric.remove(*values)

    # RegistryObserver: `name` was deleted
    def on_adapter_removed(self, name: str) -> None:
        self.forget_model(name)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Exposition:
    """Prometheus texts merged into one: each family keeps one HELP and one TYPE and its
    samples from every text together. Samples equal in name and labels are summed
    (`_created`: the earliest). The engine core process's client merges its own and the
    core's metrics; the cluster's ingress merges every replica's, labelled by replica."""

    def __init__(self) -> None:
        self._families: dict[str, list[str]] = {}  # name -> HELP, TYPE and sample keys
        self._values: dict[str, float] = {}  # sample key (name and labels) -> value

    def add(
        self, text: str, replica: str | None = None, only: tuple[str, ...] | None = None
    ) -> None:
        """Merge `text`; `replica`: label its samples `replica="..."`; `only`: keep just the
        families whose names start with one of these."""
        current = None
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                current = line.split(" ", 3)[2]
                if only is not None and not current.startswith(only):
                    current = None
                    continue
                lines = self._families.setdefault(current, [])
                if not any(existing.startswith(line[:7]) for existing in lines):
                    lines.append(line)
            elif line and not line.startswith("#") and current is not None:
                key, _, value = _labelled(line, replica).rpartition(" ")
                if key not in self._values:
                    self._families[current].append(key)
                    self._values[key] = float(value)
                elif key.split("{", 1)[0].endswith("_created"):
                    self._values[key] = min(self._values[key], float(value))
                else:
                    self._values[key] += float(value)

    def render(self) -> str:
        return "".join(
            (line if line.startswith("#") else f"{line} {_number(self._values[line])}") + "\n"
            for lines in self._families.values()
            for line in lines
        )


def merge_expositions(*texts: str) -> str:
    """The texts as one exposition (Exposition), equal samples summed."""
    merged = Exposition()
    for text in texts:
        merged.add(text)
    return merged.render()


def _labelled(sample: str, replica: str | None) -> str:
    if replica is None:
        return sample
    name, brace, rest = sample.partition("{")
    label = f'replica="{replica}"'
    if brace:
        return f"{name}{{{label},{rest}"
    name, _, value = sample.partition(" ")
    return f"{name}{{{label}}} {value}"


def _number(value: float) -> str:
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    return repr(value) if value != int(value) or abs(value) >= 1e15 else f"{int(value)}.0"

"""Async HTTP client: replays a trace against one target with streaming completions.

Each request is `POST /v1/completions` with `stream: true`, greedy, `ignore_eos`, and
`max_tokens` = the trace's output length; the client timestamps every SSE chunk to measure
TTFT (send -> first text chunk), ITL (gaps between chunks) and end-to-end latency.
HTTP 503 and 429 count as rejected; any other error (status or an error event) as failed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from adapterserve.loadtest.workloads import TraceRequest

REJECTED_STATUSES = (429, 503)
WORDS = ("the", "of", "and", "a", "to", "in", "is", "it", "that", "for")


@dataclass
class RequestResult:
    """What one request did. `status` is "completed", "failed" or "rejected"."""

    index: int
    model: str
    status: str = "failed"
    http_status: int | None = None
    error: str | None = None
    send_s: float = 0.0  # relative to the run start
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None  # from the server's usage chunk, when it sends one
    requested_output: int = 0
    requested_input: int = 0

    @property
    def tpot_s(self) -> float | None:
        """(e2e - TTFT) / (output tokens - 1); None with fewer than 2 tokens."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def make_prompt(request: TraceRequest) -> str:
    """About `input_len` tokens: common words, one token each in most BPE vocabularies."""
    offset = request.index % len(WORDS)
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(request.input_len))


def request_body(request: TraceRequest, model: str) -> dict:
    return {
        "model": model,
        "prompt": make_prompt(request),
        "max_tokens": request.output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@dataclass(frozen=True)
class Target:
    """A server to run against. base_only: every request names the base model instead."""

    url: str
    label: str
    base_only: bool = False

    @classmethod
    def parse(cls, spec: str) -> Target:
        """`[label=]URL[#base-only]`, e.g. `peft=http://127.0.0.1:8001`."""
        label, _, url = spec.partition("=") if "=" in spec.split("://")[0] else ("", "", spec)
        base_only = url.endswith("#base-only")
        url = url.removesuffix("#base-only").rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(
                f"expected a target like [label=]http://host:port[#base-only], got {spec!r}"
            )
        label = label or (url + (" base-only" if base_only else ""))
        return cls(url, label, base_only)


async def send_one(
    client: httpx.AsyncClient, request: TraceRequest, model: str, start: float
) -> RequestResult:
    """Stream one completion and time its chunks."""
    result = RequestResult(
        request.index, model, requested_output=request.output_len, requested_input=request.input_len
    )
    sent = time.perf_counter()
    result.send_s = sent - start
    try:
        async with client.stream(
            "POST", "/v1/completions", json=request_body(request, model)
        ) as response:
            result.http_status = response.status_code
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.status = (
                    "rejected" if response.status_code in REJECTED_STATUSES else "failed"
                )
                result.error = f"HTTP {response.status_code}: {_error_message(body)}"
                return result
            await _read_stream(response, result, sent)
    except (httpx.HTTPError, OSError, ValueError) as e:  # ValueError: a malformed SSE event
        result.status, result.error = "failed", f"{type(e).__name__}: {e}"
    return result


async def _read_stream(response: httpx.Response, result: RequestResult, sent: float) -> None:
    last = None
    chunks = 0
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            result.status, result.error = "failed", f"stream error: {_error_message(data)}"
            return
        now = time.perf_counter()
        if event.get("choices"):
            chunks += 1
            if last is None:
                result.ttft_s = now - sent
            else:
                result.itl_s.append(now - last)
            last = now
        usage = event.get("usage")
        if usage:
            result.prompt_tokens = usage.get("prompt_tokens")
            result.output_tokens = usage.get("completion_tokens") or 0
    result.e2e_s = time.perf_counter() - sent
    result.output_tokens = result.output_tokens or chunks
    if result.ttft_s is None:
        result.status, result.error = "failed", "stream ended without any output"
    else:
        result.status = "completed"


def _error_message(body: str) -> str:
    try:
        error = json.loads(body).get("error")
        return str(error.get("message") if isinstance(error, dict) else error)[:300]
    except (ValueError, AttributeError):
        return body[:300]


Progress = Callable[[RequestResult], None]


async def run_open_loop(
    client: httpx.AsyncClient,
    trace: Sequence[TraceRequest],
    models: Sequence[str],
    on_done: Progress,
    duration_s: float | None = None,
) -> list[RequestResult]:
    """Send each request at its arrival time, regardless of how many are in flight."""
    start = time.perf_counter()

    async def fire(request: TraceRequest, model: str) -> RequestResult:
        await asyncio.sleep(max(0.0, start + request.arrival_s - time.perf_counter()))
        result = await send_one(client, request, model, start)
        on_done(result)
        return result

    tasks = [
        asyncio.create_task(fire(r, m))
        for r, m in zip(trace, models, strict=True)
        if duration_s is None or r.arrival_s < duration_s
    ]
    return list(await asyncio.gather(*tasks))


async def run_closed_loop(
    client: httpx.AsyncClient,
    trace: Sequence[TraceRequest],
    models: Sequence[str],
    concurrency: int,
    on_done: Progress,
    duration_s: float | None = None,
) -> list[RequestResult]:
    """`concurrency` workers each send the next request of the trace when theirs finishes;
    with a duration, no request starts after it (in-flight ones finish)."""
    start = time.perf_counter()
    queue = iter(zip(trace, models, strict=True))
    results: list[RequestResult] = []

    async def worker() -> None:
        for request, model in queue:
            if duration_s is not None and time.perf_counter() - start >= duration_s:
                return
            result = await send_one(client, request, model, start)
            results.append(result)
            on_done(result)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sorted(results, key=lambda r: r.index)

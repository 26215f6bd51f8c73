"""Prefix caching on vs off, side by side in one run: the same server (default model unless
--model) started twice, `--enable-prefix-caching true` then `false`, each replaying
  (a) an evaluation job: --eval-limit boolq examples x --adapters LoRA adapters (greedy, the
      paper's 32 new tokens; prompts share the instruction template, per adapter);
  (b) multi-turn chat: --chat-users conversations at once, --chat-turns turns each, every turn
      resending the history (a shared system prompt first), streamed;
  (c) n = 4: --n-requests distinct ~--n-prompt-words-word prompts, 4 sampled choices each,
      --n-concurrency at a time, streamed.
Throughput (output tok/s, from /metrics), TTFT (server-side histogram for (a); client-side,
first streamed token, for (b) and (c)), prefix-cache hit rate (hit tokens / looked-up
tokens). Prints a table, writes JSON.

    .venv/bin/python benchmarks/bench_prefix_cache.py [--eval-limit 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # siblings; never the root (its kernels/ shadows HF's)

from bench_engine import free_port, start_server  # noqa: E402

from adapterserve.loadtest.synthetic import BaseDims, adapter_files, make_adapter, upload_adapter  # noqa: E402

SYSTEM = (
    "You are a careful assistant for a team that fine-tunes many task adapters. Answer "
    "briefly, say when you are unsure, and never invent numbers. "
) * 3
WORDS = [
    "river",
    "stone",
    "light",
    "paper",
    "garden",
    "window",
    "market",
    "silver",
    "engine",
    "forest",
    "number",
    "question",
    "answer",
    "letter",
    "winter",
    "summer",
    "circle",
    "bridge",
    "planet",
    "signal",
]


def start(args, caching: bool, port: int) -> subprocess.Popen:
    extra = ("--enable-prefix-caching", str(caching).lower(), "--device", args.device)
    env = {
        "ADAPTERSERVE_EVAL_MAX_INFLIGHT": str(args.max_num_seqs),
        "ADAPTERSERVE_ADAPTER_STORE_DIR": str(args.store / ("on" if caching else "off")),
    }
    if args.data_dir:
        env["ADAPTERSERVE_DATA_DIR"] = str(args.data_dir)
    return start_server(args.model, port, args.max_num_seqs, extra, env)


def scrape(text: str) -> dict[str, float]:
    """Each metric's value summed over its label sets."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


class Window:
    """/metrics deltas over one workload."""

    def __init__(self, client: httpx.AsyncClient):
        self.client = client

    async def __aenter__(self) -> Window:
        self.before = scrape((await self.client.get("/metrics")).text)
        self.started = time.perf_counter()
        return self

    async def __aexit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started
        after = scrape((await self.client.get("/metrics")).text)
        self.delta = {k: v - self.before.get(k, 0.0) for k, v in after.items()}

    def summary(self, ttfts: list[float] | None = None) -> dict:
        d = self.delta
        queries = d.get("adapterserve_prefix_cache_queries_total", 0.0)
        ttft_count = d.get("adapterserve_time_to_first_token_seconds_count", 0.0)
        server_ttft = (
            d.get("adapterserve_time_to_first_token_seconds_sum", 0.0) / ttft_count
            if ttft_count
            else None
        )
        out = d.get("adapterserve_generation_tokens_total", 0.0)
        return {
            "seconds": round(self.seconds, 2),
            "requests": int(sum(v for k, v in d.items() if k == "adapterserve_requests_total")),
            "prompt_tokens": int(d.get("adapterserve_prompt_tokens_total", 0.0)),
            "output_tokens": int(out),
            "output_tok_s": round(out / self.seconds, 1),
            "ttft_mean_s": round(statistics.fmean(ttfts), 3)
            if ttfts
            else (round(server_ttft, 3) if server_ttft is not None else None),
            "ttft_source": "client" if ttfts else "server",
            "hit_rate": round(d.get("adapterserve_prefix_cache_hits_total", 0.0) / queries, 3)
            if queries
            else 0.0,
        }


async def upload(client: httpx.AsyncClient, count: int, rank: int) -> list[str]:
    base = (await client.get("/v1/models")).json()["data"][0]
    dims = BaseDims.from_config(base)
    names = []
    for i in range(count):
        config, tensors = make_adapter(dims, "lora", rank, seed=100 + i)
        name = f"bench-lora-{i}"
        response = await upload_adapter(client, name, adapter_files(config, tensors), replace=True)
        response.raise_for_status()
        names.append(name)
    return names


async def eval_job(client: httpx.AsyncClient, models: list[str], limit: int) -> dict:
    async with Window(client) as window:
        body = {"models": models, "datasets": ["boolq"], "limit": limit}
        response = await client.post("/v1/evaluations", json=body)
        response.raise_for_status()
        job = response.json()
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            await asyncio.sleep(0.5)
            job = (await client.get(f"/v1/evaluations/{job['id']}")).json()
    if job["status"] != "succeeded":
        raise RuntimeError(f"the evaluation job ended {job['status']}: {job['error']}")
    summary = window.summary()
    summary["examples"] = job["progress"]["done"]
    summary["examples_s"] = round(job["progress"]["done"] / window.seconds, 2)
    summary["accuracy"] = {c["model"]: c["accuracy"] for c in job["results"]}
    return summary


async def stream(client: httpx.AsyncClient, path: str, body: dict) -> tuple[float, str]:
    """(seconds to the first content, the first choice's text)."""
    started, first, text = time.perf_counter(), None, ""
    async with client.stream("POST", path, json=body | {"stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - started
                if choice.get("index", 0) == 0:
                    text += piece
    return (first if first is not None else time.perf_counter() - started), text


async def chat(
    client: httpx.AsyncClient, model: str, users: int, turns: int, max_tokens: int
) -> dict:
    ttfts: list[float] = []

    async def conversation(user: int) -> None:
        rng = random.Random(user)
        messages = [{"role": "system", "content": SYSTEM}]
        for turn in range(turns):
            ask = " ".join(rng.choice(WORDS) for _ in range(24))
            messages.append({"role": "user", "content": f"Turn {turn}: tell me about {ask}."})
            body = {
                "model": model,
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            seconds, text = await stream(client, "/v1/chat/completions", body)
            ttfts.append(seconds)
            messages.append({"role": "assistant", "content": text})

    async with Window(client) as window:
        await asyncio.gather(*[conversation(u) for u in range(users)])
    return window.summary(ttfts)


async def n_choices(
    client: httpx.AsyncClient,
    model: str,
    requests: int,
    concurrency: int,
    words: int,
    max_tokens: int,
) -> dict:
    ttfts: list[float] = []
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        rng = random.Random(1000 + i)
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        body = {
            "model": model,
            "prompt": prompt,
            "n": 4,
            "max_tokens": max_tokens,
            "temperature": 0.8,
            "seed": i,
        }
        async with slots:
            seconds, _ = await stream(client, "/v1/completions", body)
        ttfts.append(seconds)

    async with Window(client) as window:
        await asyncio.gather(*[one(i) for i in range(requests)])
    return window.summary(ttfts)


async def workloads(args, port: int) -> dict:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=3600) as client:
        base = (await client.get("/v1/models")).json()["data"][0]["id"]
        results = {}
        if "a" in args.only:
            names = await upload(client, args.adapters, args.rank)
            results["a"] = await eval_job(client, names, args.eval_limit)
        if "b" in args.only:
            results["b"] = await chat(
                client, base, args.chat_users, args.chat_turns, args.chat_max_tokens
            )
        if "c" in args.only:
            results["c"] = await n_choices(
                client,
                base,
                args.n_requests,
                args.n_concurrency,
                args.n_prompt_words,
                args.n_max_tokens,
            )
        return results


LABELS = {"a": "(a) eval job, boolq x adapters", "b": "(b) multi-turn chat", "c": "(c) n = 4"}


def table(runs: dict[str, dict]) -> str:
    lines = [
        f"{'workload':34} {'cache':5} {'s':>7} {'out tok/s':>9} {'TTFT s':>7} {'hit rate':>8} {'x off':>6}"
    ]
    for key, label in LABELS.items():
        if key not in runs["on"]:
            continue
        for mode in ("on", "off"):
            r = runs[mode][key]
            ratio = r["output_tok_s"] / runs["off"][key]["output_tok_s"]
            lines.append(
                f"{label:34} {mode:5} {r['seconds']:7.1f} {r['output_tok_s']:9.1f} "
                f"{r['ttft_mean_s'] or 0:7.3f} {r['hit_rate']:8.3f} {ratio:6.2f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: the server's")
    parser.add_argument("--only", default="abc")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--eval-limit", type=int, default=200)
    parser.add_argument("--chat-users", type=int, default=8)
    parser.add_argument("--chat-turns", type=int, default=4)
    parser.add_argument("--chat-max-tokens", type=int, default=32)
    parser.add_argument("--n-requests", type=int, default=16)
    parser.add_argument("--n-concurrency", type=int, default=4)
    parser.add_argument("--n-prompt-words", type=int, default=200)
    parser.add_argument("--n-max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--json", type=Path, default=Path("bench-results/prefix_cache.json"))
    args = parser.parse_args()
    args.store = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-prefix-{os.getpid()}"
    runs = {}
    for caching in (True, False):
        port = free_port()
        proc = start(args, caching, port)
        try:
            runs["on" if caching else "off"] = asyncio.run(workloads(args, port))
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    print(table(runs))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in vars(args).items() if k != "store"}
    args.json.write_text(json.dumps({"settings": settings, "runs": runs}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Issue 24 item 5 replayed on a real server: two beam searches of `best_of` beams hold every
running slot, then a third client streams a plain completion. Measures the third client's time
to its first streamed token (client side), with the server's fair share as given (default: the
server's own, 0.5) and, with --compare, again with `--max-request-share 1` (no sharing, the old
first-come first-served), where the third client gives up after --give-up-s as the original
report's clients did.

The server is `adapterserve serve` started as a subprocess (default model unless --model),
--max-num-seqs 32 by default. The beam requests use `ignore_eos` so that they keep their width
for all of --beam-max-tokens; they are cancelled (the server aborts them) once the third client
is done. Prints a table, writes JSON.

    .venv/bin/python -P benchmarks/replay_fair_share.py [--compare] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # siblings; never the root (its kernels/ shadows HF's)

from bench_engine import free_port, start_server  # noqa: E402
from bench_prefix_cache import scrape  # noqa: E402

BEAM_PROMPT = "Write a long story about a lighthouse keeper who finds a map in a bottle."
THIRD_PROMPT = "The capital of France is"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded default model")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--best-of", type=int, default=16, help="beams per search")
    parser.add_argument("--beam-max-tokens", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=16, help="the third client's")
    parser.add_argument(
        "--share", type=float, default=None, help="--max-request-share; default: the server's"
    )
    parser.add_argument(
        "--compare", action="store_true", help="also run with --max-request-share 1"
    )
    parser.add_argument("--give-up-s", type=float, default=60.0, help="the third client's patience")
    parser.add_argument(
        "--fill-timeout-s", type=float, default=300.0, help="wait for the beams to fill the slots"
    )
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench-results" / "replay_fair_share.json"
    )
    return parser.parse_args()


async def running(client: httpx.AsyncClient) -> tuple[int, int]:
    metrics = scrape((await client.get("/metrics")).text)
    return int(metrics.get("adapterserve_requests_running", 0)), int(
        metrics.get("adapterserve_requests_waiting", 0)
    )


async def beam_search(client: httpx.AsyncClient, model: str, args: argparse.Namespace) -> None:
    body = {
        "model": model,
        "prompt": BEAM_PROMPT,
        "max_tokens": args.beam_max_tokens,
        "n": 1,
        "best_of": args.best_of,
        "use_beam_search": True,
        "ignore_eos": True,
    }
    response = await client.post("/v1/completions", json=body)
    response.raise_for_status()


async def first_token(
    client: httpx.AsyncClient, model: str, max_tokens: int
) -> tuple[float, float, int]:
    """The third client: (seconds to the first streamed token, to the end, tokens)."""
    body = {
        "model": model,
        "prompt": THIRD_PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    started, first, pieces = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                if choice.get("text"):
                    pieces += 1
                    first = first if first is not None else time.perf_counter() - started
    return first, time.perf_counter() - started, pieces


async def replay(port: int, args: argparse.Namespace, share: float | None) -> dict:
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        beams = [asyncio.create_task(beam_search(client, model, args)) for _ in range(2)]
        started = time.perf_counter()
        while (state := await running(client))[0] < 2 * args.best_of:
            if time.perf_counter() - started > args.fill_timeout_s or any(b.done() for b in beams):
                raise RuntimeError(f"the beams did not fill the slots: running, waiting = {state}")
            await asyncio.sleep(0.2)
        fill_s = time.perf_counter() - started
        third = asyncio.create_task(first_token(client, model, args.max_tokens))
        await asyncio.sleep(1.0)
        running_after_1s, waiting_after_1s = await running(client)
        try:
            ttft, total, pieces = await asyncio.wait_for(third, args.give_up_s)
        except TimeoutError:
            ttft, total, pieces = None, None, 0
        beams_still_running = sum(not b.done() for b in beams)
        for task in beams:  # the server aborts a request whose client went away
            task.cancel()
        await asyncio.gather(*beams, return_exceptions=True)
    return {
        "max_request_share": share,
        "beams_fill_s": round(fill_s, 2),
        "third_ttft_s": None if ttft is None else round(ttft, 3),
        "third_total_s": None if total is None else round(total, 3),
        "third_tokens": pieces,
        "running_1s_after_third": running_after_1s,
        "waiting_1s_after_third": waiting_after_1s,
        "beam_searches_still_running": beams_still_running,
    }


def run(args: argparse.Namespace, share: float | None) -> dict:
    port = free_port()
    extra = ("--max-request-share", str(share)) if share is not None else ()
    server = start_server(args.model, port, args.max_num_seqs, extra)
    try:
        return asyncio.run(replay(port, args, share))
    finally:
        server.terminate()
        server.wait(60)


def main() -> None:
    args = parse_args()
    results = [run(args, args.share)]
    if args.compare:
        results.append(run(args, 1.0))
    setup = {
        "model": args.model or "default",
        "max_num_seqs": args.max_num_seqs,
        "best_of": args.best_of,
        "beam_max_tokens": args.beam_max_tokens,
        "third_max_tokens": args.max_tokens,
        "give_up_s": args.give_up_s,
    }
    print(
        f"two beam searches of {args.best_of} beams x {args.beam_max_tokens} tokens, "
        f"max_num_seqs {args.max_num_seqs}; a third client streams {args.max_tokens} tokens"
    )
    print(f"{'share':>8} {'ttft s':>8} {'total s':>8} {'waiting@1s':>10} {'searches running':>16}")
    for r in results:
        share = "default" if r["max_request_share"] is None else r["max_request_share"]
        ttft = "gave up" if r["third_ttft_s"] is None else r["third_ttft_s"]
        total = "-" if r["third_total_s"] is None else r["third_total_s"]
        print(
            f"{share!s:>8} {ttft!s:>8} {total!s:>8} {r['waiting_1s_after_third']:>10} "
            f"{r['beam_searches_still_running']:>16}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"setup": setup, "results": results}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Replays the hardening audit's heavy requests (issue 24, items 1-3) against a real server
started as a subprocess on the default model (int4 base), while one stream decodes beside them:
for each, the answer (status, code, seconds) and the longest gap between two of the stream's
tokens while it was in flight (the event loop's stall; the figures before and after the sandbox are in BENCHMARKS.md,
'Hardening replays: heavy requests beside a running stream (issue 24)').
Prints a table, writes JSON.

    .venv/bin/python benchmarks/replay_bombs.py [--output bench-results/replay_bombs.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def ref_chain(depth: int) -> dict:
    defs: dict = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(depth)}
    defs[f"d{depth}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def chain(depth: int, gbnf: bool) -> str:
    arrow, start = (" ::= ", "root") if gbnf else (": ", "start")
    rules = [f'r{i}{arrow}"t" r{i + 1}' for i in range(depth)]
    return "\n".join([f"{start}{arrow}r0", *rules, f'r{depth}{arrow}"end"'])


def schema(s: dict) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}}


def any_of(n: int) -> dict:
    return {
        "anyOf": [
            {"type": "object", "properties": {f"p{i}": {"const": i}}, "required": [f"p{i}"]}
            for i in range(n)
        ]
    }


CASES = [  # (name, path, body)
    ("(baseline: a plain completion)", "/v1/completions", {}),
    ("$ref chain 1000 (json_schema)", "/v1/completions", schema(ref_chain(1000))),
    ("Lark chain 3000 (guided_grammar)", "/v1/completions", {"guided_grammar": chain(3000, False)}),
    ("GBNF chain 3000 (guided_grammar)", "/v1/completions", {"guided_grammar": chain(3000, True)}),
    ("enum of 20k objects, 0.7 MB", "/v1/completions",
     schema({"enum": [{"k": i, "v": f"x{i}"} for i in range(20_000)]})),
    ("a small schema (the first that compiles)", "/v1/completions", schema({"type": "object"})),
    ("anyOf 5000 objects", "/v1/completions", schema(any_of(5000))),
    ("same enum again (cached refusal)", "/v1/completions",
     schema({"enum": [{"k": i, "v": f"x{i}"} for i in range(20_000)]})),
    ("7.9 MB body (a guided_choice of 1000 x 7.9 KB)", "/v1/completions",
     {"guided_choice": [f"{i}" + "x" * 7900 for i in range(1000)]}),
    ("/tokenize 1,000,000 chars", "/tokenize", {"prompt": "hello world " * 83_333}),
    ("completion, 1,000,000-char prompt", "/v1/completions", {"prompt": "hello world " * 83_333}),
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def replay(base: str) -> list[dict]:
    rows = []
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        for name, path, extra in CASES:
            arrivals: list[float] = []
            started = asyncio.Event()

            async def stream(
                arrivals: list[float] = arrivals, started: asyncio.Event = started
            ) -> None:
                body = {
                    "prompt": "Tell me a story.",
                    "max_tokens": 4000,
                    "ignore_eos": True,
                    "stream": True,
                }
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            arrivals.append(time.monotonic())
                            if len(arrivals) == 10:
                                started.set()

            streaming = asyncio.ensure_future(stream())
            await started.wait()
            body = {"prompt": "x", "max_tokens": 4, **extra} if path != "/tokenize" else extra
            begin = time.monotonic()
            answer = await client.post(path, json=body)
            end = time.monotonic()
            await asyncio.sleep(0.3)  # the gap that spans the answer closes with the next token
            streaming.cancel()
            gaps = [
                b - a
                for a, b in zip(arrivals, arrivals[1:], strict=False)
                if b >= begin and a <= end
            ]
            error = (answer.json().get("error") or {}) if answer.status_code != 200 else {}
            rows.append(
                {
                    "request": name,
                    "status": answer.status_code,
                    "seconds": round(end - begin, 3),
                    "worst_stream_gap_s": round(max(gaps, default=end - begin), 3),
                    "message": (error.get("message") or "")[:90],
                }
            )
            print(
                f"{name:36s} {answer.status_code} {end - begin:7.2f} s  gap {rows[-1]['worst_stream_gap_s']:6.3f} s"
                f"  {rows[-1]['message']}",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("bench-results/replay_bombs.json"))
    args = parser.parse_args()
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-P", "-m", "adapterserve", "serve", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tempfile.gettempdir(),
        env=os.environ.copy(),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the server did not start: see {log.name}")
            time.sleep(0.5)
        rows = asyncio.run(replay(base))
        alive = server.poll() is None and httpx.get(f"{base}/health", timeout=5).status_code == 200
    finally:
        server.terminate()
        server.wait(60)
    print(f"server alive after all: {alive}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"rows": rows, "server_alive": alive}, indent=2))


if __name__ == "__main__":
    main()

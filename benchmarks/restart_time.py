"""Time from `kill -9` of the engine core to the first answered request, on a real server.

Starts `adapterserve serve` (the default model unless --model) as a subprocess, waits until it
is ready (its first start also fills the quantized-codes cache: later starts are "warm"), then
--trials times: SIGKILL the engine core process and send a one-token completion every 50 ms
until one is answered 200. Prints a table and writes JSON.

    .venv/bin/python -P benchmarks/restart_time.py [--model DIR|GGUF] [--trials 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # siblings; never the root (its kernels/ shadows HF's)

from bench_engine import free_port, start_server  # noqa: E402


def core_pid(server_pid: int) -> int | None:
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"adapterserve.server.engine.core" in cmdline:
                return int(child)
    return None


def first_answer(url: str, deadline_s: float = 300.0) -> float:
    began = time.monotonic()
    body = {"prompt": "Hello", "max_tokens": 1}
    while time.monotonic() - began < deadline_s:
        try:
            if httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200:
                return time.monotonic() - began
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError("no answer within the deadline")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", default=None, help="HF dir or .gguf; default: embedded SmolLM2-135M-Instruct"
    )
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--json", type=Path, default=ROOT / "bench-results" / "restart_time.json")
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    began = time.monotonic()
    server = start_server(args.model, port, 32)
    first_start = time.monotonic() - began
    times = []
    try:
        first_answer(url)
        for _ in range(args.trials):
            pid = core_pid(server.pid)
            assert pid is not None, "no engine core process under the server"
            kill_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            seconds = first_answer(url)
            times.append(seconds)
            assert core_pid(server.pid) not in (None, pid)
            print(
                f"kill -9 of core {pid} -> first answer after {seconds:.2f} s "
                f"(t = {kill_at - began:.1f} s)",
                flush=True,
            )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    print(f"\n{'server start (plan, front end, first core)':<48} {first_start:>8.1f} s")
    print(f"{'kill -9 -> first answered request, median':<48} {statistics.median(times):>8.2f} s")
    print(f"{'  trials':<48} {' / '.join(f'{t:.2f}' for t in times)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "model": args.model or "default",
                "server_start_s": first_start,
                "restart_to_answer_s": times,
            },
            indent=2,
        )
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""The first structured-output request after start, with and without --warm-grammars.

For each setting (off, on), --trials times: start `adapterserve serve` (the default model unless
--model) as a subprocess, wait until it is ready and then --settle seconds (what a warm-up on a
thread has to do meanwhile), and time a json_object chat request, then the same again (cached
grammar, built tokenizers) and a free one. Prints a table and writes JSON.

    .venv/bin/python -P benchmarks/first_structured.py [--model DIR|GGUF] [--trials 3]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # siblings; never the root (its kernels/ shadows HF's)

from bench_engine import free_port, start_server  # noqa: E402

ASK = [{"role": "user", "content": "Say hi"}]


def timed(url: str, body: dict) -> float:
    began = time.perf_counter()
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return time.perf_counter() - began


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", default=None, help="HF dir or .gguf; default: embedded SmolLM2-135M-Instruct"
    )
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--settle", type=float, default=5.0, help="seconds between ready and asking")
    ap.add_argument("--json", type=Path, default=ROOT / "bench-results" / "first_structured.json")
    args = ap.parse_args()
    structured = {"messages": ASK, "max_tokens": 8, "response_format": {"type": "json_object"}}
    free = {"messages": ASK, "max_tokens": 8}
    rows: dict[str, dict[str, list[float]]] = {}
    for warm in ("false", "true"):
        row = rows[f"--warm-grammars {warm}"] = {"first": [], "second": [], "free": []}
        for _ in range(args.trials):
            port = free_port()
            server = start_server(args.model, port, 8, ("--warm-grammars", warm))
            try:
                time.sleep(args.settle)
                url = f"http://127.0.0.1:{port}"
                row["first"].append(timed(url, structured))
                row["second"].append(timed(url, structured))
                row["free"].append(timed(url, free))
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(60)
    print(f"\n{'setting':<22} {'first json_object':>18} {'second':>10} {'free':>10}  (median s)")
    for name, row in rows.items():
        cells = [statistics.median(row[k]) for k in ("first", "second", "free")]
        print(f"{name:<22} {cells[0]:>18.2f} {cells[1]:>10.2f} {cells[2]:>10.2f}")
        print(f"{'  trials, first':<22} {' / '.join(f'{t:.2f}' for t in row['first'])}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": args.model or "default", "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

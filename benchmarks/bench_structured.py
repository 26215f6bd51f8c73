"""Structured outputs: output tok/s of 16 streams with a JSON schema vs without, same engine,
same run (default model, in-process), and what the grammar costs per step: the time spent in
llguidance's masks (measured around each `Constraint.mask`), per masked row and as a share of
the step. Prints a table, writes JSON.

    .venv/bin/python benchmarks/bench_structured.py [--streams 16] [--output-len 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # siblings; never the root (its kernels/ shadows HF's)

from bench_grammar_engines import SCHEMA  # noqa: E402  (one schema for both)

from adapterserve.server.config import Settings  # noqa: E402
from adapterserve.server.engine import constraint as constraint_module  # noqa: E402
from adapterserve.server.engine.bootstrap import start_engine  # noqa: E402
from adapterserve.server.engine.sampling import SamplingParams  # noqa: E402
from adapterserve.server.metrics import Metrics  # noqa: E402


class MaskTimer:
    """Wraps Constraint.mask: total seconds and calls."""

    def __init__(self) -> None:
        self.seconds, self.calls = 0.0, 0
        self._mask = constraint_module.Constraint.mask
        timer = self

        def timed(self, logits, eos):
            start = time.perf_counter()
            try:
                return timer._mask(self, logits, eos)
            finally:
                timer.seconds += time.perf_counter() - start
                timer.calls += 1

        constraint_module.Constraint.mask = timed


async def run(args) -> dict:
    settings = Settings(device="cpu", log_level="warning", max_num_seqs=args.streams, compile="off")
    engine = await start_engine(settings, Metrics())
    timer = MaskTimer()
    grammar = engine.grammars.compile("json_schema", SCHEMA)
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "List some fruit as JSON."}])

    async def one(i: int, constrained: bool) -> int:
        params = SamplingParams(max_tokens=args.output_len, temperature=1.0, seed=i)
        if constrained:
            params = SamplingParams(
                max_tokens=args.output_len,
                temperature=1.0,
                seed=i,
                constraint=engine.grammars.constraint(grammar),
            )
        return sum([len(o.token_ids) async for o in engine.add_request(prompt, params)])

    try:
        await asyncio.gather(*[one(i, True) for i in range(2)])  # warm-up
        rows: dict[str, list[float]] = {"free": [], "json_schema": []}
        masks = []
        for _ in range(args.repeats):
            for mode in rows:
                timer.seconds, timer.calls = 0.0, 0
                start = time.perf_counter()
                tokens = sum(
                    await asyncio.gather(
                        *[one(i, mode == "json_schema") for i in range(args.streams)]
                    )
                )
                elapsed = time.perf_counter() - start
                rows[mode].append(tokens / elapsed)
                if mode == "json_schema":
                    masks.append((timer.seconds, timer.calls, elapsed))
        seconds = sum(m[0] for m in masks)
        calls = sum(m[1] for m in masks)
        return {
            "streams": args.streams,
            "output_len": args.output_len,
            "free_tok_s": statistics.median(rows["free"]),
            "json_schema_tok_s": statistics.median(rows["json_schema"]),
            "mask_ms_per_row": 1e3 * seconds / max(calls, 1),
            "mask_share_of_time": seconds / sum(m[2] for m in masks),
        }
    finally:
        await engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=ROOT / "bench-results" / "structured.json")
    args = ap.parse_args()
    result = asyncio.run(run(args))
    ratio = result["json_schema_tok_s"] / result["free_tok_s"]
    print(f"{'run':<40} {'value':>10}")
    print(f"{f'{args.streams} streams, free, tok/s':<40} {result['free_tok_s']:>10.1f}")
    print(
        f"{f'{args.streams} streams, json_schema, tok/s':<40} {result['json_schema_tok_s']:>10.1f}"
    )
    print(f"{'json_schema / free':<40} {ratio:>10.2f}")
    print(f"{'mask ms per constrained row':<40} {result['mask_ms_per_row']:>10.3f}")
    print(f"{'masks, share of the constrained run':<40} {result['mask_share_of_time']:>10.1%}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**result, "ratio": ratio}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

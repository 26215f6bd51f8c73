"""A/B of the CPU `Dense` fast path: median decode-step time per batch size with the CPU matmul
forms (`Dense`, cpu=True) vs plain F.linear (cpu=False), on the same loaded model, in one run.

    .venv/bin/python benchmarks/bench_matmul_forms.py [--model DIR|GGUF] [--batches 1 2 4 8 16 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # siblings; never the root (its kernels/ shadows HF's)

from adapterserve.server.config import Settings  # noqa: E402
from adapterserve.server.engine.bootstrap import build_engine  # noqa: E402
from adapterserve.server.engine.sampling import SamplingParams  # noqa: E402
from adapterserve.server.engine.scheduler import Sequence  # noqa: E402
from adapterserve.server.metrics import Metrics  # noqa: E402


def median_decode_step_ms(engine, batch: int, steps: int) -> float:
    """Admit `batch` 32-token prompts, prefill them, then time each decode step."""
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = list(range(100 + i, 132 + i))
        engine._inbox.put(
            ("add", Sequence(f"ab-{time.monotonic_ns()}-{i}", prompt, params, "m", stream=None))
        )
    engine._drain_inbox()  # driven synchronously: no engine thread, outputs dropped below
    engine.step()
    times = []
    while engine.scheduler.has_work():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    engine._outbox.clear()
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=ROOT / "bench-results" / "matmul_forms.json")
    args = ap.parse_args()
    engine = build_engine(Settings(model=args.model, max_num_seqs=max(args.batches)), Metrics())
    results: dict[str, dict[int, list[float]]] = {"Dense (CPU forms)": {}, "F.linear": {}}
    for _ in range(args.repeats):  # interleaved, so drift hits both forms alike
        for name, cpu in (("Dense (CPU forms)", True), ("F.linear", False)):
            engine.model.fuse(cpu=cpu)
            for b in args.batches:
                results[name].setdefault(b, []).append(median_decode_step_ms(engine, b, args.steps))
    print(f"{'median decode step (ms)':<24}" + "".join(f"{b:>10}" for b in args.batches))
    for name, by_batch in results.items():
        print(f"{name:<24}" + "".join(f"{min(by_batch[b]):>10.1f}" for b in args.batches))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

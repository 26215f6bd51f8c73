"""Quantized base vs fp32, side by side in one run: output tok/s of the in-process engine for
--quantization none / int8 / int4 (the default GGUF's Q4_1 projections as they ship), at one
stream and at 16 streams, on the base model and over 8 distinct LoRA r16 adapters (all seven
projections, one request per adapter, two per adapter at 16), against transformers' generate
(fp32) at one stream and a static batch of 16; weight bytes per decode step and process RSS for
each setting. Each measurement runs in a fresh process (`isolated`): no run inherits
another's thread pools or memory.

    .venv/bin/python benchmarks/bench_quant.py [--output-len 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # siblings; never the root (its kernels/ shadows HF's)

from bench_engine import bench_transformers, isolated, make_prompts, write_loras  # noqa: E402

from adapterserve.server.config import Settings  # noqa: E402
from adapterserve.server.engine.bootstrap import start_engine  # noqa: E402
from adapterserve.server.engine.sampling import SamplingParams  # noqa: E402
from adapterserve.server.metrics import Metrics  # noqa: E402
from adapterserve.server.model.weights import resolve_model_dir  # noqa: E402

MODES = ("none", "int8", "int4")


async def measure(
    settings: Settings,
    prompts: list[list[int]],
    models: list[str | None],
    out_len: int,
    repeats: int,
) -> dict:
    engine = await start_engine(settings, Metrics())
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)

    async def one(prompt, model):
        return sum([len(o.token_ids) async for o in engine.add_request(prompt, params, model)])

    try:
        await asyncio.gather(
            *[one(p[:8], m) for p, m in zip(prompts, models, strict=True)]
        )  # warm-up
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            tokens = sum(
                await asyncio.gather(*[one(p, m) for p, m in zip(prompts, models, strict=True)])
            )
            runs.append(tokens / (time.perf_counter() - start))
        return {
            "tok_s": statistics.median(runs),
            "weight_mb_per_step": engine.model.decode_weight_bytes() / 1e6,
            "quantization": engine.model.quantization,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    finally:
        await engine.stop()


def run(settings: Settings, prompts, models, out_len: int, repeats: int) -> dict:
    return asyncio.run(measure(settings, prompts, models, out_len, repeats))


def stream_args(doc: str | None, json_name: str) -> argparse.ArgumentParser:
    """The options the in-process stream benchmarks share (this one, bench_dora)."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=ROOT / "bench-results" / json_name)
    return ap


def main() -> None:
    ap = stream_args(__doc__, "quant.json")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()

    base = Settings(device="cpu", log_level="warning", compile="off", max_num_seqs=16)
    model_dir = resolve_model_dir(None, base.cache_dir)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    one, sixteen = (
        make_prompts(1, args.prompt_len, vocab),
        make_prompts(16, args.prompt_len, vocab, 1),
    )
    rows: list[dict] = []
    if not args.skip_transformers:
        for name, prompts in (("1 stream", one), ("16 at once (static)", sixteen)):
            rows.append(
                {
                    "run": f"transformers fp32, {name}",
                    "quantization": "none",
                    "tok_s": isolated(bench_transformers, model_dir, prompts, args.output_len),
                }
            )
    with tempfile.TemporaryDirectory() as tmp:
        flags = write_loras(Path(tmp) / "loras", model_dir, args.adapters, args.rank)
        names = [f.split("=", 1)[0] for f in flags]
        for mode in MODES:
            settings = base.model_copy(
                update={
                    "quantization": mode,
                    "adapters": flags,
                    "adapter_slots": args.adapters,
                    "cache_dir": base.cache_dir,
                }
            )
            cases = (
                ("base, 1 stream", one, [None]),
                ("base, 16 streams", sixteen, [None] * 16),
                (
                    f"{args.adapters} LoRA r{args.rank}, 16 streams",
                    sixteen,
                    [names[i % len(names)] for i in range(16)],
                ),
            )
            for name, prompts, models in cases:
                result = isolated(run, settings, prompts, models, args.output_len, args.repeats)
                rows.append({"run": f"engine {mode}, {name}", **result})
    table(rows, args)


def table(rows: list[dict], args) -> None:
    by_run = {r["run"]: r for r in rows}
    print(f"\n{'run':<46} {'tok/s':>8} {'x fp32':>7} {'MB/step':>8} {'max RSS MB':>10}")
    for row in rows:
        fp32 = by_run.get(row["run"].replace(f"engine {row.get('quantization')}", "engine none"))
        ratio = row["tok_s"] / fp32["tok_s"] if fp32 and row["run"].startswith("engine") else None
        print(
            f"{row['run']:<46} {row['tok_s']:>8.1f} {ratio or 0:>7.2f} "
            f"{row.get('weight_mb_per_step', 0):>8.1f} {row.get('max_rss_mb', 0):>10.0f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"output_len": args.output_len, "prompt_len": args.prompt_len, "rows": rows}, indent=1
        )
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

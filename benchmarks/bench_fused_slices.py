"""One adapter op per fused projection vs one per target: decode step time of our model with a
slot pool of LoRA adapters, the pool's joint q|k|v and gate|up stacks on (one `add_delta` over
n slices) and off (`post` target by target over the same member stacks), interleaved round by
round in one process so that machine noise hits both alike. Also the base model, no hooks.

    .venv/bin/python benchmarks/bench_fused_slices.py [--model DIR|GGUF] [--rounds 6]
        [--json bench-results/fused_slices.json]

Configurations: 8 LoRA r16 on all seven projections, 8 LoRA r8 on q and v (peft's default:
the joint q|k|v op then also runs k's zero slice). 16 sequences, one per slot pair, decoding
after a 32-token prompt; fp32 on CPU (the server's CPU dtype), --device cuda on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.hooks import PoolHooks  # noqa: E402
from adapters.pool import AdapterPool  # noqa: E402
from adapters.spec import BaseFingerprint  # noqa: E402
from benchmarks.random_adapters import random_spec  # noqa: E402
from server.engine.kv_cache import BlockAllocator  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.engine.scheduler import Scheduler, Sequence  # noqa: E402
from server.model.llama import KVCache  # noqa: E402
from server.model.weights import load_model, read_config, resolve_model_dir  # noqa: E402

CONFIGS = {
    "8 LoRA r16 (all projections)": (16, None),
    "8 LoRA r8 (q, v)": (8, ("q", "v")),
}
SLOTS, STREAMS, PROMPT = 8, 16, 32


def decode_batch(model, device):
    """A decode step's batch of STREAMS sequences (sequence i on slot i % SLOTS) and its cache."""
    cache = KVCache(model.args, 128, 16, next(model.parameters()).dtype, device)
    sched = Scheduler(BlockAllocator(128, 16), STREAMS, STREAMS * PROMPT, torch.device(device))
    for i in range(STREAMS):
        seq = Sequence(f"r{i}", list(range(100 + i, 100 + i + PROMPT)),
                       SamplingParams(max_tokens=8), "bench", None)  # fmt: skip
        seq.slot_id = i % SLOTS
        sched.add(seq)
    step = sched.schedule()
    model(step.batch, cache)  # the prompts' K/V
    for seq, n in step.work:
        seq.num_computed += n
        seq.output_ids.append(7)
    step = sched.schedule()
    assert not step.batch.prefills and len(step.work) == STREAMS
    return step.batch, cache


def step_ms(model, batch, cache, device, steps: int = 5) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model(batch, cache)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        model(batch, cache)
    sync()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--model", default=None, help="HF dir or .gguf; default: embedded model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", type=Path, default=ROOT / "bench-results" / "fused_slices.json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    from server.config import Settings

    model_dir = resolve_model_dir(args.model or Settings().model, Settings().cache_dir)
    config = read_config(model_dir)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    model = load_model(model_dir, torch.device(args.device), dtype)
    fp = BaseFingerprint.from_hf_config(config)
    batch, cache = decode_batch(model, args.device)
    rows = []
    for name, (rank, targets) in CONFIGS.items():
        pool = AdapterPool(fp, SLOTS, rank, args.device, dtype)
        for slot in range(SLOTS):
            pool.load(slot, random_spec(f"a{slot}", "lora", fp, rank, 0, seed=slot,
                                        lora_targets=targets))  # fmt: skip
        groups = dict(pool.post_groups)
        times: dict[str, list[float]] = {"base": [], "joint": [], "per target": []}
        for _ in range(args.rounds):
            for mode in times:
                model.hooks = None if mode == "base" else PoolHooks(pool)
                pool.post_groups.clear()
                if mode == "joint":
                    pool.post_groups.update(groups)
                times[mode].append(step_ms(model, batch, cache, args.device))
        med = {mode: statistics.median(v) for mode, v in times.items()}
        row = dict(config=name, streams=STREAMS, slots=SLOTS, device=args.device,
                   base_ms=med["base"], joint_ms=med["joint"], per_target_ms=med["per target"],
                   joint_speedup=med["per target"] / med["joint"],
                   overhead_joint=med["joint"] / med["base"] - 1,
                   overhead_per_target=med["per target"] / med["base"] - 1,
                   rounds=times)  # fmt: skip
        rows.append(row)
        model.hooks = None
    print(f"{'configuration':32} {'base ms':>8} {'joint ms':>9} {'per-target ms':>14} "
          f"{'joint speedup':>14} {'overhead joint / per-target':>28}")  # fmt: skip
    for r in rows:
        print(f"{r['config']:32} {r['base_ms']:8.1f} {r['joint_ms']:9.1f} {r['per_target_ms']:14.1f}"
              f" {r['joint_speedup']:14.2f} {r['overhead_joint']:13.0%} / {r['overhead_per_target']:.0%}")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

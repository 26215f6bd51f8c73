"""Adapter overhead: engine output tok/s with 16 concurrent streams when every request uses the
base model, when they spread over 8 distinct LoRA adapters, and over 8 adapters of mixed kinds
(LoRA, series, parallel, prefix, prompt, IA3), as ratios to the base-only run.
LoRA comes in two sizes: r8 on q and v (peft's default targets) and r16 on all seven.

Configurations run interleaved round by round (base, lora, mixed, base, ...) in one engine so
that machine noise hits them alike; each reports the median over rounds. With --compile (the
default) every configuration runs twice per round, eager and through the compiled decode step
(the same engine, its compiled step switched off and on between runs), so the two columns
come from the same process and rounds. Adapters get random
weights in their real file formats and are registered like `--adapter NAME=PATH`; a warm-up
round loads every one into a device slot first, so this measures steady-state batching, not
loading. Greedy, `ignore_eos`: every request makes exactly --output-len tokens.

    .venv/bin/python benchmarks/bench_adapters.py [--model DIR|GGUF] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # siblings; never the root (its kernels/ shadows HF's)

from adapterserve.server.config import Settings  # noqa: E402
from adapterserve.server.engine.bootstrap import start_engine  # noqa: E402
from adapterserve.server.engine.engine import Engine  # noqa: E402
from adapterserve.server.engine.sampling import SamplingParams  # noqa: E402
from adapterserve.server.metrics import Metrics  # noqa: E402
from adapterserve.server.model.weights import read_config, resolve_model_dir  # noqa: E402

ATTN = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
}
MLP = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
MODULES = {**ATTN, **MLP}


class Shapes:
    def __init__(self, config: dict):
        self.hidden, self.layers = config["hidden_size"], config["num_hidden_layers"]
        self.heads = config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads", self.heads)
        self.head_dim = config.get("head_dim") or self.hidden // self.heads
        self.kv_dim = self.kv_heads * self.head_dim
        self.inter = config["intermediate_size"]

    def in_out(self, target: str) -> tuple[int, int]:
        h, kv, i = self.hidden, self.kv_dim, self.inter
        return {
            "q": (h, h),
            "k": (h, kv),
            "v": (h, kv),
            "o": (h, h),
            "gate": (h, i),
            "up": (h, i),
            "down": (i, h),
        }[target]


def write(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM", **config}))
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors")
    )
    return path


def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
    return torch.randn(*shape) * std


def lora(path: Path, s: Shapes, r: int, targets: list[str]) -> Path:
    tensors = {}
    for layer in range(s.layers):
        for t in targets:
            d_in, d_out = s.in_out(t)
            key = f"base_model.model.model.layers.{layer}.{MODULES[t]}"
            tensors[f"{key}.lora_A.weight"] = rand(r, d_in)
            tensors[f"{key}.lora_B.weight"] = rand(d_out, r)
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "bias": "none",
        "target_modules": [MODULES[t].split(".")[1] for t in targets],
    }
    return write(path, config, tensors)


def bottleneck(path: Path, s: Shapes, size: int, parallel: bool, targets: list[str]) -> Path:
    tensors = {}
    for layer in range(s.layers):
        for t in targets:
            d_in, d_out = s.in_out(t)
            if not parallel:  # series: input side (gate/up) is d_in -> d_in; down is out -> out
                d_in = d_out = d_in if t in ("gate", "up") else d_out
            key = f"base_model.model.model.layers.{layer}.{MODULES[t]}"
            tensors[f"{key}.adapter_down.weight"] = rand(size, d_in, std=0.05)
            tensors[f"{key}.adapter_up.weight"] = rand(d_out, size, std=0.05)
    config = {
        "peft_type": "BOTTLENECK",
        "bottleneck_size": size,
        "non_linearity": "tanh",
        "adapter_dropout": 0.0,
        "use_parallel_adapter": parallel,
        "scaling": 1.0,
        "target_modules": [MODULES[t].split(".")[1] for t in targets],
    }
    return write(path, config, tensors)


def ia3(path: Path, s: Shapes) -> Path:
    tensors = {}
    for layer in range(s.layers):
        key = f"base_model.model.model.layers.{layer}"
        tensors[f"{key}.self_attn.k_proj.ia3_l.weight"] = 1 + rand(s.kv_dim, 1, std=0.1)
        tensors[f"{key}.self_attn.v_proj.ia3_l.weight"] = 1 + rand(s.kv_dim, 1, std=0.1)
        tensors[f"{key}.mlp.down_proj.ia3_l.weight"] = 1 + rand(1, s.inter, std=0.1)
    config = {
        "peft_type": "IA3",
        "target_modules": ["k_proj", "v_proj", "down_proj"],
        "feedforward_modules": ["down_proj"],
    }
    return write(path, config, tensors)


def prefix(path: Path, s: Shapes, nvt: int) -> Path:
    config = {
        "peft_type": "PREFIX_TUNING",
        "num_virtual_tokens": nvt,
        "prefix_projection": False,
        "num_layers": s.layers,
        "token_dim": s.kv_dim,
        "num_attention_heads": s.kv_heads,
    }  # peft stores K/V sizes here (GQA)
    return write(path, config, {"prompt_embeddings": rand(nvt, 2 * s.layers * s.kv_dim, std=1.0)})


def prompt(path: Path, s: Shapes, nvt: int) -> Path:
    config = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": nvt, "token_dim": s.hidden}
    return write(path, config, {"prompt_embeddings": rand(nvt, s.hidden, std=0.05)})


def make_adapters(root: Path, s: Shapes) -> dict[str, list[str]]:
    """8 LoRA r16 on all seven projections, 8 LoRA r8 on q and v (peft's default targets) and 8
    of mixed kinds -> {group: [name=path, ...]}."""
    every = list(MODULES)
    loras = {f"lora{i}": lora(root / f"lora{i}", s, 16, every) for i in range(8)}
    light = {f"loraqv{i}": lora(root / f"loraqv{i}", s, 8, ["q", "v"]) for i in range(8)}
    mixed = {
        "m-lora-r8-qv": lora(root / "m-lora-r8-qv", s, 8, ["q", "v"]),
        "m-lora-r32": lora(root / "m-lora-r32", s, 32, ["q", "k", "v", "up", "down"]),
        "m-series": bottleneck(root / "m-series", s, 16, False, ["down"]),
        "m-parallel": bottleneck(root / "m-parallel", s, 16, True, ["up"]),
        "m-parallel-qv": bottleneck(root / "m-parallel-qv", s, 8, True, ["q", "v"]),
        "m-prefix": prefix(root / "m-prefix", s, 10),
        "m-prompt": prompt(root / "m-prompt", s, 10),
        "m-ia3": ia3(root / "m-ia3", s),
    }
    return {
        "lora": [f"{n}={p}" for n, p in loras.items()],
        "light": [f"{n}={p}" for n, p in light.items()],
        "mixed": [f"{n}={p}" for n, p in mixed.items()],
    }


async def run_round(
    engine: Engine, prompts: list[list[int]], models: list[str | None], out_len: int
) -> float:
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)

    async def one(p: list[int], model: str | None) -> int:
        n = 0
        async for out in engine.add_request(p, params, model=model):
            if out.error:
                raise RuntimeError(out.error)
            n += len(out.token_ids)
        return n

    start = time.perf_counter()
    counts = await asyncio.gather(*[one(p, m) for p, m in zip(prompts, models, strict=True)])
    return sum(counts) / (time.perf_counter() - start)


async def main_async(args: argparse.Namespace) -> dict:
    model_dir = resolve_model_dir(args.model, Settings().cache_dir)
    shapes = Shapes(read_config(model_dir))
    with tempfile.TemporaryDirectory() as tmp:
        # Written in a child process: torch ops on this (the event loop's) thread would leave an
        # OpenMP team here that slows the engine thread's steps for the rest of the run.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            groups = pool.apply(make_adapters, (Path(tmp), shapes))
        settings = Settings(
            model=str(model_dir),
            device=args.device,
            max_num_seqs=args.concurrency,
            adapters=[a for g in groups.values() for a in g],
            adapter_slots=24,  # every adapter resident: this measures batching, not loading
            max_adapter_rank=32,
            cache_dir=Path(tmp) / "cache",
            max_model_len=1024,
            kv_cache_memory_mb=args.kv_cache_memory_mb,
            compile="on" if args.compile else "off",
        )
        started = time.perf_counter()
        engine = await start_engine(settings, Metrics())
        startup_s = time.perf_counter() - started
        modes = {"eager": None, **({"compiled": engine.compiled} if engine.compiled else {})}
        try:
            vocab, rnd = engine.vocab_size, random.Random(0)  # no torch on this thread
            prompts = [
                [rnd.randrange(100, vocab) for _ in range(args.prompt_len)]
                for _ in range(args.concurrency)
            ]
            names = {k: [item.split("=", 1)[0] for item in v] for k, v in groups.items()}
            configs = {
                "base": [None] * args.concurrency,
                "8 LoRA r8 (q, v)": [names["light"][i % 8] for i in range(args.concurrency)],
                "8 LoRA r16 (all projections)": [
                    names["lora"][i % 8] for i in range(args.concurrency)
                ],
                "8 mixed kinds": [names["mixed"][i % 8] for i in range(args.concurrency)],
            }
            for compiled in modes.values():  # warm-up: adapters into slots, compiled graphs
                engine.compiled = compiled
                for models in configs.values():
                    await run_round(engine, prompts, models, 4)
            results = {(k, mode): [] for k in configs for mode in modes}
            for r in range(args.rounds):
                for label, models in configs.items():
                    for mode, compiled in modes.items():
                        engine.compiled = compiled  # the engine is idle between runs
                        tps = await run_round(engine, prompts, models, args.output_len)
                        results[(label, mode)].append(tps)
                        print(f"round {r + 1}: {label:<30} {mode:<9} {tps:8.1f} tok/s", flush=True)
        finally:
            await engine.stop()
            engine.registry.close()
    rows = {}
    for mode in modes:
        base = statistics.median(results[("base", mode)])
        for label in configs:
            values = results[(label, mode)]
            rows.setdefault(label, {})[mode] = {
                "tok_s_median": statistics.median(values),
                "tok_s_rounds": values,
                "ratio_to_base": statistics.median(values) / base,
            }
    return {
        "model": str(model_dir),
        "device": args.device,
        "concurrency": args.concurrency,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "modes": list(modes),
        "startup_s": startup_s,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF dir or .gguf; default: embedded model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kv-cache-memory-mb", type=int, default=256)
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false", help="eager only (no compiled column)"
    )
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "adapters.json")
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    modes = report["modes"]
    header = "".join(f"{m + ' tok/s':>16}{m + ' /base':>14}" for m in modes)
    print(
        f"\n{'configuration':<32}{header}{'compiled/eager':>16}"
        if len(modes) > 1
        else f"\n{'configuration':<32}{header}"
    )
    for label, row in report["results"].items():
        cells = "".join(
            f"{row[m]['tok_s_median']:>16.1f}{row[m]['ratio_to_base']:>14.2f}" for m in modes
        )
        speedup = (
            f"{row['compiled']['tok_s_median'] / row['eager']['tok_s_median']:>16.2f}"
            if len(modes) > 1
            else ""
        )
        print(f"{label:<32}{cells}{speedup}")
    print(f"engine start-up (incl. compile warm-up): {report['startup_s']:.1f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

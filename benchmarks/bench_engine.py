"""Output tok/s: our engine vs transformers' generate, and our server's aggregate over HTTP.

All runs on the same model, greedy, `ignore_eos` / `min_new_tokens` so every request produces
exactly --output-len tokens from a --prompt-len-token prompt. Prints a table, writes JSON.

    .venv/bin/python benchmarks/bench_engine.py [--model DIR|GGUF] [--output-len 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # siblings; never the root (its kernels/ shadows HF's)

from adapterserve.server.config import Settings  # noqa: E402
from adapterserve.server.engine.bootstrap import start_engine  # noqa: E402
from adapterserve.server.engine.sampling import SamplingParams  # noqa: E402
from adapterserve.server.metrics import Metrics  # noqa: E402
from adapterserve.server.model.weights import resolve_model_dir  # noqa: E402


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (n, length), generator=g).tolist()


def bench_transformers(model_dir: Path, prompts: list[list[int]], out_len: int) -> float:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    kwargs = dict(
        max_new_tokens=out_len,
        min_new_tokens=out_len,
        do_sample=False,
        attention_mask=torch.ones_like(ids),
        pad_token_id=0,
    )
    hf.generate(ids[:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, **kwargs)
    elapsed = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / elapsed


async def bench_engine_inproc(
    settings: Settings, prompts: list[list[int]], out_len: int, repeats: int
) -> dict[str, float]:
    """Output tok/s of `prompts` at once, eager and (when the settings compile) through the
    compiled decode step of the same engine, alternating `repeats` times (median each), and the
    engine's start-up seconds (compile warm-up included)."""
    started = time.perf_counter()
    engine = await start_engine(settings, Metrics())
    await engine.until_ready()  # the compiled step warms up in the engine's loop
    startup_s = time.perf_counter() - started
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    modes = {"eager": None, **({"compiled": engine.compiled} if engine.compiled else {})}

    async def one(p):
        return sum([len(o.token_ids) async for o in engine.add_request(p, params)])

    try:
        runs: dict[str, list[float]] = {mode: [] for mode in modes}
        for compiled in modes.values():  # warm-up (and the compiled step's first graphs)
            engine.compiled = compiled
            await asyncio.gather(*[one(p[:8]) for p in prompts])
        for _ in range(repeats):
            for mode, compiled in modes.items():
                engine.compiled = compiled  # the engine is idle between runs
                start = time.perf_counter()
                tokens = sum(await asyncio.gather(*[one(p) for p in prompts]))
                runs[mode].append(tokens / (time.perf_counter() - start))
        return {"startup_s": startup_s, **{m: statistics.median(v) for m, v in runs.items()}}
    finally:
        await engine.stop()


def isolated(fn, *args):
    """Run one measurement in a fresh process, so no run inherits another's thread pools."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def engine_tok_s(
    settings: Settings, prompts: list[list[int]], out_len: int, repeats: int = 3
) -> dict[str, float]:
    return asyncio.run(bench_engine_inproc(settings, prompts, out_len, repeats))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: str | None,
    port: int,
    max_num_seqs: int,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """`adapterserve serve` with `extra` flags and `env` added, once it is ready."""
    cmd = [
        sys.executable,
        "-P",
        "-m",
        "adapterserve.server.cli",
        "serve",
        "--port",
        str(port),
        "--max-num-seqs",
        str(max_num_seqs),
        *extra,
    ]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, "ADAPTERSERVE_LOG_LEVEL": "warning", **(env or {})}
    )
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("server exited during start-up")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become ready")


async def http_request(
    client: httpx.AsyncClient, model_id: str, prompt: list[int], out_len: int, stream: bool
) -> int:
    body = {
        "model": model_id,
        "prompt": prompt,
        "max_tokens": out_len,
        "temperature": 0,
        "ignore_eos": True,
    }
    if not stream:
        resp = await client.post("/v1/completions", json=body)
        resp.raise_for_status()
        return resp.json()["usage"]["completion_tokens"]
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                tokens = usage["completion_tokens"] if usage else tokens
    return tokens


async def bench_http(
    port: int,
    concurrency: int,
    prompts: list[list[int]],
    out_len: int,
    stream: bool,
    adapters: list[str] | None = None,
) -> float:
    """Output tok/s of `concurrency` clients sending `prompts`; with `adapters`, request i
    names adapter i mod len(adapters) (each warmed into a device slot first)."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        base = (await client.get("/v1/models")).json()["data"][0]["id"]
        models = adapters or [base]
        for model in models:  # warm-up (an adapter: loaded into its slot)
            await http_request(client, model, prompts[0][:8], 4, stream)
        queue = [(prompt, models[i % len(models)]) for i, prompt in enumerate(prompts)]

        async def worker() -> int:
            done = 0
            while queue:
                prompt, model = queue.pop()
                done += await http_request(client, model, prompt, out_len, stream)
            return done

        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*[worker() for _ in range(concurrency)]))
        return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", default=None, help="HF dir or .gguf; default: embedded SmolLM2-135M-Instruct"
    )
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument(
        "--skip-transformers", action="store_true", help="only our engine (quick iterations)"
    )
    ap.add_argument("--no-http", dest="http", action="store_false", help="in-process runs only")
    ap.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="eager only (no compiled column, no compile start-up)",
    )
    ap.add_argument(
        "--loras",
        type=int,
        default=0,
        help="also serve this many random LoRA r16 (all projections) over HTTP and run "
        "16 streams spread over them (ratio to base in the same server)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="alternating eager/compiled runs")
    ap.add_argument("--json", type=Path, default=ROOT / "bench-results" / "engine.json")
    args = ap.parse_args()

    settings = Settings(
        model=args.model,
        max_num_seqs=max(args.concurrency),
        log_level="warning",
        compile="on" if args.compile else "off",
    )
    model_dir = resolve_model_dir(args.model, settings.cache_dir)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rows: list[tuple[str, float]] = []

    one, sixteen = (
        make_prompts(1, args.prompt_len, vocab),
        make_prompts(16, args.prompt_len, vocab, 1),
    )
    if not args.skip_transformers:
        rows.append(
            (
                "transformers generate, 1 stream",
                isolated(bench_transformers, model_dir, one, args.output_len),
            )
        )
        rows.append(
            (
                "transformers generate, static batch 16",
                isolated(bench_transformers, model_dir, sixteen, args.output_len),
            )
        )
    startup: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as cache:  # a cold compile cache, then the same warm
        settings = settings.model_copy(update={"cache_dir": Path(cache)})
        for name, prompts in (("1 stream", one), ("16 at once", sixteen)):
            result = isolated(engine_tok_s, settings, prompts, args.output_len, args.repeats)
            startup["cold" if not startup else "warm"] = result.pop("startup_s")
            for mode, tok_s in result.items():
                rows.append((f"adapterserve engine (in-process, {mode}), {name}", tok_s))

    if args.http:  # the default server (engine core process), then --engine-process false
        loras = tempfile.TemporaryDirectory()
        flags = write_loras(Path(loras.name), model_dir, args.loras, 16) if args.loras else []
        names = [flag.split("=", 1)[0] for flag in flags]
        for label, extra in HTTP_MODES:
            port = free_port()
            adapter_flags = tuple(item for flag in flags for item in ("--adapter", flag))
            server = start_server(args.model, port, max(args.concurrency), extra + adapter_flags)
            try:
                for c in args.concurrency:
                    prompts = make_prompts(max(c, 2 * c), args.prompt_len, vocab, seed=c)
                    for stream in (True, False):
                        name = f"adapterserve HTTP{label}, {c} concurrent {'streaming' if stream else 'non-streaming'}"
                        rows.append(
                            (
                                name,
                                asyncio.run(bench_http(port, c, prompts, args.output_len, stream)),
                            )
                        )
                if names:
                    prompts = make_prompts(32, args.prompt_len, vocab, seed=16)
                    name = (
                        f"adapterserve HTTP{label}, 16 concurrent streaming, {len(names)} LoRA r16"
                    )
                    rows.append(
                        (
                            name,
                            asyncio.run(
                                bench_http(port, 16, prompts, args.output_len, True, names)
                            ),
                        )
                    )
            finally:
                server.terminate()
                server.wait(60)
        loras.cleanup()

    report(rows, args, startup)


HTTP_MODES = (("", ()), (" (one process)", ("--engine-process", "false")))


def write_loras(folder: Path, model_dir: Path, count: int, rank: int) -> list[str]:
    """`count` random LoRA of `rank` on all seven projections; their `--adapter` values."""
    from adapterserve.loadtest.synthetic import BaseDims, make_adapter, write_adapter

    dims = BaseDims.from_config(json.loads((model_dir / "config.json").read_text()))
    flags = []
    for i in range(count):
        config, tensors = make_adapter(dims, "lora", rank, seed=500 + i)
        flags.append(f"lora{i}={write_adapter(folder / f'lora{i}', config, tensors)}")
    return flags


def report(
    rows: list[tuple[str, float]], args: argparse.Namespace, startup: dict[str, float]
) -> None:
    table = dict(rows)
    print(f"\n{'run':<60} {'output tok/s':>12}")
    for name, value in rows:
        print(f"{name:<60} {value:>12.1f}")
    pairs = {
        "engine_1_stream_vs_hf_1_stream": (
            "adapterserve engine (in-process, eager), 1 stream",
            "transformers generate, 1 stream",
        ),
        "compiled_1_stream_vs_hf_1_stream": (
            "adapterserve engine (in-process, compiled), 1 stream",
            "transformers generate, 1 stream",
        ),
        "compiled_vs_eager_1_stream": (
            "adapterserve engine (in-process, compiled), 1 stream",
            "adapterserve engine (in-process, eager), 1 stream",
        ),
        "engine_16_vs_hf_static_16": (
            "adapterserve engine (in-process, eager), 16 at once",
            "transformers generate, static batch 16",
        ),
        "compiled_16_vs_hf_static_16": (
            "adapterserve engine (in-process, compiled), 16 at once",
            "transformers generate, static batch 16",
        ),
        "compiled_vs_eager_16": (
            "adapterserve engine (in-process, compiled), 16 at once",
            "adapterserve engine (in-process, eager), 16 at once",
        ),
        "http_1_stream_vs_hf_1_stream": (
            "adapterserve HTTP, 1 concurrent streaming",
            "transformers generate, 1 stream",
        ),
        "http_16_streaming_vs_hf_static_16": (
            "adapterserve HTTP, 16 concurrent streaming",
            "transformers generate, static batch 16",
        ),
        "http_16_nonstreaming_vs_hf_static_16": (
            "adapterserve HTTP, 16 concurrent non-streaming",
            "transformers generate, static batch 16",
        ),
        "http_1_stream_vs_in_process_1_stream": (
            "adapterserve HTTP, 1 concurrent streaming",
            "adapterserve engine (in-process, eager), 1 stream",
        ),
        "http_16_streaming_vs_in_process_16": (
            "adapterserve HTTP, 16 concurrent streaming",
            "adapterserve engine (in-process, eager), 16 at once",
        ),
        "one_process_http_1_stream_vs_in_process_1_stream": (
            "adapterserve HTTP (one process), 1 concurrent streaming",
            "adapterserve engine (in-process, eager), 1 stream",
        ),
        "one_process_http_16_streaming_vs_in_process_16": (
            "adapterserve HTTP (one process), 16 concurrent streaming",
            "adapterserve engine (in-process, eager), 16 at once",
        ),
        "http_8_lora_vs_base_16_streaming": (
            "adapterserve HTTP, 16 concurrent streaming, 8 LoRA r16",
            "adapterserve HTTP, 16 concurrent streaming",
        ),
        "one_process_http_8_lora_vs_base_16_streaming": (
            "adapterserve HTTP (one process), 16 concurrent streaming, 8 LoRA r16",
            "adapterserve HTTP (one process), 16 concurrent streaming",
        ),
        "http_1_stream_engine_process_vs_one_process": (
            "adapterserve HTTP, 1 concurrent streaming",
            "adapterserve HTTP (one process), 1 concurrent streaming",
        ),
        "http_16_streaming_engine_process_vs_one_process": (
            "adapterserve HTTP, 16 concurrent streaming",
            "adapterserve HTTP (one process), 16 concurrent streaming",
        ),
    }
    ratios = {k: table[a] / table[b] for k, (a, b) in pairs.items() if a in table and b in table}
    for name, value in ratios.items():
        print(f"{name:<60} {value:>12.2f}x")
    for cache, seconds in startup.items():
        print(f"{'engine start-up, ' + cache + ' compile cache':<60} {seconds:>11.1f}s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
    }
    args.json.write_text(
        json.dumps(
            {"meta": meta, "tok_per_s": table, "ratios": ratios, "startup_s": startup}, indent=2
        )
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

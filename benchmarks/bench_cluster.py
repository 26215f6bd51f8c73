"""Ray Serve scale-out (server/cluster): the same workload A trace (loadtest, 32 LoRA adapters)
against 1 engine replica, 2 replicas, and 2 replicas with affinity off (Ray's plain load
balancing, no multiplexed model id): throughput, TTFT p99, adapter loads per request.

    .venv/bin/python benchmarks/bench_cluster.py                     # default model, ~5 min
    .venv/bin/python benchmarks/bench_cluster.py --num-requests 40   # quicker

One local Ray instance (--num-cpus); the application is redeployed for each configuration
(fresh replicas: every run starts with no adapter in a slot), the adapters uploaded once to
the shared store. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # siblings; never the root (its kernels/ shadows HF's)

from adapterserve.server.cluster import launch  # noqa: E402
from adapterserve.server.cluster.reports import read_reports  # noqa: E402
from adapterserve.server.config import Settings  # noqa: E402

CONFIGS = (("1 replica", 1, True), ("2 replicas", 2, True), ("2 replicas, affinity off", 2, False))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF dir or .gguf (default: the embedded model)")
    parser.add_argument("--num-adapters", type=int, default=32)
    parser.add_argument("--num-requests", type=int, default=96)
    parser.add_argument("--rate", type=float, default=3.0, help="offered req/s (Poisson)")
    parser.add_argument("--input-len", default="8,32")
    parser.add_argument("--output-len", default="8,16")
    parser.add_argument("--slots", type=int, default=8, help="device adapter slots per replica")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--port", type=int, default=8130)
    parser.add_argument("--out", type=Path, default=Path("bench-results/cluster.json"))
    return parser.parse_args()


def samples(url: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of `name` in the ingress's /metrics."""
    out = []
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.partition("}")[0]))
            out.append((labels, float(line.rsplit(" ", 1)[1])))
    return out


def adapter_loads(url: str) -> float:
    return sum(value for _, value in samples(url, "adapterserve_adapter_loads_total"))


def placement(url: str) -> dict:
    """How the trace's adapters spread over the replicas, and the routing hit rate."""
    served: dict[str, set[str]] = {}
    for labels, value in samples(url, "adapterserve_requests_total"):
        if value and labels.get("replica") and labels.get("model", "").startswith("lt"):
            served.setdefault(labels["model"], set()).add(labels["replica"])
    routing = {"hit": 0.0, "miss": 0.0}
    for labels, value in samples(url, "adapterserve_cluster_routing_total"):
        routing[labels["result"]] += value
    total = routing["hit"] + routing["miss"]
    return {
        "adapters_on_several_replicas": sum(len(r) > 1 for r in served.values()),
        "routing_hit_rate": routing["hit"] / total if total else None,
    }


def wait_ready(url: str, settings: Settings, replicas: int, exclude: set[str]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        fresh = [r for r in read_reports(settings.cluster_state_dir) if r.replica not in exclude]
        if len(fresh) >= replicas and httpx.get(f"{url}/ready", timeout=10).status_code == 200:
            return
        time.sleep(1)
    raise RuntimeError("the replicas did not come up")


def loadtest(args: argparse.Namespace, url: str, name: str, out_dir: Path, setup: bool) -> dict:
    command = [
        sys.executable,
        "-P",
        "-m",
        "adapterserve.loadtest",
        "run",
        "--workload",
        "A",
        "--url",
        url,
        "--num-adapters",
        str(args.num_adapters),
        "--num-requests",
        str(args.num_requests),
        "--rate",
        str(args.rate),
        "--seed",
        "0",
        "--input-len",
        args.input_len,
        "--output-len",
        args.output_len,
        "--out-dir",
        str(out_dir),
        "--name",
        name,
        "--no-plots",
        "--no-progress",
        "--timeout",
        "600",
    ]
    if setup:
        command += ["--setup"]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out_dir / f"{name}.json").read_text())


def summary(document: dict) -> dict:
    run = document["runs"][0]
    return {
        "requests_per_s": run["throughput"]["requests_per_s"],
        "output_tokens_per_s": run["throughput"]["output_tokens_per_s"],
        "ttft_p99_s": run["latency"]["ttft_s"]["p99"],
        "completed": run["requests"]["completed"],
        "failed": run["requests"]["failed"],
    }


def main() -> None:
    import ray

    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    url = f"http://127.0.0.1:{args.port}"
    results = []
    ray.init(
        num_cpus=args.num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=200 * 2**20,
    )
    try:
        seen: set[str] = set()
        for i, (label, replicas, affinity) in enumerate(CONFIGS):
            settings = Settings(
                model=args.model,
                port=args.port,
                replicas=replicas,
                cluster_affinity=affinity,
                adapter_slots=args.slots,
                cluster_dir=work / "cluster",
                adapter_store_dir=work / "store",
            )
            if i == 0:
                launch.start(settings)
            else:
                launch.deploy(settings)
            wait_ready(url, settings, replicas, seen)
            seen |= {r.replica for r in read_reports(settings.cluster_state_dir)}
            before = adapter_loads(url)
            document = loadtest(args, url, f"run{i}", work, setup=i == 0)
            time.sleep(1.5)  # the replicas' last reports
            loads = adapter_loads(url) - before
            row = {
                "config": label,
                "replicas": replicas,
                "affinity": affinity,
                **summary(document),
                "adapter_loads": loads,
                "loads_per_request": loads / args.num_requests,
                **placement(url),
            }
            results.append(row)
            print(f"{label}: {row}", file=sys.stderr)
    finally:
        launch.stop()
    print_table(args, results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1
        )
    )
    print(f"wrote {args.out}")


def print_table(args: argparse.Namespace, results: list[dict]) -> None:
    print(
        f"\nworkload A: {args.num_adapters} adapters, {args.num_requests} requests at "
        f"{args.rate} req/s, input {args.input_len}, output {args.output_len}, "
        f"{args.slots} slots per replica"
    )
    print(
        "| config | req/s | output tok/s | TTFT p99 ms | adapter loads | loads / request | "
        "routing hit rate | adapters on both replicas | failed |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        hit_rate = "-" if r["routing_hit_rate"] is None else f"{r['routing_hit_rate']:.2f}"
        print(
            f"| {r['config']} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
            f"{r['ttft_p99_s'] * 1000:.0f} | {r['adapter_loads']:.0f} | "
            f"{r['loads_per_request']:.2f} | {hit_rate} | "
            f"{r['adapters_on_several_replicas']} | {r['failed']} |"
        )


if __name__ == "__main__":
    main()

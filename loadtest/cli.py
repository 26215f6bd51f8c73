"""`adapterserve-loadtest` (or `python -m adapterserve.loadtest`): workloads A/B/C against one or more servers.

adapterserve-loadtest run --workload A --rate 2 --duration 60 --num-adapters 8,32 --setup
adapterserve-loadtest run --workload B --mix distinct,identical --num-requests 64 --concurrency 8
adapterserve-loadtest setup --num-adapters 32 --kinds lora,ia3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from adapterserve.loadtest import report, synthetic
from adapterserve.loadtest.client import RequestResult, Target, run_closed_loop, run_open_loop
from adapterserve.loadtest.discovery import scrape_metrics, served_models
from adapterserve.loadtest.prometheus import MetricNames, adapter_metrics, parse_prometheus
from adapterserve.loadtest.workloads import (
    MIXES,
    TraceConfig,
    build_trace,
    count_for_duration,
    mix_adapter_count,
)

log = logging.getLogger("loadtest")
CLOSED_LOOP_DURATION_DRAWS = 100_000
DEFAULT_KINDS = {"A": ("lora",), "B": ("lora",), "C": synthetic.KINDS}


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    return [positive_int(part) for part in text.split(",") if part.strip()]


def length_range(text: str) -> tuple[int, int]:
    """`LOW,HIGH` for uniform lengths on [LOW, HIGH)."""
    values = int_list(text)
    if len(values) != 2 or values[0] >= values[1]:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with 1 <= LOW < HIGH, got {text!r}")
    return values[0], values[1]


def choice_list(choices: Sequence[str]):
    def parse(text: str) -> list[str]:
        items = [part.strip() for part in text.split(",") if part.strip()]
        bad = [item for item in items if item not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma list from {list(choices)}, got {text!r}"
            )
        return items

    return parse


def name_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def target_list(text: str) -> list[Target]:
    try:
        return [Target.parse(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("ADAPTERSERVE_API_KEY"),
        help="Bearer key for the API (env ADAPTERSERVE_API_KEY)",
    )
    parser.add_argument(
        "--admin-api-key",
        default=os.environ.get("ADAPTERSERVE_ADMIN_API_KEY"),
        help="Bearer key for uploads, if different (env ADAPTERSERVE_ADMIN_API_KEY)",
    )
    parser.add_argument(
        "--timeout", type=positive_float, default=600.0, help="per-request timeout, s"
    )


def add_setup_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kinds",
        type=choice_list(synthetic.KINDS),
        help="adapter kinds, round-robin (default: lora; all six for workload C)",
    )
    parser.add_argument(
        "--ranks",
        type=int_list,
        default=list(synthetic.DEFAULT_RANKS),
        help="ranks (bottleneck sizes, virtual tokens), round-robin; default 64,32,16,8",
    )
    parser.add_argument(
        "--adapter-prefix", default="lt", help="synthetic adapter names start with this"
    )
    parser.add_argument(
        "--base-config",
        type=Path,
        help="HF config.json of the base model, when the server's card lacks its dims",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adapterserve-loadtest", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--log-level", default="WARNING")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="replay a workload trace and report (see docs/loadtest.md)"
    )
    add_server_args(run)
    add_setup_args(run)
    run.add_argument("--workload", choices=("A", "B", "C"), default="A")
    run.add_argument(
        "--compare",
        type=target_list,
        help="[label=]URL[#base-only],... run the same trace against each; ratios to the first",
    )
    run.add_argument(
        "--base-only", action="store_true", help="every request uses the base model id"
    )
    loop = run.add_mutually_exclusive_group(required=True)
    loop.add_argument("--rate", type=positive_float, help="open loop: arrivals per second")
    loop.add_argument("--concurrency", type=positive_int, help="closed loop: requests in flight")
    run.add_argument("--cv", type=positive_float, default=1.0, help="arrival CV (1 = Poisson)")
    run.add_argument(
        "--duration", type=positive_float, help="seconds during which requests are sent"
    )
    run.add_argument("--num-requests", type=positive_int, help="requests in the trace")
    run.add_argument(
        "--alpha", type=positive_float, default=1.0, help="power-law popularity (A, C)"
    )
    run.add_argument(
        "--num-adapters",
        type=int_list,
        help="A/C: adapters in the trace; a list (8,32,128) runs a sweep",
    )
    run.add_argument(
        "--mix", type=choice_list(MIXES), default=list(MIXES), help="B: popularity mixes"
    )
    run.add_argument("--input-len", type=length_range, default=(8, 64), help="LOW,HIGH tokens")
    run.add_argument("--output-len", type=length_range, default=(8, 64), help="LOW,HIGH tokens")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--adapters", type=name_list, help="adapter names (default: GET /v1/models)")
    run.add_argument(
        "--setup",
        action="store_true",
        help="upload synthetic adapters first (to every target that is not base-only)",
    )
    run.add_argument("--slo-ttft", type=positive_float, default=6.0, help="SLO on TTFT, s")
    run.add_argument("--slo-tpot", type=positive_float, help="SLO on TPOT, s (default unchecked)")
    run.add_argument(
        "--slo-e2e", type=positive_float, help="SLO on e2e latency, s (default unchecked)"
    )
    run.add_argument("--out-dir", type=Path, default=Path("bench-results/loadtest"))
    run.add_argument("--name", help="file name stem (default: workload-letter + time)")
    run.add_argument("--no-plots", action="store_true")
    run.add_argument("--no-progress", action="store_true")
    for field in MetricNames.__dataclass_fields__:
        run.add_argument(
            f"--metric-{field.replace('_', '-')}",
            dest=f"metric_{field}",
            default=getattr(MetricNames(), field),
            help="server metric name",
        )
    setup = commands.add_parser("setup", help="upload N synthetic adapters to a server")
    add_server_args(setup)
    add_setup_args(setup)
    setup.add_argument("--num-adapters", type=positive_int, required=True)
    setup.add_argument("--seed", type=int, default=0)
    setup.add_argument("--no-replace", action="store_true", help="fail on existing names")
    setup.add_argument("--save-dir", type=Path, help="also write the adapter folders here")
    return parser


def headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def make_client(url: str, key: str | None, timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        headers=headers(key),
        timeout=httpx.Timeout(timeout, connect=30.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=1024),
    )


@dataclass(frozen=True)
class Cell:
    """One point of the experiment: a trace replayed against every target."""

    key: str
    workload: str
    num_adapters: int
    mix: str | None


def plan_cells(args: argparse.Namespace, available: int) -> list[Cell]:
    if args.workload == "B":
        count = args.num_requests
        return [
            Cell(f"B-{mix}", f"B/{mix}", mix_adapter_count(mix, count), mix) for mix in args.mix
        ]
    counts = args.num_adapters or [available]
    return [Cell(f"{args.workload}-n{n}", args.workload, n, None) for n in counts]


def adapters_needed(args: argparse.Namespace) -> int | None:
    if args.base_only and not args.setup and not args.adapters:
        return None
    if args.workload == "B":
        return max(mix_adapter_count(mix, args.num_requests) for mix in args.mix)
    return max(args.num_adapters) if args.num_adapters else None


def trace_count(args: argparse.Namespace) -> int:
    if args.num_requests:
        return args.num_requests
    if args.rate:
        return count_for_duration(args.rate, args.duration)
    return CLOSED_LOOP_DURATION_DRAWS


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.command != "run":
        return
    if args.duration is None and args.num_requests is None:
        parser.error("give --duration SECONDS or --num-requests N (or both: whichever ends first)")
    if args.workload == "B" and args.num_requests is None:
        parser.error("workload B is N requests: give --num-requests N")
    if args.workload == "B" and args.num_adapters:
        parser.error(
            "workload B takes its adapter count from --mix and --num-requests, not --num-adapters"
        )


async def prepare_adapters(
    args: argparse.Namespace, targets: Sequence[Target]
) -> tuple[list[str], dict]:
    """Adapter names for the trace (given, uploaded by --setup, or discovered) and upload log."""
    needed = adapters_needed(args)
    uploads: dict[str, list[dict]] = {}
    if args.adapters:
        names = list(args.adapters)
    elif args.setup:
        if needed is None:
            raise SystemExit("--setup needs --num-adapters (A/C) or --num-requests (B)")
        kinds = args.kinds or DEFAULT_KINDS[args.workload]
        plans = synthetic.plan_adapters(needed, kinds, args.ranks, args.adapter_prefix, args.seed)
        with progress_bar(args.no_progress) as progress:
            for target in targets:
                if not target.base_only:
                    uploads[target.label] = await setup_target(args, target, plans, progress)
        names = [plan.name for plan in plans]
    else:
        async with make_client(targets[0].url, args.api_key, args.timeout) as client:
            names = list((await served_models(client)).adapters)
    if needed is not None and len(names) < needed:
        raise SystemExit(
            f"the trace needs {needed} adapters, but {len(names)} are available "
            f"({'given' if args.adapters else 'served'}); pass --setup to upload synthetic ones"
        )
    if not names and not all(t.base_only for t in targets) and not args.base_only:
        raise SystemExit("no adapters served: pass --setup, --adapters, or --base-only")
    return names, uploads


async def setup_target(
    args: argparse.Namespace,
    target: Target,
    plans: Sequence[synthetic.AdapterPlan],
    progress: Progress,
) -> list[dict]:
    """Upload the planned synthetic adapters to one target; the per-adapter outcomes."""
    task = progress.add_task(f"upload to {target.label}", total=len(plans), ok=0, fail=0, rej=0)
    counts = {"ok": 0, "fail": 0}

    def on_done(result: synthetic.UploadResult) -> None:
        counts["fail" if result.error else "ok"] += 1
        progress.update(task, advance=1, **counts)

    async with make_client(target.url, args.admin_api_key or args.api_key, args.timeout) as client:
        served = await served_models(client)
        dims = await synthetic.fetch_base_dims(
            client, served.base, served.base_card, args.base_config
        )
        results = await synthetic.upload_adapters(client, dims, plans, True, on_done)
    if counts["fail"] == len(results):
        log.warning("%s: every upload failed, e.g. %s", target.url, results[0].error)
    return [asdict(r) for r in results]


def progress_bar(disabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ok {task.fields[ok]} fail {task.fields[fail]} rej {task.fields[rej]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=disabled,
        transient=False,
    )


async def run_target(
    args: argparse.Namespace,
    cell: Cell,
    target: Target,
    names: Sequence[str],
    progress: Progress,
) -> tuple[dict, list[RequestResult]]:
    """Replay the cell's trace against one target and summarise it."""
    trace = build_trace(
        TraceConfig(
            count=trace_count(args),
            num_adapters=max(cell.num_adapters, 1),
            seed=args.seed,
            rate=args.rate,
            cv=args.cv,
            alpha=args.alpha,
            mix=cell.mix,  # type: ignore[arg-type]
            input_len=args.input_len,
            output_len=args.output_len,
        )
    )
    if args.rate and args.duration:
        trace = [r for r in trace if r.arrival_s < args.duration]
    async with make_client(target.url, args.api_key, args.timeout) as client:
        served = await served_models(client)
        base_only = target.base_only or args.base_only or not names
        models = [served.base if base_only else names[r.adapter] for r in trace]
        before = await scrape_metrics(client)
        total = None if (args.concurrency and not args.num_requests) else len(trace)
        task = progress.add_task(f"{target.label} {cell.key}", total=total, ok=0, fail=0, rej=0)
        counts = {"completed": 0, "failed": 0, "rejected": 0}

        def on_done(result: RequestResult) -> None:
            counts[result.status] += 1
            progress.update(
                task,
                advance=1,
                ok=counts["completed"],
                fail=counts["failed"],
                rej=counts["rejected"],
            )

        start = time.perf_counter()
        if args.rate:
            results = await run_open_loop(client, trace, models, on_done)
        else:
            results = await run_closed_loop(
                client, trace, models, args.concurrency, on_done, args.duration
            )
        duration = time.perf_counter() - start
        after = await scrape_metrics(client)
        registered = await count_registered(client)
    run = report.summarize(
        results, duration, report.Slo(args.slo_ttft, args.slo_tpot, args.slo_e2e)
    )
    run["target"] = {
        "url": target.url,
        "label": target.label,
        "base_only": base_only,
        "base_model": served.base,
    }
    run["workload"] = workload_info(args, cell)
    used = {m for m in models[: len(results)]} - {served.base}
    run["adapters"] = {
        "used": 0 if base_only else cell.num_adapters,  # 0: every request on the base
        "distinct_in_trace": len(used),
        "registered": registered,
    }
    run["server_metrics"] = server_metrics(args, before, after)
    return run, results


async def count_registered(client: httpx.AsyncClient) -> int | None:
    try:
        return len((await served_models(client)).adapters)
    except (RuntimeError, httpx.HTTPError, ValueError):
        return None


def server_metrics(args: argparse.Namespace, before: str | None, after: str | None) -> dict:
    if before is None or after is None:
        note = "the server has no /metrics endpoint"
        return {
            key: {"value": None, "metric": None, "note": note}
            for key in ("distinct_adapters_per_step", "adapter_loads", "cache_hit_rate")
        }
    names = MetricNames(
        **{f: getattr(args, f"metric_{f}") for f in MetricNames.__dataclass_fields__}
    )
    return adapter_metrics(parse_prometheus(before), parse_prometheus(after), names)


def workload_info(args: argparse.Namespace, cell: Cell) -> dict:
    return {
        "name": cell.workload,
        "mix": cell.mix,
        "num_adapters": cell.num_adapters,
        "loop": "open" if args.rate else "closed",
        "rate": args.rate,
        "cv": args.cv if args.rate else None,
        "concurrency": args.concurrency,
        "alpha": args.alpha if cell.mix is None else None,
        "seed": args.seed,
        "duration_limit_s": args.duration,
        "num_requests_limit": args.num_requests,
        "input_len": list(args.input_len),
        "output_len": list(args.output_len),
        "greedy": True,
        "ignore_eos": True,
        "stream": True,
    }


def raw_samples(results: Sequence[RequestResult]) -> dict[str, list[float]]:
    return {metric: report.latency_values(results, metric) for metric in report.LATENCIES}


async def run_all(args: argparse.Namespace) -> dict:
    """Every cell x every target; the document written as JSON."""
    targets = args.compare or [Target.parse(args.url + ("#base-only" if args.base_only else ""))]
    names, uploads = await prepare_adapters(args, targets)
    console = Console(width=None if sys.stdout.isatty() else 120)  # files: wide tables
    document: dict = {
        "name": args.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "uploads": uploads,
        "runs": [],
        "ratios": {},
    }
    plot_inputs: dict[str, list] = {}
    with progress_bar(args.no_progress) as progress:
        for cell in plan_cells(args, len(names)):
            cell_runs = []
            for target in targets:
                run, results = await run_target(args, cell, target, names, progress)
                cell_runs.append(run)
                plot_inputs.setdefault(cell.key, []).append((run, raw_samples(results)))
                progress.console.print(f"done: {target.label} {cell.key}")
            document["runs"].extend(cell_runs)
            if len(cell_runs) > 1:
                document["ratios"][cell.key] = report.ratios(cell_runs)
    for run in document["runs"]:
        report.print_run(run, console)
    for key, table in document["ratios"].items():
        console.print(f"[bold]{key}[/bold]")
        report.print_ratios(table, targets[0].label, console)
    if args.workload != "B" and len(args.num_adapters or []) > 1:
        report.print_sweep(document["runs"], console)
    document["plots"] = [] if args.no_plots else write_plots(args, document, plot_inputs)
    return document


def write_plots(
    args: argparse.Namespace, document: dict, plot_inputs: dict[str, list]
) -> list[str]:
    from adapterserve.loadtest import plots  # matplotlib is slow to import: only when plotting

    paths = []
    for key, pairs in plot_inputs.items():
        runs, samples = zip(*pairs, strict=True)
        paths.append(plots.plot_cdfs(runs, samples, args.out_dir / f"{args.name}-cdf-{key}.png"))
    if args.workload != "B" and len(args.num_adapters or []) > 1:
        paths.append(plots.plot_sweep(document["runs"], args.out_dir / f"{args.name}-sweep.png"))
    return [str(p) for p in paths]


async def run_setup(args: argparse.Namespace) -> int:
    kinds = args.kinds or ["lora"]
    plans = synthetic.plan_adapters(
        args.num_adapters, kinds, args.ranks, args.adapter_prefix, args.seed
    )
    async with make_client(args.url, args.admin_api_key or args.api_key, args.timeout) as client:
        served = await served_models(client)
        dims = await synthetic.fetch_base_dims(
            client, served.base, served.base_card, args.base_config
        )
        if args.save_dir:
            for plan in plans:
                synthetic.write_adapter(
                    args.save_dir / plan.name,
                    *synthetic.make_adapter(dims, plan.kind, plan.rank, plan.seed),
                )
        results = await synthetic.upload_adapters(client, dims, plans, replace=not args.no_replace)
    for result in results:
        print(
            f"{result.name}\t{result.kind}\tr{result.rank}\t{result.status}\t{result.error or 'ok'}"
        )
    failed = sum(1 for r in results if r.error)
    print(
        f"uploaded {len(results) - failed} of {len(results)} adapters to {args.url}",
        file=sys.stderr,
    )
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "setup":
            sys.exit(asyncio.run(run_setup(args)))
        args.name = args.name or f"{args.workload}-{time.strftime('%Y%m%d-%H%M%S')}"
        args.out_dir.mkdir(parents=True, exist_ok=True)
        document = asyncio.run(run_all(args))
    except (httpx.HTTPError, RuntimeError, ValueError, OSError) as e:
        print(f"adapterserve-loadtest: error: {e}", file=sys.stderr)
        sys.exit(1)
    path = args.out_dir / f"{args.name}.json"
    path.write_text(json.dumps(document, indent=1))
    print(f"wrote {path}" + "".join(f"\nwrote {p}" for p in document["plots"]), file=sys.stderr)


if __name__ == "__main__":
    main()

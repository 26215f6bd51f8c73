"""`adapterserve eval`: run an evaluation job in-process (the app's own lifespan: engine,
adapters, runner) or against a running server (`--url`, over the HTTP API), show a progress
bar, print the paper's table and write it as JSON, CSV and Markdown (plus the per-example rows).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from adapterserve.server.config import Settings
from adapterserve.server.evaluation.errors import EvaluationError
from adapterserve.server.evaluation.report import accuracy_table, plain_text, write_reports

log = logging.getLogger(__name__)

# serve flags that also shape an in-process evaluation
ENGINE_FLAGS = (
    "--model",
    "--device",
    "--dtype",
    "--quantization",
    "--max-num-seqs",
    "--max-model-len",
    "--max-num-batched-tokens",
    "--block-size",
    "--kv-cache-memory-mb",
    "--served-model-name",
    "--adapter-slots",
    "--max-adapter-rank",
    "--adapter-store-dir",
)
# repeatable serve flags that load adapters in-process
ADAPTER_LIST_FLAGS = ("--adapter", "--adapter-dir")
POLL_INTERVAL_S = 0.5
FINAL = ("succeeded", "failed", "cancelled")


class EvalCommandError(Exception):
    """A refusal to report in one line (exit status 2)."""


def add_eval_arguments(
    parser: argparse.ArgumentParser,
    serve_flags: dict[str, tuple[str, type]],
    list_flags: dict[str, str] | None = None,
) -> None:
    parser.add_argument(
        "--datasets",
        required=True,
        help="comma-separated dataset names, or 'all' (every available set the protocol accepts)",
    )
    parser.add_argument(
        "--models",
        default="base",
        help="comma-separated: 'base' (the served base model) and/or adapter names",
    )
    parser.add_argument("--limit", type=int, default=None, help="first N records of each dataset")
    parser.add_argument("--protocol", choices=("generate", "loglikelihood"), default="generate")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument(
        "--decoding",
        choices=("greedy", "beam"),
        default="greedy",
        help="beam: the paper's 4-beam search without sampling (protocol generate)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="override the paper's max new tokens (256 arithmetic, 32 commonsense)",
    )
    parser.add_argument("--url", default=None, help="a running server; default: run in-process")
    parser.add_argument(
        "--data-dir",
        dest="data_dir",
        type=Path,
        default=None,
        help="folder of <dataset>/test.json (env ADAPTERSERVE_DATA_DIR)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("eval-results"),
        help="where results.json/.csv/.md and results.jsonl go",
    )
    parser.add_argument("--eval-max-inflight", dest="eval_max_inflight", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--log-level", dest="log_level", default="warning")
    for flag in ENGINE_FLAGS:
        if flag in serve_flags:
            field, kind = serve_flags[flag]
            parser.add_argument(flag, dest=field, type=kind, default=None, help="in-process only")
    for flag in ADAPTER_LIST_FLAGS:
        if flag in (list_flags or {}):
            parser.add_argument(
                flag,
                dest=list_flags[flag],
                action="append",
                default=None,
                help="in-process only; repeatable, as for serve",
            )


def settings_for_eval(
    args: argparse.Namespace, serve_flags: dict[str, tuple[str, type]]
) -> Settings:
    fields = [serve_flags[f][0] for f in ENGINE_FLAGS if f in serve_flags]
    fields += ["data_dir", "eval_max_inflight", "log_level", "adapters", "adapter_dirs"]
    return Settings(**{f: getattr(args, f) for f in fields if getattr(args, f, None) is not None})


def job_body(args: argparse.Namespace) -> dict[str, Any]:
    body = {
        "models": _split(args.models),
        "datasets": _split(args.datasets),
        "limit": args.limit,
        "protocol": args.protocol,
        "seed": args.seed,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
        "decoding": args.decoding,
    }
    return {k: v for k, v in body.items() if v is not None}


def run_eval(args: argparse.Namespace, settings: Settings) -> int:
    """Run the job, print the table, write the reports; 0 if the job succeeded."""
    body = job_body(args)
    try:
        if args.url:
            job, rows = _run_remote(args.url.rstrip("/"), body, not args.no_progress)
        else:
            job, rows = asyncio.run(_run_in_process(settings, body, not args.no_progress))
    except EvalCommandError as exc:
        print(f"adapterserve eval: {exc}", file=sys.stderr)
        return 2
    header, table = accuracy_table(job)
    print(plain_text(header, table))
    print(f"decoding: {_decoding(job)}; {job['note']}")
    paths = write_reports(job, args.out)
    (args.out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(
        f"status {job['status']}; wrote {', '.join(str(p) for p in paths.values())} and "
        f"{args.out / 'results.jsonl'}"
    )
    if job["status"] != "succeeded":
        print(f"the job ended {job['status']}: {job['error']}", file=sys.stderr)
        return 1
    return 0


def _decoding(job: dict[str, Any]) -> str:
    """What ran, in a few words."""
    if job["protocol"] == "loglikelihood":
        return "none (answer words scored by log-likelihood)"
    if job.get("decoding") == "beam":
        return "4-beam search (the paper's)"
    return "greedy" if job["temperature"] == 0 else f"sampling at temperature {job['temperature']}"


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _expand_all(datasets: list[str], described: list[dict[str, Any]], protocol: str) -> list[str]:
    if datasets != ["all"]:
        return datasets
    return [
        d["name"]
        for d in described
        if d["available"] and (protocol == "generate" or d["answer_kind"] != "number")
    ]


async def _run_in_process(settings: Settings, body: dict[str, Any], progress: bool):
    from adapterserve.server.engine.bootstrap import EngineConfigError, plan_engine
    from adapterserve.server.evaluation.jobs import JobOptions
    from adapterserve.server.main import create_app
    from adapterserve.server.model.weights import ModelLoadError

    try:  # a one-line reason rather than a traceback from the lifespan
        plan = plan_engine(settings)
    except (ModelLoadError, EngineConfigError) as exc:
        raise EvalCommandError(f"cannot start the engine: {exc}") from None
    app = create_app(settings, plan=plan)
    async with app.router.lifespan_context(app):
        runner = app.state.evaluations
        body["datasets"] = _expand_all(
            body["datasets"], runner.catalog.describe_all(), body["protocol"]
        )
        try:
            job = runner.submit(JobOptions(**body))
        except EvaluationError as exc:
            raise EvalCommandError(exc.message) from None
        with tqdm(total=job.total, unit="ex", disable=not progress, file=sys.stderr) as bar:
            while job.status not in FINAL:
                await asyncio.sleep(POLL_INTERVAL_S)
                _advance(bar, job.done)
            _advance(bar, job.done)
        rows = [json.loads(line) for line in runner.iter_results(job.id)]
        return job.to_dict(), rows


def _run_remote(url: str, body: dict[str, Any], progress: bool):
    import httpx

    key = os.environ.get("ADAPTERSERVE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
            return _remote_job(http, body, progress)
    except httpx.HTTPError as exc:
        raise EvalCommandError(f"cannot talk to {url}: {exc}") from None


def _remote_job(http: Any, body: dict[str, Any], progress: bool):
    if body["datasets"] == ["all"]:
        described = _checked(http.get("/v1/datasets"), 200)["data"]
        body["datasets"] = _expand_all(body["datasets"], described, body["protocol"])
    job = _checked(http.post("/v1/evaluations", json=body), 202)
    try:
        job = _poll(http, job, progress)
    except KeyboardInterrupt:
        http.delete(f"/v1/evaluations/{job['id']}")
        raise
    text = _raw(http.get(f"/v1/evaluations/{job['id']}/results"))
    return job, [json.loads(line) for line in text.splitlines() if line.strip()]


def _poll(http: Any, job: dict[str, Any], progress: bool) -> dict[str, Any]:
    with tqdm(
        total=job["progress"]["total"], unit="ex", disable=not progress, file=sys.stderr
    ) as bar:
        while job["status"] not in FINAL:
            time.sleep(POLL_INTERVAL_S)
            job = _checked(http.get(f"/v1/evaluations/{job['id']}"), 200)
            _advance(bar, job["progress"]["done"])
    return job


def _advance(bar: tqdm, done: int) -> None:
    if done > bar.n:  # an unchanged bar is not redrawn (keeps logs short)
        bar.update(done - bar.n)


def _checked(response: Any, status: int) -> dict[str, Any]:
    if response.status_code != status:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise EvalCommandError(
            f"{response.request.url.path}: HTTP {response.status_code}: {message}"
        )
    return response.json()


def _raw(response: Any) -> str:
    if response.status_code != 200:
        raise EvalCommandError(f"results: HTTP {response.status_code}")
    return response.text

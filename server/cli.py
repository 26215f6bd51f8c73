"""`adapterserve serve ...`: every flag is optional and overrides the ADAPTERSERVE_* env settings."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError

from adapterserve.server.config import Settings

log = logging.getLogger(__name__)

# flag -> (Settings field, type)
SERVE_FLAGS: dict[str, tuple[str, type]] = {
    "--host": ("host", str),
    "--port": ("port", int),
    "--model": ("model", str),
    "--device": ("device", str),
    "--dtype": ("dtype", str),
    "--max-num-seqs": ("max_num_seqs", int),
    "--max-model-len": ("max_model_len", int),
    "--max-num-batched-tokens": ("max_num_batched_tokens", int),
    "--block-size": ("block_size", int),
    "--kv-cache-memory-mb": ("kv_cache_memory_mb", int),
    "--max-queue-len": ("max_queue_len", int),
    "--max-request-share": ("max_request_share", float),
    "--engine-process": ("engine_process", str),
    "--engine-heartbeat-timeout-s": ("engine_heartbeat_timeout_s", float),
    "--engine-max-restarts": ("engine_max_restarts", int),
    "--compile": ("compile", str),
    "--quantization": ("quantization", str),
    "--enable-prefix-caching": ("enable_prefix_caching", str),
    "--served-model-name": ("served_model_name", str),
    "--api-key": ("api_key", str),
    "--admin-api-key": ("admin_api_key", str),
    "--adapter-slots": ("adapter_slots", int),
    "--max-adapter-rank": ("max_adapter_rank", int),
    "--host-adapter-cache": ("host_adapter_cache", int),
    "--max-adapters": ("max_adapters", int),
    "--max-upload-bytes": ("max_upload_bytes", int),
    "--adapter-store-dir": ("adapter_store_dir", str),
    "--log-level": ("log_level", str),
    "--ready-requires-key": ("ready_requires_key", str),
    "--http-header-timeout-s": ("http_header_timeout_s", float),
    "--http-body-timeout-s": ("http_body_timeout_s", float),
    "--http-body-grace-s": ("http_body_grace_s", float),
    "--http-body-min-rate": ("http_body_min_rate", float),
    "--http-body-deadline-s": ("http_body_deadline_s", float),
    "--max-connections": ("max_connections", int),
    "--max-connections-per-client": ("max_connections_per_client", int),
    "--probe-connections": ("probe_connections", int),
    "--max-request-body-bytes": ("max_request_body_bytes", int),
    "--tool-call-parser": ("tool_call_parser", str),
    "--warm-grammars": ("warm_grammars", str),
    "--max-prompt-chars": ("max_prompt_chars", int),
    "--grammar-workers": ("grammar_workers", int),
    "--grammar-timeout-s": ("grammar_timeout_s", float),
    "--grammar-memory-mb": ("grammar_memory_mb", int),
    "--max-n": ("max_n", int),
    "--retry-after-s": ("retry_after_s", int),
    "--shutdown-timeout-s": ("shutdown_timeout_s", float),
    "--max-queued-evaluations": ("max_queued_evaluations", int),
    "--max-evaluation-jobs": ("max_evaluation_jobs", int),
    "--max-datasets": ("max_datasets", int),
    "--max-dataset-bytes": ("max_dataset_bytes", int),
    "--files-dir": ("files_dir", str),
    "--max-file-bytes": ("max_file_bytes", int),
    "--max-files": ("max_files", int),
    "--max-files-bytes": ("max_files_bytes", int),
    "--finetune-dir": ("finetune_dir", str),
    "--finetune-threads": ("finetune_threads", int),
    "--finetune-memory-mb": ("finetune_memory_mb", int),
    "--finetune-gpu-memory-fraction": ("finetune_gpu_memory_fraction", float),
    "--finetune-max-running": ("finetune_max_running", int),
    "--finetune-max-queued": ("finetune_max_queued", int),
    "--replicas": ("replicas", int),
    "--ray-address": ("ray_address", str),
    "--replica-num-cpus": ("replica_num_cpus", float),
    "--replica-num-gpus": ("replica_num_gpus", float),
    "--cluster-affinity": ("cluster_affinity", str),
    "--cluster-dir": ("cluster_dir", str),
}
# repeatable flag -> Settings list field (given flags replace the env list)
SERVE_LIST_FLAGS: dict[str, str] = {
    "--adapter": "adapters",
    "--adapter-dir": "adapter_dirs",
    "--adapter-root": "adapter_roots",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adapterserve", description="Multi-adapter LLM inference server"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    for flag, (field, kind) in SERVE_FLAGS.items():
        description = Settings.model_fields[field].description or ""
        if field.endswith("api_key"):
            description = "prefer the env var: command lines are visible to other users"
        serve.add_argument(
            flag,
            dest=field,
            type=kind,
            default=None,
            help=f"{description} (env ADAPTERSERVE_{field.upper()})",
        )
    serve.add_argument(  # not in SERVE_FLAGS: `eval` defines its own --data-dir
        "--data-dir",
        dest="data_dir",
        type=str,
        default=None,
        help=f"{Settings.model_fields['data_dir'].description} (env ADAPTERSERVE_DATA_DIR)",
    )
    for flag, field in SERVE_LIST_FLAGS.items():
        description = Settings.model_fields[field].description or ""
        serve.add_argument(
            flag,
            dest=field,
            action="append",
            default=None,
            help=f"{description}; repeatable (env ADAPTERSERVE_{field.upper()}, a JSON list)",
        )
    from adapterserve.server.evaluation.command import add_eval_arguments

    evaluate = commands.add_parser(
        "eval", help="run the LLM-Adapters reasoning evaluation (in-process or against --url)"
    )
    add_eval_arguments(evaluate, SERVE_FLAGS, SERVE_LIST_FLAGS)
    from adapterserve.server.finetune.command import add_finetune_arguments

    finetune = commands.add_parser(
        "finetune", help="train an adapter on a training file without a server (a peft folder)"
    )
    add_finetune_arguments(finetune, SERVE_FLAGS)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Env-derived settings with the given flags laid over them (validated again)."""
    overrides = {
        field: getattr(args, field)
        for field, _ in SERVE_FLAGS.values()
        if getattr(args, field) is not None
    }
    for field in [*SERVE_LIST_FLAGS.values(), "data_dir"]:
        if getattr(args, field, None) is not None:
            overrides[field] = getattr(args, field)
    return Settings(**overrides)


class _Server(uvicorn.Server):
    """uvicorn's server with a drain. On SIGTERM/SIGINT the app is marked draining and the
    listener stays open: clients that arrive get 503 + Retry-After (and /ready 503) instead of
    "connection refused", while the requests in flight at the signal finish, for up to
    `shutdown_timeout_s`. Then uvicorn's own shutdown closes the listener and stops the app.
    A second SIGINT ends the drain at once."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.app.state.draining = True
        super().handle_exit(sig, frame)

    async def main_loop(self) -> None:
        await super().main_loop()
        if self.app.state.draining and not self.force_exit:
            await self._drain()

    async def _drain(self) -> None:
        deadline = time.monotonic() + float(self.config.timeout_graceful_shutdown or 0)
        in_flight = set(self.server_state.tasks)  # requests being served at the signal
        log.info("draining %d request(s) before shutting down", len(in_flight))
        while any(not task.done() for task in in_flight) and not self.force_exit:
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        # uvicorn's shutdown then waits for what is left, within the rest of the time
        self.config.timeout_graceful_shutdown = max(0.0, deadline - time.monotonic())


def serve(settings: Settings) -> int:
    """Run until a signal or a fatal engine fault; returns the process exit status."""
    from adapterserve.server.api.transport import guarded_protocol
    from adapterserve.server.engine.bootstrap import EngineConfigError, plan_engine
    from adapterserve.server.main import create_app
    from adapterserve.server.model.weights import ModelLoadError

    failure: list[BaseException] = []
    server: _Server | None = None

    def on_fatal(exc: BaseException) -> None:
        failure.append(exc)
        if server is not None:
            server.should_exit = True

    try:  # fail fast with a one-line reason, before uvicorn prints a lifespan traceback
        plan = plan_engine(settings)  # the lifespan starts the engine from this plan
    except (ModelLoadError, EngineConfigError) as e:
        log.error("cannot start: %s", e)
        return 2
    if settings.replicas or settings.ray_address:
        return _serve_cluster(settings)
    app = create_app(settings, on_fatal=on_fatal, plan=plan)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        http=guarded_protocol(settings),  # header timeout, connection caps
        timeout_graceful_shutdown=settings.shutdown_timeout_s,  # type: ignore[arg-type]
    )
    server = _Server(config, app)
    server.run()
    if failure:
        log.critical("exiting after a fatal engine fault: %r", failure[0])
        return 1
    return 0 if server.started else 1


def _serve_cluster(settings: Settings) -> int:
    """Ray Serve: --replicas N engine replicas behind one ingress (server/cluster)."""
    try:
        from adapterserve.server.cluster.launch import serve_cluster
    except ImportError as e:
        log.error(
            "cannot start: --replicas / --ray-address need the ray extra "
            "(pip install 'adapterserve[ray]'): %s",
            e,
        )
        return 2
    return serve_cluster(settings)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            settings = settings_from_args(args)
        except ValidationError as exc:
            parser.error(
                "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            )
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        sys.exit(serve(settings))
    elif args.command == "eval":
        sys.exit(_evaluate(parser, args))
    elif args.command == "finetune":
        from adapterserve.server.finetune.command import run_finetune

        logging.basicConfig(level=(args.log_level or "warning").upper())
        sys.exit(run_finetune(args))


def _evaluate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`adapterserve eval`: see server/evaluation/command.py."""
    from adapterserve.server.evaluation.command import run_eval, settings_for_eval

    try:
        settings = settings_for_eval(args, SERVE_FLAGS)
    except ValidationError as exc:
        parser.error("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run_eval(args, settings)


if __name__ == "__main__":
    main()

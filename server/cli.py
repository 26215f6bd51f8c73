"""`adapterserve serve ...`: every flag is optional and overrides the ADAPTERSERVE_* env settings."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError

from server.config import Settings

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
        "--data-dir", dest="data_dir", type=str, default=None,
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
    from server.evaluation.command import add_eval_arguments

    evaluate = commands.add_parser(
        "eval", help="run the LLM-Adapters reasoning evaluation (in-process or against --url)"
    )
    add_eval_arguments(evaluate, SERVE_FLAGS, SERVE_LIST_FLAGS)
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


def check_adapter_flags(settings: Settings) -> None:
    """`--adapter NAME=PATH` and `--adapter-dir` must name usable folders (EngineConfigError)."""
    from adapters.store import StoreError, validate_name
    from server.engine.engine import EngineConfigError, parse_adapter_arg

    for item in settings.adapters:
        name, path = parse_adapter_arg(item)
        try:
            validate_name(name)
        except StoreError as e:
            raise EngineConfigError(f"--adapter {item}: {e}") from None
        if not path.is_dir():
            raise EngineConfigError(f"--adapter {item}: {path} is not an adapter directory")
    for folder in [*settings.adapter_dirs, *settings.adapter_roots]:
        if not folder.is_dir():
            raise EngineConfigError(f"--adapter-dir / --adapter-root {folder}: not a directory")


class _Server(uvicorn.Server):
    """uvicorn's server that marks the app as draining on SIGTERM/SIGINT (503 for new
    requests, /ready 503) while in-flight requests finish."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.app.state.draining = True
        super().handle_exit(sig, frame)


def serve(settings: Settings) -> int:
    """Run until a signal or a fatal engine fault; returns the process exit status."""
    from server.engine.engine import EngineConfigError, plan_engine
    from server.main import create_app
    from server.model.weights import ModelLoadError

    failure: list[BaseException] = []
    server: _Server | None = None

    def on_fatal(exc: BaseException) -> None:
        failure.append(exc)
        if server is not None:
            server.should_exit = True

    try:  # fail fast with a one-line reason, before uvicorn prints a lifespan traceback
        check_adapter_flags(settings)
        plan_engine(settings)
    except (ModelLoadError, EngineConfigError) as e:
        log.error("cannot start: %s", e)
        return 2
    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=settings.shutdown_timeout_s,  # type: ignore[arg-type]
    )
    server = _Server(config, app)
    server.run()
    if failure:
        log.critical("exiting after a fatal engine fault: %r", failure[0])
        return 1
    return 0 if server.started else 1


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


def _evaluate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`adapterserve eval`: see server/evaluation/command.py."""
    from server.evaluation.command import run_eval, settings_for_eval

    try:
        settings = settings_for_eval(args, SERVE_FLAGS)
    except ValidationError as exc:
        parser.error(
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        )
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run_eval(args, settings)


if __name__ == "__main__":
    main()

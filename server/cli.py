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
    "--log-level": ("log_level", str),
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
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Env-derived settings with the given flags laid over them (validated again)."""
    overrides = {
        field: getattr(args, field)
        for field, _ in SERVE_FLAGS.values()
        if getattr(args, field) is not None
    }
    return Settings(**overrides)


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


if __name__ == "__main__":
    main()

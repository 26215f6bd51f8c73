"""`adapterserve serve --replicas N` (a local Ray instance) or `--ray-address auto|ray://...`
(an existing cluster): start Ray Serve's HTTP proxy on --host/--port, run the application,
and serve until SIGINT / SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import ray
from ray import serve

from adapterserve.server.cluster.app import build_app
from adapterserve.server.config import Settings

log = logging.getLogger(__name__)

APP_NAME = "adapterserve"


def start(settings: Settings, **ray_init: object) -> None:
    """Connect to (or start) Ray, start Serve's proxy on the settings' host and port, and run
    the application; returns once every replica is up."""
    if not ray.is_initialized():
        ray.init(address=settings.ray_address, **ray_init)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    deploy(settings)


def deploy(settings: Settings) -> None:
    """Run (or update in place) the application on the running Serve instance."""
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")


def stop() -> None:
    """Delete the application and Serve, then leave (a local Ray instance stops)."""
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_cluster(settings: Settings) -> int:
    """The CLI's cluster mode; returns the process exit status."""
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        start(settings)
        log.info(
            "serving on http://%s:%d with %d engine replica(s)",
            settings.host,
            settings.port,
            max(1, settings.replicas),
        )
        stopping.wait()
        log.info("shutting the cluster application down")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop()

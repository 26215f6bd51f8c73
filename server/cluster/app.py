"""The Ray Serve application: an ingress deployment (the whole HTTP API: server/main.py's app
over a ClusterEngine) in front of the engine deployment (EngineReplica x `replicas`).

    build_app(settings)        -> the Application, for serve.run (server/cluster/launch.py)
    app_builder(args)          -> the same from a `serve run` config's `args` (deploy/serve.yaml):
                                  {"settings": {...Settings fields...}}, over ADAPTERSERVE_* env

The Settings object itself is handed to both deployments (pickled by Ray), so every replica
runs with exactly the settings the command line or the config gave.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from adapterserve.server.cluster.proxy import ClusterMetrics, cluster_backend
from adapterserve.server.cluster.replica import EngineReplica
from adapterserve.server.config import Settings

log = logging.getLogger(__name__)

INGRESS_NAME = "adapterserve-ingress"
ENGINE_NAME = "adapterserve-engine"
MAX_ONGOING_PER_REPLICA_FLOOR = 16


@serve.ingress()
class Ingress:
    """The HTTP API. Built after the constructor (Ray Serve's late-bound ingress), so that the
    app gets the engine deployment's handle; its lifespan starts the ClusterEngine."""

    def __init__(self, settings: Settings, engine: Any) -> None:
        self.settings, self.engine = settings, engine

    def __serve_build_asgi_app__(self) -> FastAPI:
        from adapterserve.server.main import create_app

        return create_app(
            self.settings, backend=cluster_backend(self.engine), metrics_factory=ClusterMetrics
        )


def build_app(settings: Settings) -> Application:
    """Ingress + engine deployments for `settings` (settings.replicas engine replicas)."""
    replicas = max(1, settings.replicas)
    # A replica takes every request it can queue; beyond that Ray Serve holds them (and
    # routes them to another replica).
    ongoing = max(MAX_ONGOING_PER_REPLICA_FLOOR, settings.max_num_seqs + settings.max_queue_len)
    engine = serve.deployment(
        EngineReplica,
        name=ENGINE_NAME,
        num_replicas=replicas,
        max_ongoing_requests=ongoing,
        ray_actor_options={
            "num_cpus": settings.replica_num_cpus,
            "num_gpus": settings.replica_num_gpus,
        },
        health_check_period_s=2,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=settings.shutdown_timeout_s,
    )
    ingress = serve.deployment(
        Ingress,
        name=INGRESS_NAME,
        num_replicas=1,
        max_ongoing_requests=max(ongoing * replicas, settings.max_connections),
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=settings.shutdown_timeout_s,
    )
    return ingress.bind(settings, engine.bind(settings))


def app_builder(args: dict[str, Any]) -> Application:
    """`serve run` entry point: `import_path: adapterserve.server.cluster.app:app_builder`, with
    `args: {settings: {model: ..., replicas: 2, ...}}` over the ADAPTERSERVE_* environment."""
    settings = Settings(**(args or {}).get("settings", {}))
    return build_app(settings)

"""Deploy loraplex on Ray Serve: the application (ingress + engine replicas) and the `serve-ray` command's loop."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from server.cluster.ingress import Ingress
from server.cluster.replica import EngineReplica
from server.settings import ClusterSettings, Settings

log = logging.getLogger(__name__)

INGRESS_MAX_ONGOING = 4096  # the ingress only awaits the replicas; the engines' queues are the real limit


def build_application(settings: Settings, cluster: ClusterSettings) -> Application:
    """The ingress bound to `cluster.replicas` engine replicas, each built from `settings`."""
    engine = EngineReplica.options(
        num_replicas=cluster.replicas,
        max_ongoing_requests=cluster.max_ongoing_requests or settings.max_num_seqs,
        ray_actor_options={"num_cpus": cluster.num_cpus_per_replica, "num_gpus": cluster.num_gpus_per_replica},
    ).bind(settings)
    return Ingress.options(max_ongoing_requests=INGRESS_MAX_ONGOING).bind(engine, settings)


def app_builder(args: dict[str, Any]) -> Application:
    """For Ray Serve config files (`import_path: server.cluster.launch:app_builder`): `args` holds the settings
    by field name (`adapters_store`, `replicas`, ...); LORAPLEX_* variables fill in the rest."""
    settings = Settings(**{k: v for k, v in args.items() if k in Settings.model_fields})
    cluster = ClusterSettings(**{k: v for k, v in args.items() if k in ClusterSettings.model_fields})
    return build_application(settings, cluster)


def deploy(settings: Settings, cluster: ClusterSettings) -> None:
    """Join the Ray cluster RAY_ADDRESS names (else start a local head), then deploy and wait for the replicas."""
    ray.init(ignore_reinit_error=True)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_application(settings, cluster), name=cluster.app_name, route_prefix="/")
    log.info("serving on http://%s:%d with %d replicas", settings.host, settings.port, cluster.replicas)


def run_cluster(settings: Settings, cluster: ClusterSettings) -> None:
    """Deploy, serve until SIGINT or SIGTERM, then delete the application and leave Ray."""
    deploy(settings, cluster)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # after ray.init, whose own SIGTERM handler would skip the cleanup
        signal.signal(signum, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        serve.delete(cluster.app_name)
        ray.shutdown()

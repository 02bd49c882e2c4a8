"""Deploy loraplex on Ray Serve: the application (ingress + engine replicas) and the `serve-ray` command's loop."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from server.cluster.ingress import Ingress
from server.cluster.replica import ENGINE_DEPLOYMENT, EngineReplica
from server.cluster.routing import AdapterAffinityRouter
from server.settings import ClusterSettings, Settings

log = logging.getLogger(__name__)

INGRESS_MAX_ONGOING = 4096  # the ingress only awaits the replicas; the engines' queues are the real limit


def build_application(settings: Settings, cluster: ClusterSettings) -> Application:
    """The ingress bound to `cluster.replicas` engine replicas, each built from `settings`."""
    engine = EngineReplica.options(
        num_replicas=cluster.replicas,
        max_ongoing_requests=cluster.max_ongoing_requests or settings.max_num_seqs,
        ray_actor_options={"num_cpus": cluster.num_cpus_per_replica, "num_gpus": cluster.num_gpus_per_replica},
        request_router_config=RequestRouterConfig(
            request_router_class=AdapterAffinityRouter, request_router_kwargs={"slack": cluster.affinity_slack}
        ),
    ).bind(settings)
    return Ingress.options(max_ongoing_requests=INGRESS_MAX_ONGOING).bind(engine, settings)


def app_builder(args: dict[str, Any]) -> Application:
    """For Ray Serve config files (`import_path: server.cluster.launch:app_builder`): `args` holds the settings
    by field name (`adapters_store`, `replicas`, ...); LORAPLEX_* variables fill in the rest."""
    settings = Settings(**{k: v for k, v in args.items() if k in Settings.model_fields})
    cluster = ClusterSettings(**{k: v for k, v in args.items() if k in ClusterSettings.model_fields})
    return build_application(settings, cluster)


def direct_ingress_env(port: int) -> dict[str, str]:
    """Ray Serve's throughput-optimized mode with the ingress replica itself listening on `port` (direct ingress).

    Each request and each streamed chunk then skips the hop through Ray's HTTP proxy, deployments talk gRPC, and
    replicas run our code on their own event loop. Ray still starts a proxy on the head node: it gets a free port.
    No load balancer sits in front of a local head, so a stopping ingress need not stay open for one to notice.
    """
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # exclusive: the range is this one port
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    }


@contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _require_free_port(host: str, port: int) -> None:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise SystemExit(f"serve-ray: {host}:{port} is not free ({exc.strerror}); choose another --port") from None


def start_ray(settings: Settings, cluster: ClusterSettings, **init_args: Any) -> None:
    """Join the Ray cluster RAY_ADDRESS names, else start a local head; then start Ray Serve's HTTP entry.

    A local head serves through direct ingress unless `cluster.direct_ingress` is off. Ray's processes read that
    configuration when they start, so a cluster joined through RAY_ADDRESS keeps the one it was started with.
    """
    direct = cluster.direct_ingress and "RAY_ADDRESS" not in os.environ
    if direct:  # else Ray fails later with a port allocation error that does not name the port
        _require_free_port(settings.host, settings.port)
    with _environment(direct_ingress_env(settings.port) if direct else {}):
        ray.init(ignore_reinit_error=True, **init_args)
        serve.start(http_options={"host": settings.host, "port": 0 if direct else settings.port})
    log.info("Ray Serve entry: %s", "direct ingress from the ingress replica" if direct else "Ray's HTTP proxy")


def deploy(settings: Settings, cluster: ClusterSettings) -> None:
    """Start Ray and Ray Serve (`start_ray`), then deploy and wait for the replicas."""
    start_ray(settings, cluster)
    serve.run(build_application(settings, cluster), name=cluster.app_name, route_prefix="/")
    log.info("serving on http://%s:%d with %d replicas", settings.host, settings.port, cluster.replicas)


def reload_keys_everywhere(app_name: str) -> None:
    """Have every engine replica re-read the key file (a SIGHUP to `serve-ray`)."""
    handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name)
    for result in handle.broadcast("reload_keys").results(timeout_s=60, return_exceptions=True):
        if isinstance(result, BaseException):  # a replica that is gone restarts from the same file
            log.warning("a replica did not reload the API keys: %s", result)


def run_cluster(settings: Settings, cluster: ClusterSettings) -> None:
    """Deploy, serve until SIGINT or SIGTERM (SIGHUP reloads the keys everywhere), then delete the application."""
    deploy(settings, cluster)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # after ray.init, whose own SIGTERM handler would skip the cleanup
        signal.signal(signum, lambda *_: stop.set())
    signal.signal(  # Ray calls block: not in the handler, which runs on this thread
        signal.SIGHUP, lambda *_: threading.Thread(target=reload_keys_everywhere, args=(cluster.app_name,)).start()
    )
    try:
        stop.wait()
    finally:
        serve.delete(cluster.app_name)
        ray.shutdown()

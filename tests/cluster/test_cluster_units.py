"""The Ray layer's pieces that need no cluster: merged metrics, the in-process ASGI bridge, the optional import,
how Ray is started."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from server.cluster.asgi_bridge import run_request
from server.cluster.messages import ProxiedRequest, ResponseHead
from server.cluster.metrics_merge import merge_expositions
from server.metrics import Metrics, RequestTrace
from server.settings import ClusterSettings, Settings


def test_merged_metrics_keep_every_replicas_series_under_one_family():
    first, second = Metrics(4, 2), Metrics(4, 2)
    for metrics, requests in ((first, 2), (second, 3)):
        metrics.set_base_model("tiny")
        for _ in range(requests):
            metrics.record_request("tiny", RequestTrace(4))
    text = merge_expositions([first.render({"replica": "a"}), second.render({"replica": "b"})]).decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    served = {s.labels["replica"]: s.value for s in families["loraplex_requests"].samples}
    assert served == {"a": 2, "b": 3}
    assert text.count("# TYPE loraplex_requests_total counter") == 1


def test_render_without_labels_is_unchanged():
    metrics = Metrics(4, 2)
    assert b'replica="' not in metrics.render()


async def test_the_bridge_streams_an_apps_response_and_cancels_it_when_left():
    app = FastAPI()
    closed = []

    async def chunks():
        try:
            for i in range(1000):
                yield f"{i}\n"
        finally:
            closed.append(True)

    @app.post("/echo")
    async def echo(body: dict) -> StreamingResponse:
        return StreamingResponse(chunks(), headers={"x-echo": body["say"]})

    request = ProxiedRequest("POST", "/echo", headers=[(b"content-type", b"application/json")], body=b'{"say":"hi"}')
    parts = run_request(app, request)
    head = await anext(parts)
    assert isinstance(head, ResponseHead) and head.status == 200 and head.header("X-Echo") == "hi"
    assert await anext(parts) == b"0\n"
    await parts.aclose()
    for _ in range(100):
        if closed:
            break
        await asyncio.sleep(0.01)
    assert closed


def test_importing_the_server_and_its_cli_does_not_import_ray():
    code = "import sys, server, server.cli; server.cli.build_parser(); sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize(
    ("ray_address", "direct_ingress", "expect_direct"),
    [(None, True, True), (None, False, False), ("ray://head:10001", True, False)],
)
def test_a_local_head_serves_through_direct_ingress_on_the_servers_port(
    monkeypatch, ray_address, direct_ingress, expect_direct
):
    from server.cluster import launch

    seen = {}
    monkeypatch.setattr(launch.ray, "init", lambda **_: seen.update(env=dict(os.environ)))
    monkeypatch.setattr(launch.serve, "start", lambda http_options: seen.update(http=http_options))
    for name in launch.direct_ingress_env(0):
        monkeypatch.delenv(name, raising=False)
    if ray_address is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", ray_address)
    before = dict(os.environ)
    launch.start_ray(Settings(host="127.0.0.1", port=8123), ClusterSettings(direct_ingress=direct_ingress))
    if expect_direct:  # Ray's processes start with the ingress owning the port; Ray's own proxy gets a free one
        assert seen["env"]["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
        assert seen["env"]["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "8123"
        assert seen["env"]["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] == "8124"
        assert seen["http"] == {"host": "127.0.0.1", "port": 0}
    else:
        assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in seen["env"]
        assert seen["http"] == {"host": "127.0.0.1", "port": 8123}
    assert dict(os.environ) == before  # the driver's own environment is left as it was


def test_serve_ray_forwards_sighup_to_every_replica_and_stops_on_sigterm(monkeypatch):
    from server.cluster import launch

    calls = []
    monkeypatch.setattr(launch, "deploy", lambda settings, cluster: calls.append("deploy"))
    monkeypatch.setattr(launch, "reload_keys_everywhere", lambda app: calls.append(f"reload {app}"))
    monkeypatch.setattr(launch.serve, "delete", lambda app: calls.append(f"delete {app}"))
    monkeypatch.setattr(launch.ray, "shutdown", lambda: calls.append("shutdown"))
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    hup = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGHUP))
    term = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        hup.start()
        term.start()
        launch.run_cluster(Settings(), ClusterSettings(app_name="app"))
    finally:
        hup.cancel()
        term.cancel()
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    assert calls == ["deploy", "reload app", "delete app", "shutdown"]


def test_direct_ingress_refuses_a_taken_port_before_starting_ray(monkeypatch):
    from server.cluster import launch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(launch.ray, "init", lambda **_: pytest.fail("Ray started on a taken port"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"127.0.0.1:{port} is not free"):
            launch.start_ray(Settings(host="127.0.0.1", port=port), ClusterSettings())

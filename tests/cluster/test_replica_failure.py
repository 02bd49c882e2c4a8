"""A replica killed under load: every request ends with a full answer or an explicit error, and Ray restarts it."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.cluster.conftest import APP, AUTH, samples

pytestmark = pytest.mark.slow

LONG = 300  # tokens: the kill lands while the requests decode
ENGINE = "LoraplexEngine"


def request(url: str, model: str, stream: bool) -> tuple[int, str]:
    body = {"model": model, "prompt": [5, 17, 42], "max_tokens": LONG, "temperature": 0, "ignore_eos": True,
            "stream": stream}  # fmt: skip
    response = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=120)
    return response.status_code, response.text


def outcome(status: int, text: str, stream: bool) -> str:
    """'full' for a complete answer, 'error' for an explicit one; anything else fails the test."""
    if status != 200:
        assert status == 503 and "error" in json.loads(text), (status, text)
        return "error"
    if not stream:
        assert json.loads(text)["usage"]["completion_tokens"] == LONG, text
        return "full"
    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", text
    last = json.loads(events[-2])
    if "error" in last:
        return "error"
    assert last["choices"][0]["finish_reason"] == "length", text
    return "full"


def replica_names() -> set[str]:
    """The engine replicas that answer now; one just killed may still be in the broadcast, failing: left out."""
    from ray import serve

    handle = serve.get_deployment_handle(ENGINE, APP)
    return {name for name in handle.broadcast("name").results(timeout_s=30, return_exceptions=True)
            if isinstance(name, str)}  # fmt: skip


def test_a_replica_killed_under_load_loses_no_request(deployed):
    import ray

    before = replica_names()
    assert len(before) == 2
    cases = [(model, stream) for model in ("tiny", "qv", "dora") for stream in (False, True)] * 3
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = [pool.submit(request, deployed.url, model, stream) for model, stream in cases]
        victim_id = sorted(before)[0]
        deadline = time.monotonic() + 30
        while not samples(httpx.get(f"{deployed.url}/metrics").text, "loraplex_num_requests_running").get(victim_id):
            assert time.monotonic() < deadline, "no request ever ran on the replica to kill"
            time.sleep(0.1)
        (victim,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                     if f"#{ENGINE}#" in a["name"] and a["name"].endswith(victim_id)]  # fmt: skip
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        results = [future.result(timeout=180) for future in futures]
    outcomes = [outcome(status, text, stream) for (status, text), (_, stream) in zip(results, cases, strict=True)]
    assert "full" in outcomes
    deadline = time.monotonic() + 120
    while len(names := replica_names()) < 2 or victim_id in names:
        assert time.monotonic() < deadline, f"the killed replica was not replaced: {names}"
        time.sleep(1)
    status, text = request(deployed.url, "qv", stream=False)
    assert outcome(status, text, stream=False) == "full"

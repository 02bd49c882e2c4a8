"""loraplex on Ray Serve with two replicas: same answers as one process, adapter affinity bounded by load, admin
changes everywhere."""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.cluster.launch import reload_keys_everywhere
from server.cluster.messages import REPLICA_HEADER, ProxiedRequest
from server.settings import ClusterSettings
from tests.cluster.conftest import APP, AUTH, TENANT_KEY, TOKEN, Deployed, samples, write_key_file
from tests.test_server_e2e import start_server

pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 42, 99], [7, 3, 250, 11, 64], [120, 8]]
MODELS = ["tiny", "qv", "dora"]
MAX_TOKENS = 8


def completion(url: str, model: str, prompt: list[int], stream: bool = False) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": stream}  # fmt: skip
    return httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60)


def streamed_text(response: httpx.Response) -> str:
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return "".join(json.loads(event)["choices"][0]["text"] for event in events[:-1])


@pytest.fixture(scope="module")
def reference(deployed: Deployed) -> dict[tuple[str, int], str]:
    """Greedy texts of the single-process server on the same model and store, per (model, prompt index)."""
    settings = deployed.settings
    proc, url = start_server(settings.model, "--adapters-store", str(settings.adapters_store), "--served-model-name",
                             "tiny", "--kv-cache-bytes", str(settings.kv_cache_bytes))  # fmt: skip
    try:
        cases = [(model, index) for model in MODELS for index in range(len(PROMPTS))]
        return {(m, i): completion(url, m, PROMPTS[i]).json()["choices"][0]["text"] for m, i in cases}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def every_replica(request: ProxiedRequest) -> list[tuple[str, int, bytes]]:
    """(replica, status, body) of `request` served by each engine replica."""
    from ray import serve

    handle = serve.get_deployment_handle("LoraplexEngine", APP)
    results = handle.broadcast("respond", request).results(timeout_s=60)
    return [(head.header(REPLICA_HEADER), head.status, body) for head, body in results]


def completion_request(model: str, prompt: list[int], key: str = TENANT_KEY) -> ProxiedRequest:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                       "ignore_eos": True}).encode()  # fmt: skip
    headers = [(b"content-type", b"application/json"), (b"authorization", f"Bearer {key}".encode())]
    return ProxiedRequest("POST", "/v1/completions", headers=headers, body=body)


def test_two_replicas_answer_like_one_process(deployed, reference):
    cases = [(m, i, stream) for m in MODELS for i in range(len(PROMPTS)) for stream in (False, True)] * 2
    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(lambda c: completion(deployed.url, c[0], PROMPTS[c[1]], c[2]), cases))
    for (model, index, stream), response in zip(cases, responses, strict=True):
        assert response.status_code == 200, response.text
        assert response.headers[REPLICA_HEADER]
        text = streamed_text(response) if stream else response.json()["choices"][0]["text"]
        assert text == reference[(model, index)], (model, index, stream)
    assert len({r.headers[REPLICA_HEADER] for r in responses}) == 2  # both replicas served


def test_requests_for_an_adapter_stay_on_the_replica_that_holds_it(deployed):
    completion(deployed.url, "sticky", PROMPTS[0])  # warm-up: one replica loads the adapter no test used yet
    time.sleep(2)  # Ray Serve's routers learn which replica holds which model id
    replicas = [completion(deployed.url, "sticky", PROMPTS[1]).headers[REPLICA_HEADER] for _ in range(6)]
    assert len(set(replicas)) == 1
    (holder,) = set(replicas)
    metrics = httpx.get(f"{deployed.url}/metrics", timeout=30).text
    assert samples(metrics, "loraplex_requests_total", adapter="sticky") == {holder: 7}


def test_a_burst_for_one_adapter_spills_past_the_affinity_slack(deployed):
    completion(deployed.url, "sticky", PROMPTS[0])  # one replica holds the adapter (loaded here or by a test before)
    time.sleep(2)  # Ray Serve's routers learn which replica holds which model id
    holder = completion(deployed.url, "sticky", PROMPTS[0]).headers[REPLICA_HEADER]
    slack = ClusterSettings().affinity_slack
    body = {"model": "sticky", "prompt": PROMPTS[1], "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(3 * slack) as pool:
        responses = list(pool.map(lambda _: httpx.post(f"{deployed.url}/v1/completions", json=body, headers=AUTH,
                                                         timeout=120),
                                  range(3 * slack)))  # fmt: skip
    assert all(r.status_code == 200 for r in responses)
    served = Counter(r.headers[REPLICA_HEADER] for r in responses)
    # The holder first, up to `slack` requests ahead of the other replica, which then loads the adapter too.
    assert served[holder] > slack and len(served) == 2, served


def _upload(deployed: Deployed, name: str, source: str, replace: bool) -> httpx.Response:
    folder = deployed.sources / source
    files = {"config": (folder / "adapter_config.json").read_bytes(),
             "weights": (folder / "adapter_model.safetensors").read_bytes()}  # fmt: skip
    return httpx.post(f"{deployed.url}/admin/adapters", data={"name": name, "replace": str(replace).lower()},
                      files=files, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)  # fmt: skip


def test_admin_changes_reach_every_replica_before_the_call_returns(deployed, reference):
    before = every_replica(completion_request("qv", PROMPTS[0]))  # every replica holds qv's weights in memory
    assert {(status, json.loads(body)["choices"][0]["text"]) for _, status, body in before} == {
        (200, reference[("qv", 0)])
    }
    assert _upload(deployed, "qv", "dora", replace=True).status_code == 201
    after = every_replica(completion_request("qv", PROMPTS[0]))
    assert len(after) == 2
    assert {json.loads(body)["choices"][0]["text"] for _, _, body in after} == {reference[("dora", 0)]}
    assert _upload(deployed, "fresh", "qv", replace=False).status_code == 201
    assert completion(deployed.url, "fresh", PROMPTS[1]).json()["choices"][0]["text"] == reference[("qv", 1)]
    assert {status for _, status, _ in every_replica(completion_request("fresh", PROMPTS[1]))} == {200}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    patched = httpx.patch(f"{deployed.url}/admin/adapters/qv", json={"mode": "merged", "pinned": True}, headers=auth)
    assert patched.status_code == 200
    view = ProxiedRequest("GET", "/admin/adapters/qv", headers=[(b"authorization", f"Bearer {TOKEN}".encode())])
    views = [json.loads(body) for _, _, body in every_replica(view)]
    assert [(v["mode"], v["pinned"], v["tier"] != "disk") for v in views] == [("merged", True, True)] * 2
    deleted = httpx.delete(f"{deployed.url}/admin/adapters/fresh", headers={"Authorization": f"Bearer {TOKEN}"})
    assert deleted.status_code == 200
    assert {status for _, status, _ in every_replica(completion_request("fresh", PROMPTS[1]))} == {404}
    assert completion(deployed.url, "fresh", PROMPTS[1]).status_code == 404


def test_a_client_that_disconnects_frees_its_request_on_the_replica(deployed):
    def totals() -> tuple[float, float, float]:
        text = httpx.get(f"{deployed.url}/metrics", timeout=30).text
        cancelled = sum(samples(text, "loraplex_requests_total", finish_reason="cancelled").values())
        running = sum(samples(text, "loraplex_num_requests_running").values())
        return cancelled, running, sum(samples(text, "loraplex_kv_cache_usage_ratio").values())

    cancelled_before = totals()[0]
    body = {"model": "qv", "prompt": PROMPTS[0], "max_tokens": 3000, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{deployed.url}/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        lines = response.iter_lines()
        events = [next(lines) for _ in range(4)]  # the stream is under way (SSE lines: event, blank, event, ...)
        assert events[0].startswith("data: ")
    deadline = time.monotonic() + 30
    while totals() != (cancelled_before + 1, 0, 0):
        assert time.monotonic() < deadline, f"the request was not cancelled on its replica: {totals()}"
        time.sleep(0.5)


def test_a_key_file_reload_reaches_every_replica(deployed):
    admin = {"Authorization": f"Bearer {TOKEN}"}
    keys = deployed.settings.api_keys_file
    original = keys.read_text()

    def statuses_of_late_key() -> set[int]:
        return {status for _, status, _ in every_replica(completion_request("qv", PROMPTS[0], "lpx-added-later"))}

    try:
        write_key_file(keys, {"everyone": TENANT_KEY, "late": "lpx-added-later"})
        assert statuses_of_late_key() == {401}  # not reloaded yet
        reloaded = httpx.post(f"{deployed.url}/admin/keys/reload", headers=admin, timeout=60)
        assert reloaded.status_code == 200 and reloaded.json() == {"tenants": 2, "keys": 2}
        assert statuses_of_late_key() == {200}
        write_key_file(keys, {"everyone": TENANT_KEY})  # the late key revoked: refused everywhere after the reload
        assert httpx.post(f"{deployed.url}/admin/keys/reload", headers=admin, timeout=60).status_code == 200
        assert statuses_of_late_key() == {401}
        write_key_file(keys, {"everyone": TENANT_KEY, "late": "lpx-added-later"})
        reload_keys_everywhere(APP)  # what a SIGHUP to `serve-ray` runs
        assert statuses_of_late_key() == {200}
    finally:
        keys.write_text(original)
        httpx.post(f"{deployed.url}/admin/keys/reload", headers=admin, timeout=60)

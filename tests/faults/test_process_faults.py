"""Fault injection against the real server process on a tiny model: a storm of streams cut at random points leaks
nothing, and a SIGKILL in the middle of a generation and of a slow admin upload is survived by a restart that serves
again, with the adapter store exactly as it was."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.helpers import make_adapter_store, make_peft_adapter, make_tiny_checkpoint
from tests.test_server_e2e import start_server

pytestmark = pytest.mark.slow  # two server processes, about 40 s on 2 cores

TOKEN = "fault-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BOUNDARY = "fault-boundary"
MODELS = ["tiny", "a", "b"]
STORM_REQUESTS = 300
STORM_CONNECTIONS = 48


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # A long context: the generation that gets killed is still running whatever the machine's speed.
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-long"), max_position_embeddings=8192)


@pytest.fixture(scope="module")
def store(model_dir, tmp_path_factory) -> Path:
    return make_adapter_store(model_dir, tmp_path_factory.mktemp("fault-store"), {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    })  # fmt: skip


@pytest.fixture(scope="module")
def big_adapter(model_dir, tmp_path_factory) -> Path:
    """The largest adapter the tiny model takes (rank 64 on every projection): the upload that gets cut."""
    root = tmp_path_factory.mktemp("upload")
    return make_peft_adapter(model_dir, root / "big", r=64, lora_alpha=64, target_modules="all-linear")


@pytest.fixture(scope="module")
def flags(store) -> tuple[str, ...]:
    return ("--adapters-store", str(store), "--admin-token", TOKEN, "--served-model-name", "tiny", "--block-size",
            "4", "--kv-cache-bytes", str(2**21), "--max-num-seqs", "8", "--max-queue", "400")  # fmt: skip


@pytest.fixture(scope="module")
def server(model_dir, flags) -> Iterator[dict]:
    """The first server process; the SIGKILL test kills it, so it is shared in file order."""
    proc, url = start_server(model_dir, *flags)
    live = {"proc": proc, "url": url}
    yield live
    live["proc"].kill()  # the restarted process, when the SIGKILL test ran
    live["proc"].wait(timeout=30)


def greedy_text(url: str, model: str) -> str:
    body = {"model": model, "prompt": [9, 8, 7, 6], "max_tokens": 8, "min_tokens": 8, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def gauges(url: str) -> dict[str, float]:
    """The unlabelled gauges and counters of /metrics, and `requests_total` summed over adapters by finish reason."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("loraplex_requests_total{"):
            reason = name.split('finish_reason="')[1].split('"')[0]
            values[reason] = values.get(reason, 0) + float(value)
        elif name.startswith("loraplex_") and "{" not in name:
            values[name] = float(value)
    return values


def wait_idle(url: str, timeout_s: float = 30) -> dict[str, float]:
    """Poll /metrics until nothing runs, waits, holds a KV block or an adapter slot; the last reading."""
    idle = {"loraplex_num_requests_running": 0, "loraplex_num_requests_waiting": 0,
            "loraplex_kv_cache_usage_ratio": 0, "loraplex_adapter_slot_users": 0}  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while True:
        values = gauges(url)
        if all(values[name] == want for name, want in idle.items()) or time.monotonic() > deadline:
            return values
        time.sleep(0.1)


async def cut_stream(port: int, rng: random.Random, index: int) -> None:
    """One streamed completion whose client hangs up after a random number of response bytes (0: at once)."""
    prompt = [rng.randrange(3, 250) for _ in range(rng.randrange(1, 30))]
    body = json.dumps({"model": MODELS[index % 3], "prompt": prompt, "max_tokens": rng.randrange(1, 120),
                       "temperature": rng.choice([0, 0.8]), "stream": True, "ignore_eos": True}).encode()  # fmt: skip
    head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        budget = rng.choice([0, rng.randrange(1, 400), rng.randrange(400, 6000)])
        while budget > 0:
            chunk = await asyncio.wait_for(reader.read(min(budget, 1024)), timeout=30)
            if not chunk:
                break
            budget -= len(chunk)
    finally:
        writer.transport.abort()  # hang up at once, without a graceful close


async def storm(port: int) -> None:
    rng = random.Random(1234)
    gate = asyncio.Semaphore(STORM_CONNECTIONS)

    async def one(index: int) -> None:
        async with gate:
            await cut_stream(port, random.Random(rng.random()), index)

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(STORM_REQUESTS))), timeout=60)


def test_a_disconnect_storm_leaks_no_block_or_slot(server) -> None:
    url = server["url"]
    before = {model: greedy_text(url, model) for model in MODELS}
    asyncio.run(storm(int(url.rsplit(":", 1)[1])))
    after = wait_idle(url)
    assert after["loraplex_num_requests_running"] == 0 and after["loraplex_num_requests_waiting"] == 0
    assert after["loraplex_kv_cache_usage_ratio"] == 0 and after["loraplex_adapter_slot_users"] == 0
    assert after["loraplex_engine_step_failures_total"] == 0
    assert after["loraplex_engine_request_failures_total"] == 0
    assert after.get("cancelled", 0) > STORM_REQUESTS / 3  # the cuts really landed mid-request
    assert httpx.get(f"{url}/health").status_code == 200
    assert {model: greedy_text(url, model) for model in MODELS} == before


def slow_upload(source: Path, name: str, sent: threading.Event) -> Iterator[bytes]:
    """A multipart upload of `source` as `name`, its weights streamed in small pieces with pauses."""
    yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'.encode()
    for field, filename in (("config", "adapter_config.json"), ("weights", "adapter_model.safetensors")):
        content = (source / filename).read_bytes()
        yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n\r\n'.encode()
        for start in range(0, len(content), 16384):
            yield content[start : start + 16384]
            if field == "weights" and start >= len(content) // 3:
                sent.set()  # a third of the weights are in the server's hands
                time.sleep(0.05)
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def store_snapshot(store: Path) -> dict[str, str]:
    """Every file under the store, hidden ones included, with the sha256 of its content."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file()}  # fmt: skip


def listing(url: str) -> list[tuple[str, str]]:
    response = httpx.get(f"{url}/admin/adapters", headers=AUTH, timeout=30)
    assert response.status_code == 200
    return [(a["name"], a["sha256"]) for a in response.json()["data"]]


def test_sigkill_mid_generation_and_mid_upload_then_restart(server, model_dir, flags, store, big_adapter):
    url = server["url"]
    texts = {model: greedy_text(url, model) for model in MODELS}
    adapters, snapshot = listing(url), store_snapshot(store)
    sent = threading.Event()
    headers = {**AUTH, "content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    long_stream = {"model": "a", "prompt": [5, 6, 7], "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(1) as pool:
        upload = pool.submit(http.post, f"{url}/admin/adapters", content=slow_upload(big_adapter, "big", sent),
                             headers=headers)  # fmt: skip
        with http.stream("POST", f"{url}/v1/completions", json=long_stream) as generation:
            lines = generation.iter_lines()
            assert all(next(lines) is not None for _ in range(10))  # tokens are flowing
            assert sent.wait(timeout=30)
            server["proc"].kill()
            server["proc"].wait(timeout=30)
            with pytest.raises(httpx.TransportError):
                for _ in lines:
                    pass
        with pytest.raises(httpx.TransportError):
            upload.result(timeout=60)
    proc, url = start_server(model_dir, *flags)
    server.update(proc=proc, url=url)
    assert store_snapshot(store) == snapshot  # the half-received upload left nothing, not even a staging folder
    assert listing(url) == adapters
    assert httpx.get(f"{url}/admin/adapters/big", headers=AUTH).status_code == 404
    assert {model: greedy_text(url, model) for model in MODELS} == texts
    assert wait_idle(url)["loraplex_kv_cache_usage_ratio"] == 0

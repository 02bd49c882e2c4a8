"""Tenant keys in the real server process: the openai client with `api_key=`, and SIGHUP reloading the key file
under a running stream (an invalid file keeps the old keys)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server.tenants.keyfile import KeyFile, write_key_file
from server.tenants.keys import hash_key, new_key
from tests.helpers import make_peft_adapter, make_tiny_checkpoint
from tests.test_server_e2e import start_server

LONG = 1500  # tokens of the stream that runs across the reloads


def write_keys(path: Path, **keys: str) -> None:
    """acme may use acme-* only; globex the base model and globex-*; a tenant is left out without a key."""
    scopes = {"acme": {"adapters": ["acme-*"]}, "globex": {"adapters": ["globex-*"], "base_model": True}}
    tenants = [{"name": name, "keys": [hash_key(key)], **scopes[name]} for name, key in keys.items()]
    write_key_file(path, KeyFile.model_validate({"tenants": tenants}))


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("keys") / "keys.toml"


@pytest.fixture(scope="module")
def server(tmp_path_factory, key_file) -> Iterator[tuple[str, int]]:
    # A long context lets one stream run for seconds, across the reloads.
    model_dir = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-long"), max_position_embeddings=4096)
    store = tmp_path_factory.mktemp("tenant-store")
    for name in ("acme-qv", "globex-qv"):
        make_peft_adapter(model_dir, store / name, r=4, target_modules=["q_proj", "v_proj"])
    write_keys(key_file, acme=new_key(), globex=new_key())
    proc, url = start_server(model_dir, "--adapters-store", str(store), "--served-model-name", "tiny",
                             "--api-keys", str(key_file), "--kv-cache-bytes", str(2**24))  # fmt: skip
    yield url, proc.pid
    proc.terminate()
    proc.wait(timeout=30)


def models(url: str, key: str) -> httpx.Response:
    return httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)


def eventually(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the server never reloaded its keys")
        time.sleep(0.1)


def test_openai_client_with_api_key(server, key_file) -> None:
    url, _ = server
    acme, globex = new_key(), new_key()
    write_keys(key_file, acme=acme, globex=globex)
    os.kill(server[1], signal.SIGHUP)
    eventually(lambda: models(url, acme).status_code == 200)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=acme, max_retries=0)
    assert [m.id for m in client.models.list()] == ["acme-qv"]
    out = client.completions.create(model="acme-qv", prompt="hi", max_tokens=4, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4
    for model in ("tiny", "globex-qv", "nope"):
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=model, prompt="hi", max_tokens=2)
    other = openai.OpenAI(base_url=f"{url}/v1", api_key=globex, max_retries=0)
    assert [m.id for m in other.models.list()] == ["tiny", "globex-qv"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="lpx-nobody", max_retries=0).models.list()
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200


def test_sighup_reloads_under_a_running_stream(server, key_file) -> None:
    url, pid = server
    acme = new_key()
    write_keys(key_file, acme=acme)
    os.kill(pid, signal.SIGHUP)
    eventually(lambda: models(url, acme).status_code == 200)
    body = {"model": "acme-qv", "prompt": "a", "max_tokens": LONG, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    headers = {"Authorization": f"Bearer {acme}"}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=120) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        # A broken file first: the server keeps acme's key and stays up.
        key_file.write_text("[[tenants]]\nname = 'acme'\nkeys = ['in-clear']\n")
        os.kill(pid, signal.SIGHUP)
        time.sleep(0.5)
        assert models(url, acme).status_code == 200
        # Then a valid file without acme: new requests with its key are refused, the running stream finishes.
        globex = new_key()
        write_keys(key_file, globex=globex)
        os.kill(pid, signal.SIGHUP)
        eventually(lambda: models(url, acme).status_code == 401)
        assert models(url, globex).status_code == 200
        assert "loraplex_num_requests_running 1.0" in httpx.get(f"{url}/metrics").text  # reloaded mid-request
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2].removeprefix("data: "))["usage"]["completion_tokens"] == LONG

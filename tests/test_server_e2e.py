"""The real server process (uvicorn + engine thread) on a tiny model, driven over HTTP and by the openai client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.helpers import hf_greedy, make_peft_adapter, make_tiny_checkpoint, peft_greedy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path | None, *flags: str, timeout_s: float = 120) -> tuple[subprocess.Popen, str]:
    """Start `python -m server serve` and wait for /health; the caller terminates the process."""
    port = _free_port()
    cmd = [sys.executable, "-m", "server", "serve", "--port", str(port), *flags]
    if model_dir is not None:
        cmd += ["--model", str(model_dir)]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        time.sleep(0.2)
    proc.terminate()
    raise TimeoutError("server did not become healthy")


@pytest.fixture(scope="module")
def server_model_dir(tmp_path_factory) -> Path:
    # A long context lets a request run for seconds, long enough to fill the queue in the 429 test.
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-long"), max_position_embeddings=8192)


@pytest.fixture(scope="module")
def store(server_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    make_peft_adapter(server_model_dir, root / "qv", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    broken = root / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": ["lm_head"]}))  # fmt: skip
    return root


@pytest.fixture(scope="module")
def server(server_model_dir, store) -> Iterator[str]:
    proc, url = start_server(
        server_model_dir, "--adapters-store", str(store), "--served-model-name", "tiny",
        "--kv-cache-bytes", str(2**24), "--max-num-seqs", "2", "--max-queue", "1", "--max-request-bytes", "20000",
        "--dtype", "float32",
    )  # fmt: skip
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")


def test_openai_client_completion_is_greedy_exact(client, server_model_dir):
    prompt = [5, 17, 99, 42, 7]
    out = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body={"min_tokens": 12}
    )
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 12
    expected = hf_greedy(server_model_dir, [prompt], 12)[0]
    tokenizer = AutoTokenizer.from_pretrained(server_model_dir)
    assert choice.text == tokenizer.decode(expected, skip_special_tokens=True)


def test_openai_client_streams_chat_with_usage(client):
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices
    assert chunks[-2].choices[0].finish_reason == "length"


def test_models_lists_the_base_model_and_adapters(server):
    models = httpx.get(f"{server}/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in models] == [("tiny", None), ("broken", "tiny"), ("qv", "tiny")]


def test_adapter_requests_match_peft_and_bad_adapters_get_422(server, client, server_model_dir, store):
    prompt = [9, 8, 7, 6, 5, 4]
    out = client.completions.create(model="qv", prompt=prompt, max_tokens=8, temperature=0,
                                    extra_body={"min_tokens": 8})  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(server_model_dir)
    expected = peft_greedy(server_model_dir, store / "qv", prompt, 8)
    assert out.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    bad = httpx.post(f"{server}/v1/completions", json={"model": "broken", "prompt": "hi", "max_tokens": 2})
    assert bad.status_code == 422
    assert "lm_head" in bad.json()["error"]["message"]


def test_bad_inputs_get_openai_errors_and_the_server_stays_up(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    over = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 9000})
    assert over.status_code == 400
    assert "9000" in over.json()["error"]["message"] and "8192" in over.json()["error"]["message"]
    bad = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "hi", "temperature": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
    broken = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400
    huge = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "x" * 30000})
    assert huge.status_code == 413
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2).choices[0].text is not None


def test_queue_full_answers_429_with_retry_after(server):
    body = {"model": "tiny", "prompt": "a", "max_tokens": 8000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120) as http, ThreadPoolExecutor(3) as pool:
        streams = [http.stream("POST", f"{server}/v1/completions", json=body) for _ in range(3)]
        entered = [pool.submit(s.__enter__) for s in streams]  # 2 run, 1 waits (its headers come with its first token)
        time.sleep(1.0)
        refused = http.post(f"{server}/v1/completions", json={**body, "stream": False, "max_tokens": 2})
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        for stream, future in zip(streams, entered, strict=True):
            assert future.result(timeout=60).status_code == 200
            stream.__exit__(None, None, None)  # hanging up cancels the request and frees its slot
    assert httpx.post(f"{server}/v1/completions", json={**body, "stream": False, "max_tokens": 2}).status_code == 200


@pytest.mark.slow
def test_default_model_answers_over_http(default_model_dir):
    proc, url = start_server(None, "--kv-cache-bytes", str(64 * 2**20))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        assert client.models.list().data[0].id == "SmolLM2-135M-Instruct"
        out = client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=20,
            temperature=0,
        )
        assert "Paris" in out.choices[0].message.content
        assert out.choices[0].finish_reason == "stop"
    finally:
        proc.terminate()
        proc.wait(timeout=30)

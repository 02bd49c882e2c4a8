"""A server killed (SIGKILL) mid-upload, or mid-commit, restarts with the store as it was before the change."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from admin_helpers import AUTH, TOKEN, files_of

from tests.helpers import make_peft_adapter
from tests.test_server_e2e import start_server

BOUNDARY = "recovery-boundary"


@pytest.fixture(scope="module")
def sources(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recovery-sources")
    return {name: make_peft_adapter(tiny_model_dir, root / name, seed=seed, r=4, target_modules=["q_proj", "v_proj"])
            for seed, name in enumerate(["a", "b"])}  # fmt: skip


def stalled_upload(source: Path, name: str, release: threading.Event) -> Iterator[bytes]:
    """A multipart body replacing `name` that stops half-way through the weights until `release` is set."""
    yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'.encode()
    yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="replace"\r\n\r\ntrue\r\n'.encode()
    for field, (filename, content) in files_of(source).items():
        yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n\r\n'.encode()
        yield content[: len(content) // 2]
        if field == "weights":
            release.wait(timeout=60)
        yield content[len(content) // 2 :] + b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def sha256(path: Path) -> str:
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


@pytest.mark.slow  # two server processes
def test_a_killed_server_restarts_with_the_store_as_it_was(tiny_model_dir, tmp_path, sources):
    store = tmp_path / "store"
    shutil.copytree(sources["a"], store / "kept")
    original = sha256(store / "kept")
    flags = ("--adapters-store", str(store), "--admin-token", TOKEN, "--kv-cache-bytes", str(2**21))
    proc, url = start_server(tiny_model_dir, *flags)
    release = threading.Event()
    try:
        headers = {**AUTH, "content-type": f"multipart/form-data; boundary={BOUNDARY}"}
        with ThreadPoolExecutor(1) as pool:
            body = stalled_upload(sources["b"], "kept", release)
            upload = pool.submit(httpx.post, f"{url}/admin/adapters", content=body, headers=headers, timeout=60)
            time.sleep(1.0)  # the server holds half of the body
            proc.kill()
            proc.wait(timeout=30)
            release.set()
            with pytest.raises(httpx.TransportError):
                upload.result(timeout=60)
    finally:
        release.set()
        proc.kill()
    assert sorted(p.name for p in store.iterdir()) == ["kept"] and sha256(store / "kept") == original
    # What a kill during the commit itself leaves: a staged folder, and a replacement's old folder moved aside.
    staged = shutil.copytree(sources["b"], store / ".tmp-0badc0de")
    (staged / "adapter_model.safetensors").write_bytes(b"half")
    shutil.copytree(sources["b"], store / ".old-0badc0de-orphan")
    proc, url = start_server(tiny_model_dir, *flags)
    try:
        listed = httpx.get(f"{url}/admin/adapters", headers=AUTH).json()["data"]
        assert [(a["name"], a["sha256"]) for a in listed] == [("kept", original), ("orphan", sha256(sources["b"]))]
        assert sorted(p.name for p in store.iterdir()) == ["kept", "orphan"]
        for model in ["kept", "orphan"]:
            response = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 3})
            assert response.status_code == 200
        response = httpx.post(f"{url}/admin/adapters", data={"name": "new"}, files=files_of(sources["a"]), headers=AUTH)
        assert response.status_code == 201
    finally:
        proc.terminate()
        proc.wait(timeout=30)

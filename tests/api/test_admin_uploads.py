"""Uploads the admin API refuses: bad names, forms, files and sizes; none leaves anything in the store."""

from __future__ import annotations

import asyncio
import io
import json
import pickle
import shutil
import struct
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import torch
from admin_helpers import AUTH, admin_settings, files_of, running_app, store_entries
from admin_helpers import upload as upload_to
from safetensors.torch import load, save

from server.adapters.config import MAX_CONFIG_BYTES
from tests.adapters.test_store import BAD_NAMES
from tests.helpers import make_peft_adapter

Files = dict[str, tuple[str, bytes]]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-uploads")
    return {"lora": make_peft_adapter(tiny_model_dir, root / "lora", seed=1, r=4, target_modules=["q_proj", "v_proj"])}


@pytest.fixture
def store(tmp_path):
    return tmp_path / "store"


@pytest.fixture
async def client(tiny_model_dir, store) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(admin_settings(tiny_model_dir, store, max_adapter_bytes=200_000)) as (client, _):
        yield client


def torch_zip() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    return buffer.getvalue()


def tensors_changed(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Files], Files]:
    def apply(files: Files) -> Files:
        tensors = dict(load(files["weights"][1]))
        change(tensors)
        return {**files, "weights": ("adapter_model.safetensors", save(tensors))}

    return apply


def config_changed(**fields) -> Callable[[Files], Files]:
    def apply(files: Files) -> Files:
        config = {**json.loads(files["config"][1]), **fields}
        return {**files, "config": ("adapter_config.json", json.dumps(config).encode())}

    return apply


def weights_bytes(content: bytes) -> Callable[[Files], Files]:
    return lambda files: {**files, "weights": ("adapter_model.safetensors", content)}


def first_a(tensors: dict[str, torch.Tensor]) -> str:
    return next(name for name in sorted(tensors) if "lora_A" in name)


def config_with(field: bytes) -> Callable[[Files], Files]:
    """The config with `field` (raw JSON text, `"key": value`) added first, byte for byte."""
    return lambda files: {**files, "config": ("adapter_config.json", b"{" + field + b"," + files["config"][1][1:])}


def header_with(field: bytes) -> Callable[[Files], Files]:
    """The weights with `field` (raw JSON text) added first to their safetensors header, tensors unchanged."""

    def apply(files: Files) -> Files:
        data = files["weights"][1]
        length = struct.unpack("<Q", data[:8])[0]
        header = b"{" + field + b"," + data[8 : 8 + length][1:]
        return {**files, "weights": ("adapter_model.safetensors", struct.pack("<Q", len(header)) + header +
                                     data[8 + length :])}  # fmt: skip

    return apply


DEEP = b'"x": ' + b"[" * 40_000 + b"]" * 40_000
HUGE_INT = b'"x": 1' + b"0" * 5_000
HOSTILE_JSON = {
    "deep": (DEEP, "nested deeper"),
    "huge-int": (HUGE_INT, "64-bit"),
    "not-utf8": (b'"x": "\xff\xfe"', "UTF-8"),
    "nan": (b'"x": NaN', "NaN"),
    "infinity": (b'"x": -Infinity', "Infinity"),
    "overflowing-float": (b'"x": 1e999', "infinity"),
}


BAD_UPLOADS = {
    "pickle": (weights_bytes(pickle.dumps({"w": [1.0]})), 415, "pickle"),
    "zip": (weights_bytes(torch_zip()), 415, "zip archive"),
    "garbage": (weights_bytes(b"these are not tensors"), 422, "not a safetensors file"),
    "corrupt-header": (weights_bytes(struct.pack("<Q", 40) + b'{"x": {"dtype": "F32", "shape": [1], "da'), 422,
                       "not a safetensors file"),
    "truncated": (lambda f: weights_bytes(f["weights"][1][:-64])(f), 422, "not a valid safetensors"),
    "shape-mismatch": (tensors_changed(lambda t: t.update({first_a(t): torch.zeros(4, 32)})), 422, "has shape"),
    "nan": (tensors_changed(lambda t: t[first_a(t)].fill_(float("nan"))), 422, "NaN"),
    "extra-tensor": (tensors_changed(lambda t: t.update({"extra": torch.zeros(2)})), 422, "unexpected tensor"),
    "config-not-json": (lambda f: {**f, "config": ("adapter_config.json", b"{")}, 422, "not valid JSON"),
    "unsupported-field": (config_changed(modules_to_save=["lm_head"]), 422, "modules_to_save"),
    "rank-mismatch": (config_changed(r=8), 422, "has shape"),
    "catastrophic-regex": (config_changed(target_modules="(.*.*)*z"), 422, "catastrophic"),
    "foreign-target": (config_changed(target_modules=["embed_tokens"]), 422, "target_modules"),
    "lone-surrogate": (lambda f: {**f, "config": ("adapter_config.json", f["config"][1].replace(b'"v_proj"',
                       b'"v_proj", "\\ud800"'))}, 422, "surrogate"),
    "long-list": (config_changed(target_modules=["q_proj"] * 2000), 422, "more than 1024"),
    "long-name": (config_changed(exclude_modules=["x" * 600]), 422, "longer than"),
    "scale-overflow": (config_changed(lora_alpha=3e38), 422, "not finite"),
    "long-tensor-name": (tensors_changed(lambda t: t.update({"x" * 600: torch.zeros(1)})), 422, "over 512 characters"),
    **{f"config-{case}": (config_with(field), 422, reason) for case, (field, reason) in HOSTILE_JSON.items()},
    **{f"header-{case}": (header_with(field), 422, reason) for case, (field, reason) in HOSTILE_JSON.items()},
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
async def test_bad_uploads_are_refused_and_leave_nothing(client, adapters, store, case):
    mutate, status, reason = BAD_UPLOADS[case]
    response = await upload_to(client, "bad", files=mutate(files_of(adapters["lora"])))
    assert response.status_code == status, response.text
    assert reason in response.json()["error"]["message"]
    assert store_entries(store) == []
    assert (await client.get("/admin/adapters", headers=AUTH)).json()["data"] == []
    assert (await client.post("/v1/completions", json={"model": "bad", "prompt": "x"})).status_code == 404


@pytest.mark.parametrize("missing", ["name", "config", "weights"])
async def test_an_incomplete_form_is_400(client, adapters, missing):
    files = {k: v for k, v in files_of(adapters["lora"]).items() if k != missing}
    data = {} if missing == "name" else {"name": "x"}
    response = await client.post("/admin/adapters", data=data, files=files, headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["param"] == missing


async def test_bad_form_values_are_400(client, adapters):
    for field, value in [("mode", "sideways"), ("pinned", "maybe"), ("replace", "perhaps"), ("colour", "red")]:
        response = await upload_to(client, "x", adapters["lora"], **{field: value})
        assert response.status_code == 400 and response.json()["error"]["param"] == field


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_names_that_could_escape_the_store_are_refused(client, adapters, store, name):
    response = await upload_to(client, name, adapters["lora"])
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "name"
    assert store_entries(store) == []
    assert sorted(p.name for p in store.parent.iterdir()) == ["store"] if store.exists() else True


async def test_oversized_uploads_are_413(tiny_model_dir, store, adapters):
    limit = 4096
    async with running_app(admin_settings(tiny_model_dir, store, max_adapter_bytes=limit)) as (client, _):
        files = files_of(adapters["lora"])
        over_file = {**files, "weights": ("w", b"\0" * (limit + 1))}
        response = await upload_to(client, "big", files=over_file)
        assert response.status_code == 413 and response.json()["error"]["param"] == "weights"
        over_config = {**files, "config": ("c", b" " * (MAX_CONFIG_BYTES + 1))}
        response = await upload_to(client, "big", files=over_config)
        assert response.status_code == 413 and response.json()["error"]["param"] == "config"
        huge = {**files, "weights": ("w", b"\0" * (limit + MAX_CONFIG_BYTES + 128 * 1024))}
        response = await upload_to(client, "big", files=huge)  # refused by its Content-Length
        assert response.status_code == 413
        response = await client.post("/admin/adapters", content=_chunked(huge), headers={**AUTH, **_multipart()})
        assert response.status_code == 413  # no Content-Length: refused as the body streams in
    assert store_entries(store) == []


BOUNDARY = "loraplex-test-boundary"


def _multipart() -> dict[str, str]:
    return {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


async def _chunked(files: Files) -> AsyncIterator[bytes]:
    yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'.encode()
    for field, (filename, content) in files.items():
        head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n\r\n'
        yield head.encode()
        for start in range(0, len(content), 256 * 1024):
            yield content[start : start + 256 * 1024]
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


async def test_uploads_over_the_concurrency_bound_get_429(tiny_model_dir, store, adapters):
    release = asyncio.Event()
    files = files_of(adapters["lora"])

    async def stalled_body() -> AsyncIterator[bytes]:
        chunks = [chunk async for chunk in _chunked(files)]
        yield chunks[0]
        await release.wait()  # the first upload holds its slot while its body trickles in
        for chunk in chunks[1:]:
            yield chunk

    async with running_app(admin_settings(tiny_model_dir, store, max_concurrent_uploads=1)) as (client, _):
        first = asyncio.create_task(client.post("/admin/adapters", content=stalled_body(), headers={**AUTH,
                                                **_multipart()}))  # fmt: skip
        await asyncio.sleep(0.3)
        busy = await upload_to(client, "other", adapters["lora"])
        assert busy.status_code == 429 and busy.headers["retry-after"].isdigit()
        assert "--max-concurrent-uploads" in busy.json()["error"]["message"]
        release.set()
        assert (await first).status_code == 201
        assert (await upload_to(client, "other", adapters["lora"])).status_code == 201
    assert store_entries(store) == ["big", "other"]


async def test_a_hostile_folder_dropped_in_by_hand_is_listed_with_its_error(tiny_model_dir, store, adapters):
    store.mkdir()
    folder = shutil.copytree(adapters["lora"], store / "hostile")
    (folder / "adapter_config.json").write_bytes(b'{"peft_type": "LORA", "target_modules": ["\\ud800"], "r": 4}')
    async with running_app(admin_settings(tiny_model_dir, store)) as (client, _):
        listed = await client.get("/admin/adapters", headers=AUTH)
        assert listed.status_code == 200
        [record] = listed.json()["data"]
        assert record["name"] == "hostile" and record["target_modules"] is None and "surrogate" in record["error"]
        response = await client.post("/v1/completions", json={"model": "hostile", "prompt": "x", "max_tokens": 2})
        assert response.status_code == 422

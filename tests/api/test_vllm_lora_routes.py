"""vLLM's `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter` over the admin store: vLLM's bodies and
answers, the admin token, folders only under --lora-path-root, and an upload's checks on what is loaded."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from admin_helpers import AUTH, admin_settings, complete, running_app, store_entries
from admin_helpers import upload as upload_to

from tests.helpers import make_peft_adapter

PROMPT = [5, 17, 99, 42, 7]
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory) -> Path:
    """The folder adapters may be loaded from: one good adapter, and folders that must be refused."""
    root = tmp_path_factory.mktemp("loras")
    good = make_peft_adapter(tiny_model_dir, root / "good", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    shutil.copytree(good, root / "pickled")
    (root / "pickled" / "adapter_model.safetensors").rename(root / "pickled" / "adapter_model.bin")
    shutil.copytree(good, root / "no-config")
    (root / "no-config" / "adapter_config.json").unlink()
    shutil.copytree(good, root / "wrong-rank")
    config = (good / "adapter_config.json").read_text().replace('"r": 4', '"r": 8')
    (root / "wrong-rank" / "adapter_config.json").write_text(config)
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(good, outside / "secret")
    (root / "link-out").symlink_to(outside / "secret")
    (root / "config-link").mkdir()
    (root / "config-link" / "adapter_config.json").symlink_to(outside / "secret" / "adapter_config.json")
    shutil.copy(good / "adapter_model.safetensors", root / "config-link")
    return root


@pytest.fixture
async def client(tiny_model_dir, tmp_path, root) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(admin_settings(tiny_model_dir, tmp_path / "store", lora_path_root=root)) as (client, _):
        yield client


async def load(client: httpx.AsyncClient, name: str, path: str | Path, headers: dict = AUTH) -> httpx.Response:
    return await client.post(LOAD, json={"lora_name": name, "lora_path": str(path)}, headers=headers)


async def test_load_serve_and_unload_as_vllm_answers(client: httpx.AsyncClient, root: Path, tmp_path: Path) -> None:
    response = await load(client, "sql", root / "good")
    assert (response.status_code, response.text) == (200, "Success: LoRA adapter 'sql' added successfully.")
    assert response.headers["content-type"].startswith("text/plain")
    assert "sql" in [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
    assert (await upload_to(client, "uploaded", root / "good")).status_code == 201
    assert await complete(client, "sql", PROMPT, 6) == await complete(client, "uploaded", PROMPT, 6)
    assert (await load(client, "relative", "good")).status_code == 200  # a path relative to the root
    assert store_entries(tmp_path / "store") == ["relative", "sql", "uploaded"]  # copied in; nothing left over

    response = await client.post(UNLOAD, json={"lora_name": "sql", "lora_int_id": 3}, headers=AUTH)
    assert (response.status_code, response.text) == (200, "Success: LoRA adapter 'sql' removed successfully.")
    assert (await client.post("/v1/completions", json={"model": "sql", "prompt": "x"})).status_code == 404
    assert (root / "good" / "adapter_model.safetensors").is_file()  # the folder it came from is left as it was
    assert store_entries(tmp_path / "store") == ["relative", "uploaded"]


async def test_a_served_name_is_409_and_an_unknown_one_on_unload_404(client: httpx.AsyncClient, root: Path) -> None:
    assert (await load(client, "sql", root / "good")).status_code == 200
    for name in ("sql", "tiny"):  # an adapter, the base model
        response = await load(client, name, root / "good")
        assert response.status_code == 409 and response.json()["error"]["param"] == "lora_name", response.text
        assert "unload_lora_adapter" in response.json()["error"]["message"]
    response = await client.post(UNLOAD, json={"lora_name": "nope"}, headers=AUTH)
    assert response.status_code == 404 and response.json()["error"]["param"] == "lora_name", response.text


@pytest.mark.parametrize(
    ("path", "status", "says"),
    [
        ("/etc", 403, "outside --lora-path-root"),
        ("../outside0/secret", 403, "outside --lora-path-root"),
        ("/no/such/folder", 403, "outside --lora-path-root"),  # whether it exists is not told
        ("link-out", 403, "outside --lora-path-root"),
        ("config-link", 403, "outside --lora-path-root"),
        ("missing", 400, "not a folder"),
        ("good/adapter_config.json", 400, "not a folder"),
        ("no-config", 400, "adapter_config.json"),
        ("pickled", 415, "adapter_model.bin"),
        ("wrong-rank", 422, "shape"),
        ("bad\x00byte", 400, "cannot be followed"),
        ("y" * 300, 400, "cannot be read"),  # a name over the file system's limit
    ],
)
async def test_folders_that_cannot_be_loaded(
    client: httpx.AsyncClient, root: Path, tmp_path: Path, path: str, status: int, says: str
) -> None:
    response = await load(client, "x", path)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert says in error["message"]
    assert error["param"] == "lora_path" or status == 422  # an adapter check names the field or tensor at fault
    assert store_entries(tmp_path / "store") == []  # nothing half-written


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"lora_path": "good"}, "lora_name"),
        ({"lora_name": "x"}, "lora_path"),
        ({"lora_name": "../x", "lora_path": "good"}, "lora_name"),
        ({"lora_name": "x", "lora_path": 3}, "lora_path"),
        ({"lora_name": "x", "lora_path": "good", "load_everything": True}, "load_everything"),
    ],
)
async def test_bad_bodies_are_400_naming_the_field(client: httpx.AsyncClient, body: dict, param: str) -> None:
    response = await client.post(LOAD, json=body, headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


async def test_both_routes_need_the_admin_token(client: httpx.AsyncClient, root: Path) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert (await load(client, "x", root / "good", headers)).status_code == 401
        assert (await client.post(UNLOAD, json={"lora_name": "x"}, headers=headers)).status_code == 401


async def test_loading_by_path_is_off_without_a_root(tiny_model_dir, tmp_path, root: Path) -> None:
    async with running_app(admin_settings(tiny_model_dir, tmp_path / "store")) as (client, _):
        response = await load(client, "x", root / "good")
        assert response.status_code == 403, response.text
        assert "--lora-path-root" in response.json()["error"]["message"]
    async with running_app(admin_settings(tiny_model_dir, tmp_path / "store", admin_token=None)) as (client, _):
        assert (await load(client, "x", root / "good")).status_code == 403  # no admin API at all


async def test_the_routes_are_documented(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path in (LOAD, UNLOAD):
        operation = paths[path]["post"]
        assert operation["responses"]["200"]["content"] == {"text/plain": {"schema": {"type": "string"}}}
        assert operation["security"] == [{"HTTPBearer": []}]
    assert {"409", "413", "415", "422", "429"} <= set(paths[LOAD]["post"]["responses"])
    assert "404" in paths[UNLOAD]["post"]["responses"]

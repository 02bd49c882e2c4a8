"""The admin API over a real engine: auth, uploads, replace, patch, delete, listing; bad uploads: test_admin_uploads."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from admin_helpers import (
    AUTH,
    TOKEN,
    admin_settings,
    complete,
    peft_text,
    registry_of,
    running_app,
    store_entries,
)
from admin_helpers import upload as upload_to
from fastapi import FastAPI

from server.adapters.store import META_FILE
from tests.helpers import make_peft_adapter

PROMPT = [5, 17, 99, 42, 7]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("uploads")
    qv = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return {
        "lora": make_peft_adapter(tiny_model_dir, root / "lora", seed=1, **qv),
        "lora2": make_peft_adapter(tiny_model_dir, root / "lora2", seed=2, **qv),
        "dora": make_peft_adapter(tiny_model_dir, root / "dora", seed=3, r=4, lora_alpha=8, use_dora=True,
                                  target_modules="all-linear"),
    }  # fmt: skip


@pytest.fixture
def store(tmp_path):
    return tmp_path / "store"


@pytest.fixture
async def served(tiny_model_dir, store) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    settings = admin_settings(tiny_model_dir, store, max_adapter_bytes=200_000, max_concurrent_uploads=10)
    async with running_app(settings) as served:  # ten uploads at once: test_ten_concurrent_uploads
        yield served


@pytest.fixture
def client(served) -> httpx.AsyncClient:
    return served[0]


def expected_text(model_dir, adapter, max_tokens: int) -> str:
    return peft_text(model_dir, adapter, PROMPT, max_tokens)


async def test_admin_api_is_off_without_a_token(tiny_model_dir, store, adapters):
    async with running_app(admin_settings(tiny_model_dir, store, admin_token=None)) as (client, _):
        for method, path in [("GET", "/admin/adapters"), ("GET", "/admin/adapters/x"), ("DELETE", "/admin/adapters/x")]:
            response = await client.request(method, path, headers=AUTH)
            assert response.status_code == 403
            assert "LORAPLEX_ADMIN_TOKEN" in response.json()["error"]["message"]
        assert (await upload_to(client, "a", adapters["lora"])).status_code == 403
        assert (await client.get("/v1/models")).status_code == 200
    assert store_entries(store) == []


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"},
     {"Authorization": "Bearer "}, {"Authorization": f"Bearer {TOKEN}x"}],
)  # fmt: skip
async def test_a_missing_or_wrong_token_is_401(client, adapters, store, headers):
    response = await client.get("/admin/adapters", headers=headers)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["type"] == "authentication_error"
    assert (await upload_to(client, "a", adapters["lora"], headers=headers)).status_code == 401
    assert (await client.patch("/admin/adapters/a", json={"pinned": True}, headers=headers)).status_code == 401
    assert store_entries(store) == []
    right = await client.get("/admin/adapters", headers=AUTH)
    assert right.status_code == 200 and right.json() == {"object": "list", "data": []}
    assert (await client.get("/v1/models")).status_code == 200  # generation routes take no token


async def test_an_upload_is_served_at_once(client, adapters, tiny_model_dir):
    before = int(time.time())
    response = await upload_to(client, "sql", adapters["lora"])
    assert response.status_code == 201, response.text
    record = response.json()
    data = (adapters["lora"] / "adapter_model.safetensors").read_bytes()
    assert sorted(record.pop("target_modules")) == ["q_proj", "v_proj"]
    assert before <= record.pop("created_at") <= time.time()
    assert record == {
        "name": "sql", "rank": 4, "alpha": 8.0, "dora": False, "dtype": "F32", "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(), "mode": "unmerged", "pinned": False, "tier": "host",
        "running": 0, "waiting": 0, "requests_served": 0, "last_used_at": None, "error": None,
    }  # fmt: skip
    models = (await client.get("/v1/models")).json()["data"]
    assert {(m["id"], m["parent"]) for m in models} == {("tiny", None), ("sql", "tiny")}
    assert await complete(client, "sql", PROMPT, 8) == expected_text(tiny_model_dir, adapters["lora"], 8)
    state = (await client.get("/admin/adapters/sql", headers=AUTH)).json()
    assert (state["tier"], state["requests_served"], state["running"], state["waiting"]) == ("device", 1, 0, 0)
    assert state["last_used_at"] >= before


async def test_duplicates_conflict_and_replace_swaps_the_weights(client, adapters, store, tiny_model_dir):
    first = await upload_to(client, "a", adapters["lora"], mode="merged", pinned="true")
    assert first.status_code == 201
    again = await upload_to(client, "a", adapters["lora2"])
    assert again.status_code == 409 and "replace" in again.json()["error"]["message"]
    assert await complete(client, "a", PROMPT, 6) == expected_text(tiny_model_dir, adapters["lora"], 6)
    replaced = await upload_to(client, "a", adapters["lora2"], replace="true")
    assert replaced.status_code == 201
    record = replaced.json()
    assert record["sha256"] != first.json()["sha256"]
    assert (record["mode"], record["pinned"]) == ("merged", True)  # kept from the adapter it replaced
    assert await complete(client, "a", PROMPT, 6) == expected_text(tiny_model_dir, adapters["lora2"], 6)
    assert store_entries(store) == ["a"]


async def test_patch_changes_mode_and_pin_persistently(tiny_model_dir, store, adapters):
    async with running_app(admin_settings(tiny_model_dir, store, max_loras=2)) as (client, app):
        assert (await upload_to(client, "a", adapters["lora"])).status_code == 201
        assert (await upload_to(client, "b", adapters["lora2"])).status_code == 201
        patched = await client.patch("/admin/adapters/a", json={"mode": "auto"}, headers=AUTH)
        assert patched.status_code == 200 and (patched.json()["mode"], patched.json()["pinned"]) == ("auto", False)
        patched = await client.patch("/admin/adapters/a", json={"pinned": True}, headers=AUTH)
        assert (patched.json()["mode"], patched.json()["pinned"]) == ("auto", True)
        assert json.loads((store / "a" / META_FILE).read_text())["pinned"] is True
        registry = registry_of(app)
        assert registry.mode("a") == "auto" and registry.mode("b") == "unmerged"
        over = await client.patch("/admin/adapters/b", json={"pinned": True}, headers=AUTH)
        assert over.status_code == 409 and over.json()["error"]["param"] == "pinned"  # max_loras 2: one pin
        for body, status in [({"mode": "sideways"}, 400), ({"colour": 1}, 400)]:
            assert (await client.patch("/admin/adapters/a", json=body, headers=AUTH)).status_code == status
        assert (await client.patch("/admin/adapters/nope", json={}, headers=AUTH)).status_code == 404
    async with running_app(admin_settings(tiny_model_dir, store, max_loras=2)) as (client, app):
        again = (await client.get("/admin/adapters/a", headers=AUTH)).json()
        assert (again["mode"], again["pinned"]) == ("auto", True)
        assert registry_of(app).mode("a") == "auto"


async def test_delete_removes_files_and_answers_404_after(client, adapters, store):
    assert (await upload_to(client, "a", adapters["lora"])).status_code == 201
    assert (await complete(client, "a", PROMPT, 2)) is not None
    deleted = await client.delete("/admin/adapters/a", headers=AUTH)
    assert deleted.status_code == 200 and deleted.json() == {"name": "a", "deleted": True}
    assert store_entries(store) == []
    assert (await client.get("/admin/adapters/a", headers=AUTH)).status_code == 404
    assert (await client.delete("/admin/adapters/a", headers=AUTH)).status_code == 404
    assert (await client.post("/v1/completions", json={"model": "a", "prompt": "x"})).status_code == 404
    assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == ["tiny"]


async def test_ten_concurrent_uploads(client, adapters, store, tiny_model_dir):
    kinds = ["lora", "lora2", "dora"]
    responses = await asyncio.gather(*[upload_to(client, f"task-{i}", adapters[kinds[i % 3]]) for i in range(10)])
    assert [r.status_code for r in responses] == [201] * 10
    assert store_entries(store) == sorted(f"task-{i}" for i in range(10))
    listed = (await client.get("/admin/adapters", headers=AUTH)).json()["data"]
    assert sorted(a["name"] for a in listed) == sorted(f"task-{i}" for i in range(10))
    texts = await asyncio.gather(*[complete(client, f"task-{i}", PROMPT, 4) for i in range(3)])
    assert list(texts) == [expected_text(tiny_model_dir, adapters[k], 4) for k in kinds]
    same = await asyncio.gather(*[upload_to(client, "same", adapters["lora"]) for _ in range(3)])
    assert sorted(r.status_code for r in same) == [201, 409, 409]
    assert store_entries(store) == sorted(["same", *(f"task-{i}" for i in range(10))])


async def test_folders_dropped_in_by_hand_are_listed_and_served(tiny_model_dir, store, adapters):
    store.mkdir()
    shutil.copytree(adapters["dora"], store / "dropped")
    broken = shutil.copytree(adapters["lora"], store / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"junk")
    async with running_app(admin_settings(tiny_model_dir, store)) as (client, _):
        listed = {a["name"]: a for a in (await client.get("/admin/adapters", headers=AUTH)).json()["data"]}
        assert listed["dropped"]["tier"] == "disk" and listed["dropped"]["dora"] is True
        data = (adapters["dora"] / "adapter_model.safetensors").read_bytes()
        assert listed["dropped"]["sha256"] == hashlib.sha256(data).hexdigest()
        assert listed["broken"]["rank"] is None and "not a safetensors file" in listed["broken"]["error"]
        assert await complete(client, "dropped", PROMPT, 4) == expected_text(tiny_model_dir, adapters["dora"], 4)
        assert (await client.get("/admin/adapters/dropped", headers=AUTH)).json()["tier"] == "device"
        response = await client.post("/v1/completions", json={"model": "broken", "prompt": "x", "max_tokens": 2})
        assert response.status_code == 422

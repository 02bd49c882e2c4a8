"""Store changes while requests stream: nothing in flight fails or changes weights, new requests see the change."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import pytest
from admin_helpers import AUTH, admin_settings, complete, peft_text, running_app, upload
from api_helpers import sse_payloads

from tests.helpers import make_peft_adapter

PROMPT = [5, 17, 99, 42, 7]
LONG = 400  # tokens: long enough (~1 s) for the admin calls to land while the streams run


@pytest.fixture(scope="module")
def sources(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stream-sources")
    return {name: make_peft_adapter(tiny_model_dir, root / name, seed=seed, r=4, target_modules=["q_proj", "v_proj"])
            for seed, name in enumerate(["a", "b", "a2", "c"])}  # fmt: skip


async def stream_text(client: httpx.AsyncClient, model: str, max_tokens: int) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0,
            "stream": True}  # fmt: skip
    response = await client.post("/v1/completions", json=body)
    events = sse_payloads(response)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    return "".join(event["choices"][0]["text"] for event in events)


async def running(client: httpx.AsyncClient, name: str) -> int:
    return (await client.get(f"/admin/adapters/{name}", headers=AUTH)).json()["running"]


async def test_upload_replace_and_delete_while_streams_run(tiny_model_dir, tmp_path, sources):
    store = tmp_path / "store"
    for name in ["a", "b"]:
        shutil.copytree(sources[name], store / name)
    async with running_app(admin_settings(tiny_model_dir, store)) as (client, _):
        refs = {model: await complete(client, model, PROMPT, LONG) for model in ["a", "b", "tiny"]}
        streams = [asyncio.create_task(stream_text(client, model, LONG)) for model in ["a", "a", "b", "tiny"]]
        for _ in range(500):
            if await running(client, "a") == 2 and await running(client, "b") == 1:
                break
            await asyncio.sleep(0.01)
        added = await upload(client, "c", sources["c"])
        replaced = await upload(client, "a", sources["a2"], replace="true")
        assert (added.status_code, replaced.status_code) == (201, 201)
        assert replaced.json()["running"] == 2  # both streams on the old version were still running
        assert await running(client, "b") == 1
        assert (await client.delete("/admin/adapters/b", headers=AUTH)).status_code == 200
        new_a, new_c = await asyncio.gather(complete(client, "a", PROMPT, 8), complete(client, "c", PROMPT, 8))
        refused = await client.post("/v1/completions", json={"model": "b", "prompt": PROMPT, "max_tokens": 2})
        assert refused.status_code == 404
        assert not all(stream.done() for stream in streams)
        results = await asyncio.gather(*streams)
        assert results == [refs["a"], refs["a"], refs["b"], refs["tiny"]]  # every stream ends, on its own weights
    assert new_a == peft_text(tiny_model_dir, sources["a2"], PROMPT, 8)  # new requests get the replacement
    assert new_c == peft_text(tiny_model_dir, sources["c"], PROMPT, 8)
    assert sorted(p.name for p in store.iterdir()) == ["a", "c"]

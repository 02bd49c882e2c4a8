"""Replacing an adapter again and again while requests for it stream: each gets a whole answer, promptly, from the
old or the new version; none sees a 404, an error or a stall."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from admin_helpers import AUTH, admin_settings, complete, registry_of, running_app, upload
from api_helpers import sse_payloads

from server.adapters.store import STAGING_PREFIX
from tests.helpers import make_peft_adapter

PROMPT = [5, 17, 99, 42, 7]
TOKENS = 12
SWAP_S = 0.2  # how long each replacement leaves the adapter's folder missing between its two renames
REPLACEMENTS = 6
DEADLINE_S = 15.0  # a request stalled behind a replacement took over 30 s; a normal one here takes well under 1 s


@pytest.fixture(scope="module")
def sources(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("replace-sources")
    return {name: make_peft_adapter(tiny_model_dir, root / name, seed=seed, r=4, target_modules=["q_proj", "v_proj"])
            for seed, name in enumerate(["v1", "v2"])}  # fmt: skip


@pytest.fixture
def slow_swaps(monkeypatch) -> list[tuple[float, float]]:
    """Widen the moment of a replacement when the old folder is aside and the new one not yet in place; the
    (start, end) monotonic times of each such moment."""
    rename, swaps = os.rename, []

    def slow(src, dst, *args, **kwargs):
        if Path(src).name.startswith(STAGING_PREFIX):
            start = time.monotonic()
            time.sleep(SWAP_S)
            swaps.append((start, time.monotonic()))
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", slow)
    return swaps


async def answer(client: httpx.AsyncClient, stream: bool) -> tuple[str, float, float]:
    """One greedy request for "a"; its text, how long it took and when it ended, after checking it ended whole."""
    body = {"model": "a", "prompt": PROMPT, "max_tokens": TOKENS, "min_tokens": TOKENS, "temperature": 0,
            "stream": stream}  # fmt: skip
    start = time.monotonic()
    response = await client.post("/v1/completions", json=body)
    elapsed = time.monotonic() - start
    assert response.status_code == 200, response.text
    if stream:
        events = sse_payloads(response)
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        return "".join(event["choices"][0]["text"] for event in events), elapsed, time.monotonic()
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    return choice["text"], elapsed, time.monotonic()


async def test_requests_stream_through_repeated_replacements(tiny_model_dir, tmp_path, sources, slow_swaps):
    store = tmp_path / "store"
    shutil.copytree(sources["v1"], store / "a")
    shutil.copytree(sources["v2"], store / "b")
    async with running_app(admin_settings(tiny_model_dir, store)) as (client, _):
        v1, v2 = await complete(client, "a", PROMPT, TOKENS), await complete(client, "b", PROMPT, TOKENS)
        assert v1 != v2  # the two versions answer differently, so each answer names its version
        done = asyncio.Event()
        answers: list[tuple[str, float, float]] = []

        async def requests(stream: bool) -> None:
            while not done.is_set():
                answers.append(await answer(client, stream))

        workers = [asyncio.create_task(requests(stream=i % 2 == 0)) for i in range(4)]
        for i in range(REPLACEMENTS):
            response = await upload(client, "a", sources["v2" if i % 2 == 0 else "v1"], replace="true")
            assert response.status_code == 201, response.text
            listed = await client.get("/admin/adapters", headers=AUTH)
            assert listed.status_code == 200 and [a["name"] for a in listed.json()["data"]] == ["a", "b"]
        done.set()
        await asyncio.gather(*workers)
        last = await complete(client, "a", PROMPT, TOKENS)
    assert {text for text, _, _ in answers} == {v1, v2}
    assert max(seconds for _, seconds, _ in answers) < DEADLINE_S
    assert len(slow_swaps) == REPLACEMENTS
    # The server kept answering while the folders were swapped (a loop blocked by the swap answers in none of them;
    # on a busy machine one swap may pass between two answers).
    answered = [any(start <= ended <= end for _, _, ended in answers) for start, end in slow_swaps]
    assert sum(answered) >= REPLACEMENTS // 2
    assert last == v1  # the last replacement put the first version back


async def test_a_cold_request_during_a_swap_gets_the_new_version(tiny_model_dir, tmp_path, sources, slow_swaps):
    store = tmp_path / "store"
    shutil.copytree(sources["v1"], store / "a")
    async with running_app(admin_settings(tiny_model_dir, store)) as (client, app):
        registry = registry_of(app)
        old = registry.view("a")  # registered, never loaded: its first request must read the disk
        assert old.tier == "disk"
        replacing = asyncio.create_task(upload(client, "a", sources["v2"], replace="true"))
        while (store / "a").exists():  # the old folder goes aside, the new one is not in yet
            await asyncio.sleep(0.005)
        assert registry.exists("a")
        key = await registry.acquire("a")  # its load finds no folder: it waits for the swap and takes the new one
        registry.release(key)
        assert (await replacing).status_code == 201
        current = await registry.acquire("a")
        registry.release(current)
        assert key == current

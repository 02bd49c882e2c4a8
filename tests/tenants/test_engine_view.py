"""A tenant's view of the engine has exactly the members the tenant-facing routes use: the rest of the engine
(adapter administration, the registry, the core) cannot be reached through it, scoped or not."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from server.engine.factory import build_engine
from server.engine.sequence import SamplingParams
from server.errors import NotFoundError
from server.settings import Settings
from server.tenants.engine_view import PassedOn, TenantEngine
from server.tenants.scope import Scope
from tests.helpers import make_adapter_store

API = Path(__file__).parents[2] / "server" / "api"
# Modules that are handed the engine itself, not a tenant's view: the admin routes, /health and the dependency
# that builds the views.
RAW_ENGINE_MODULES = {"routes_admin.py", "routes_vllm_lora.py", "routes_health.py", "deps.py", "tenancy.py"}
SCOPE = Scope(adapters=("mine",), base_model=True)
OFFERED = {name for name, member in vars(TenantEngine).items() if isinstance(member, PassedOn)} | {
    "list_models", "resolve_adapter", "generate"}  # fmt: skip


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    adapter = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    store = make_adapter_store(tiny_model_dir, tmp_path_factory.mktemp("store"), {"mine": adapter, "theirs": adapter})
    engine = build_engine(Settings(model=tiny_model_dir, adapters_store=store, kv_cache_bytes=2**20, block_size=4))
    yield engine
    engine.shutdown()


def test_every_member_the_routes_use_is_on_the_view() -> None:
    used: set[str] = set()
    for module in API.glob("*.py"):
        if module.name not in RAW_ENGINE_MODULES:
            used |= set(re.findall(r"(?<!server\.)(?<!\w)engine\.(\w+)", module.read_text()))  # self.engine.x too
    assert used <= OFFERED, f"add to TenantEngine (scoped if they name a model): {sorted(used - OFFERED)}"


@pytest.mark.parametrize(
    "name", ["adapter_views", "add_adapter", "remove_adapter", "update_adapter", "adapters", "core", "tokenizer",
             "call", "metrics", "shutdown", "no_such_member"],
)  # fmt: skip
def test_members_outside_the_view_are_not_reachable(engine, name: str) -> None:
    view = TenantEngine(engine, SCOPE)
    with pytest.raises(AttributeError):
        getattr(view, name)


def test_passed_on_members_are_the_engines_own(engine) -> None:
    view = TenantEngine(engine, SCOPE)
    for name in OFFERED - {"list_models", "resolve_adapter", "generate"}:
        assert getattr(view, name) == getattr(engine, name), name
    assert view.encode_prompt("hi") == engine.encode_prompt("hi")


def test_models_and_generation_are_scoped(engine) -> None:
    counted: list[int] = []
    view = TenantEngine(engine, SCOPE, counted.append)
    assert [card.name for card in view.list_models()] == [engine.served_model_name, "mine"]
    with pytest.raises(NotFoundError):
        view.resolve_adapter("theirs")

    async def run(adapter: str) -> list:
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        return [out async for out in view.generate([5, 6, 7], params, adapter, f"r-{adapter}")]

    assert sum(len(out.token_ids) for out in asyncio.run(run("mine"))) == 3 == sum(counted)
    with pytest.raises(NotFoundError):  # an adapter that did not come from resolve_adapter is checked too
        asyncio.run(run("theirs"))

"""One local Ray cluster (2 CPUs, loopback, no dashboard) and one deployed application for every Ray test."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from load_tests.readiness import wait_until_ok
from server.settings import ClusterSettings, Settings
from server.tenants.keys import hash_key
from tests.helpers import make_adapter_store, make_tiny_checkpoint, ray_ingress_port

if importlib.util.find_spec("ray") is None:  # the optional `ray` extra is not installed: nothing here can run
    collect_ignore_glob = ["test_*.py"]

APP = "loraplex-test"
TOKEN = "test-admin-token"
TENANT_KEY = "lpx-ray-test-tenant-key"
AUTH = {"Authorization": f"Bearer {TENANT_KEY}"}  # the one tenant of the key file, allowed everything
ADAPTERS = {"qv": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "dora": {"r": 4, "lora_alpha": 8, "target_modules": ["o_proj", "down_proj"], "use_dora": True},
            "sticky": {"r": 2, "lora_alpha": 4, "target_modules": ["k_proj"]}}  # fmt: skip


@dataclass
class Deployed:
    """The application under test: its URL, the settings every replica runs with, and the files behind them."""

    url: str
    settings: Settings
    model_dir: Path
    sources: Path  # a copy of the initial adapters, to upload from


@pytest.fixture(scope="package")  # one cluster for every Ray test: starting one takes ~30 s on 2 cores
def deployed(tmp_path_factory) -> Iterator[Deployed]:
    model_dir = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ray"), max_position_embeddings=4096)
    store = make_adapter_store(model_dir, tmp_path_factory.mktemp("store"), ADAPTERS)
    sources = make_adapter_store(model_dir, tmp_path_factory.mktemp("sources"), ADAPTERS)
    keys = tmp_path_factory.mktemp("keys") / "keys.toml"
    write_key_file(keys, {"everyone": TENANT_KEY})
    settings = Settings(
        model=model_dir, adapters_store=store, served_model_name="tiny", kv_cache_bytes=2**24, max_loras=4,
        admin_token=TOKEN, api_keys_file=keys, host="127.0.0.1", port=ray_ingress_port(),
    )  # fmt: skip
    import ray
    from ray import serve

    from server.cluster.launch import build_application, start_ray

    os.environ.pop("RAY_ADDRESS", None)  # a cluster of its own, never one the environment points at
    cluster = ClusterSettings(replicas=2, num_cpus_per_replica=1, app_name=APP)
    start_ray(settings, cluster, num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.run(build_application(settings, cluster), name=APP, route_prefix="/")
        url = f"http://{settings.host}:{settings.port}"
        wait_until_ok(f"{url}/health", 60)
        yield Deployed(url, settings, model_dir, sources)
    finally:
        serve.shutdown()
        ray.shutdown()


def write_key_file(path: Path, keys: dict[str, str]) -> None:
    """A key file with one tenant per (name, key), each allowed every adapter and the base model."""
    path.write_text("".join(f'[[tenants]]\nname = "{name}"\nkeys = ["{hash_key(key)}"]\nadapters = ["*"]\n'
                            "base_model = true\n" for name, key in keys.items()))  # fmt: skip


def samples(text: str, name: str, **labels: str) -> dict[str, float]:
    """Per replica, the sum of the samples of `name` whose labels include `labels`."""
    per_replica: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                replica = sample.labels["replica"]
                per_replica[replica] = per_replica.get(replica, 0) + sample.value
    return per_replica

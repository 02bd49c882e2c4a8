"""The shipped Ray Serve config and KubeRay manifest name real settings and build the application."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from server.cluster.launch import app_builder
from server.settings import ClusterSettings, Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "ray"


def _serve_configs() -> list[dict]:
    config = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    service = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    return [config, yaml.safe_load(service["spec"]["serveConfigV2"])]


@pytest.mark.parametrize("config", _serve_configs(), ids=["serve_config", "rayservice"])
def test_each_application_builds_from_its_args(config):
    (application,) = config["applications"]
    assert application["import_path"] == "server.cluster.launch:app_builder"
    args = application["args"]
    assert set(args) <= set(Settings.model_fields) | set(ClusterSettings.model_fields)
    ingress = app_builder(args)._bound_deployment
    engine = ingress.init_args[0]._bound_deployment  # the ingress is bound to the engine deployment
    settings: Settings = ingress.init_args[1]
    assert (engine.name, engine.num_replicas) == ("LoraplexEngine", args["replicas"])
    assert engine.ray_actor_options["num_gpus"] == args["num_gpus_per_replica"]
    assert str(settings.adapters_store) == args["adapters_store"]

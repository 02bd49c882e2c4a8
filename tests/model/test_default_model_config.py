"""The prepared default model's config.json names its architecture, so other tools load the folder as it is."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from server.model.default_model import DEFAULT_MODEL_NAME, default_model_dir


def test_a_checkpoint_prepared_without_architectures_gets_it(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "models" / DEFAULT_MODEL_NAME
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path))
    assert default_model_dir() == folder
    config = json.loads((folder / "config.json").read_text())
    assert config == {"model_type": "llama", "hidden_size": 8, "architectures": ["LlamaForCausalLM"]}
    assert [p.name for p in folder.iterdir()] == ["config.json"]  # no temporary file left behind


@pytest.mark.slow
def test_the_default_model_names_llama(default_model_dir) -> None:
    assert AutoConfig.from_pretrained(default_model_dir).architectures == ["LlamaForCausalLM"]

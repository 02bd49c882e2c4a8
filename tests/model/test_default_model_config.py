"""The prepared default model's config.json names its architecture, so other tools load the folder as it is, and its
generation_config.json carries the sampling its model card recommends."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from server.engine.generation_defaults import load_generation_defaults
from server.model.default_model import DEFAULT_MODEL_NAME, default_model_dir


def test_a_checkpoint_prepared_without_architectures_gets_it(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "models" / DEFAULT_MODEL_NAME
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path))
    assert default_model_dir() == folder
    config = json.loads((folder / "config.json").read_text())
    assert config == {"model_type": "llama", "hidden_size": 8, "architectures": ["LlamaForCausalLM"]}
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json"]  # no temporary file


def test_the_prepared_checkpoint_gets_the_model_cards_sampling_once(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "models" / DEFAULT_MODEL_NAME
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    generation = folder / "generation_config.json"
    generation.write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.7}))  # outdated
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path))
    default_model_dir()
    written = json.loads(generation.read_text())
    assert written == {"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.2, "do_sample": True, "top_p": 0.9}
    stamp = generation.stat().st_mtime_ns
    default_model_dir()
    assert generation.stat().st_mtime_ns == stamp  # already right: not rewritten


@pytest.mark.slow
def test_the_default_model_recommends_its_sampling(default_model_dir) -> None:
    assert load_generation_defaults(default_model_dir, "auto", None).as_dict() == {"temperature": 0.2, "top_p": 0.9}


@pytest.mark.slow
def test_the_default_model_names_llama(default_model_dir) -> None:
    assert AutoConfig.from_pretrained(default_model_dir).architectures == ["LlamaForCausalLM"]

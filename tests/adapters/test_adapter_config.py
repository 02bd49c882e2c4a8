"""adapter_config.json parsing: PEFT's own module matching is the oracle; every refusal names its field."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM

from server.adapters.config import parse_adapter_config, read_adapter_config
from server.api.errors import status_of
from server.errors import AdapterError

NUM_LAYERS = 3
MAX_RANK = 64


@pytest.fixture(scope="module")
def base_model() -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
    )
    return LlamaForCausalLM(config).eval()


def _peft_targets(model: LlamaForCausalLM, config: LoraConfig) -> dict[tuple[int, str], tuple[int, float]]:
    """What PEFT itself wraps: (layer, projection) -> (rank, scale)."""
    wrapped = get_peft_model(copy.deepcopy(model), config)
    found = {}
    for name, module in wrapped.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            parts = name.split(".")
            found[(int(parts[2]), parts[-1])] = (module.r["default"], module.scaling["default"])
    return found


def _save(config: LoraConfig, tmp_path) -> Path:
    config.save_pretrained(tmp_path)
    return tmp_path / "adapter_config.json"


MATCHING_CASES = {
    "list": {"target_modules": ["q_proj", "v_proj"]},
    "dotted": {"target_modules": ["self_attn.k_proj", "mlp.down_proj"], "r": 4, "lora_alpha": 32},
    "all-linear-rslora": {"target_modules": "all-linear", "use_rslora": True, "r": 16, "lora_alpha": 8},
    "regex": {"target_modules": r"model\.layers\.[02]\.(self_attn\.(q|o)_proj|mlp\.up_proj)"},
    "regex-dora": {"target_modules": r".*\.(gate|up)_proj", "use_dora": True},
    "layer-int": {"target_modules": ["q_proj", "gate_proj"], "layers_to_transform": 1},
    "layer-list": {"target_modules": ["v_proj", "o_proj"], "layers_to_transform": [0, 2], "layers_pattern": "layers"},
    "exclude-list": {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["model.layers.1.self_attn.v_proj"]},
    "exclude-regex": {"target_modules": ["q_proj", "k_proj"], "exclude_modules": r".*layers\.0\..*"},
    "patterns": {
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "r": 4,
        "rank_pattern": {"model.layers.1.self_attn.q_proj": 16, "down_proj": 2, r"layers\.2\.self_attn\..*": 12},
        "alpha_pattern": {"v_proj": 32, "layers.0.mlp.down_proj": 3},
    },
    "rslora-pattern": {
        "target_modules": ["q_proj", "v_proj"],
        "r": 9,
        "use_rslora": True,
        "rank_pattern": {"v_proj": 25},
    },
}


@pytest.mark.parametrize("kwargs", MATCHING_CASES.values(), ids=MATCHING_CASES.keys())
def test_targets_ranks_and_scales_match_peft(base_model, tmp_path, kwargs):
    peft_config = LoraConfig(**kwargs)
    want = _peft_targets(base_model, peft_config)
    parsed = parse_adapter_config(json.loads(_save(peft_config, tmp_path).read_text()), NUM_LAYERS, MAX_RANK)
    got = {key: (spec.rank, spec.scale) for key, spec in parsed.targets.items()}
    assert got.keys() == want.keys()
    for key, (rank, scale) in want.items():
        assert got[key][0] == rank
        assert got[key][1] == pytest.approx(scale, rel=1e-12)
    assert parsed.use_dora == kwargs.get("use_dora", False)
    assert parsed.max_rank == max(r for r, _ in want.values())


def test_target_modules_in_model_order():
    raw = {"peft_type": "LORA", "target_modules": ["down_proj", "q_proj"]}
    assert parse_adapter_config(raw, 2, 8).target_modules == ("q_proj", "down_proj")


def test_training_only_fields_are_accepted():
    raw = {
        "peft_type": "LORA",
        "target_modules": ["q_proj"],
        "init_lora_weights": "gaussian",
        "lora_dropout": 0.1,
        "eva_config": {"rho": 2.0},
        "megatron_core": "megatron.core",
        "qalora_group_size": 16,
        "task_type": "CAUSAL_LM",
        "some_future_option": None,
    }
    assert parse_adapter_config(raw, 2, 8).targets[(0, "q_proj")].rank == 8


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"peft_type": "IA3"}, "peft_type"),
        ({"peft_type": None}, "peft_type"),
        ({"bias": "all"}, "bias"),
        ({"bias": "lora_only"}, "bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "target_modules"),
        ({"target_modules": ["lm_head"]}, "target_modules"),
        ({"target_modules": r".*(q_proj|lm_head)"}, "target_modules"),
        ({"target_modules": r"model\.norm"}, "target_modules"),
        ({"target_modules": ["mlp"]}, "target_modules"),
        ({"target_modules": ["c_attn"]}, "target_modules"),
        ({"target_modules": None}, "target_modules"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": ["q_proj"], "layers_to_transform": [7]}, "target_modules"),
        ({"target_modules": "q_proj", "layers_to_transform": 0}, "layers_to_transform"),
        ({"target_modules": "(", "r": 8}, "target_modules"),
        ({"layers_to_transform": "0"}, "layers_to_transform"),
        ({"r": 128}, "r"),
        ({"r": 0}, "r"),
        ({"r": 8.5}, "r"),
        ({"rank_pattern": {"v_proj": 65}}, "rank_pattern"),
        ({"rank_pattern": {"(": 4}}, "rank_pattern"),
        ({"alpha_pattern": {"(?i)q_proj": 4}}, "alpha_pattern"),
        ({"layers_to_transform": [0], "layers_pattern": "la(yers"}, "layers_pattern"),
        ({"layers_to_transform": [0], "layers_pattern": 3}, "layers_pattern"),
        ({"alpha_pattern": {"q_proj": "big"}}, "alpha_pattern"),
        ({"lora_alpha": "16"}, "lora_alpha"),
        ({"use_dora": "yes"}, "use_dora"),
        ({"use_rslora": 1}, "use_rslora"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"use_qalora": True}, "use_qalora"),
        ({"lora_bias": True}, "lora_bias"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
        ({"megatron_config": {"tensor_model_parallel_size": 2}}, "megatron_config"),
        ({"target_parameters": ["mlp.experts.down_proj"]}, "target_parameters"),
        ({"trainable_token_indices": [5, 6]}, "trainable_token_indices"),
        ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights"),
        ({"init_lora_weights": "olora"}, "init_lora_weights"),
        ({"init_lora_weights": "loftq"}, "init_lora_weights"),
        ({"some_future_option": 3}, "some_future_option"),
    ],
)
def test_refusals_name_the_field(change, field):
    raw = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **change}
    with pytest.raises(AdapterError) as info:
        parse_adapter_config(raw, 2, MAX_RANK)
    assert info.value.param == field
    assert field in info.value.message
    assert status_of(type(info.value)) == 422


def test_refused_target_is_named(tmp_path):
    raw = {"peft_type": "LORA", "target_modules": ["q_proj", "embed_tokens"]}
    with pytest.raises(AdapterError, match=r"'embed_tokens' targets model\.embed_tokens"):
        parse_adapter_config(raw, 2, MAX_RANK)


def test_read_adapter_config_file_errors(tmp_path):
    with pytest.raises(AdapterError, match="missing") as info:
        read_adapter_config(tmp_path / "adapter_config.json", 2, MAX_RANK)
    assert info.value.param == "adapter_config.json"
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_adapter_config(tmp_path / "adapter_config.json", 2, MAX_RANK)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match="JSON object"):
        read_adapter_config(tmp_path / "adapter_config.json", 2, MAX_RANK)


def test_peft_saved_config_round_trips(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, task_type="CAUSAL_LM")
    parsed = read_adapter_config(_save(config, tmp_path), NUM_LAYERS, MAX_RANK)
    assert parsed.use_dora
    assert set(parsed.targets) == {(i, n) for i in range(NUM_LAYERS) for n in ("q_proj", "v_proj")}
    assert {spec.scale for spec in parsed.targets.values()} == {2.0}

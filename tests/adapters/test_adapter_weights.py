"""Adapters saved by PEFT itself load into updates that reproduce PEFT's layer outputs; corrupt folders are refused."""

from __future__ import annotations

import copy
import hashlib
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from server.adapters.weights import WEIGHTS_FILE, ModelInfo, validate_adapter_dir
from server.errors import AdapterError
from server.model import module_names

MAX_RANK = 64
ADAPTERS = {
    "lora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear"),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear"),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "down_proj"],
        rank_pattern={"model.layers.1.self_attn.q_proj": 16, "down_proj": 2},
        alpha_pattern={"k_proj": 32},
        layers_to_transform=[1],
    ),
    "dora-rslora-patterns": dict(
        r=8,
        lora_alpha=4,
        use_dora=True,
        use_rslora=True,
        target_modules=["o_proj", "up_proj"],
        rank_pattern={"up_proj": 2},
    ),
}


@pytest.fixture(scope="module")
def base_model() -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


PARENTS = dict(module_names.LLAMA.projections)


def model_info(model: LlamaForCausalLM) -> ModelInfo:
    """Describe a transformers Llama the way the server describes its own model."""
    layers = model.model.layers

    def weight(layer: int, proj: str) -> torch.Tensor:
        return getattr(getattr(layers[layer], PARENTS[proj]), proj).weight

    shapes = {proj: (weight(0, proj).shape[1], weight(0, proj).shape[0]) for proj in PARENTS}
    return ModelInfo(len(layers), shapes, torch.float32, torch.device("cpu"), weight, module_names.LLAMA)


def save_adapter(base: LlamaForCausalLM, path: Path, dtype: torch.dtype = torch.float32, **kwargs) -> Path:
    """Train-free PEFT adapter with random A, B (and DoRA magnitudes off their init), saved as safetensors."""
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    peft_model.to(dtype).save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ADAPTERS)
def test_updates_reproduce_peft_layers(base_model, tmp_path, kind, dtype):
    path = save_adapter(base_model, tmp_path / kind, dtype, **ADAPTERS[kind])
    loaded = validate_adapter_dir(path, model_info(base_model), MAX_RANK)
    oracle = PeftModel.from_pretrained(copy.deepcopy(base_model), path).eval()
    wrapped = {
        (int(name.split(".")[2]), name.split(".")[-1]): module
        for name, module in oracle.base_model.model.named_modules()
        if hasattr(module, "lora_A")
    }
    assert loaded.updates.keys() == wrapped.keys()
    assert loaded.config.use_dora == ADAPTERS[kind].get("use_dora", False)
    for (layer, proj), module in wrapped.items():
        update = loaded.updates[(layer, proj)]
        weight = model_info(base_model).base_weight(layer, proj)
        x = torch.randn(5, weight.shape[1])
        with torch.no_grad():
            y = update.apply(x, x @ weight.T)  # g ⊙ (x·Wᵀ + (x·Aᵀ)·(s·B)ᵀ), g = 1 for plain LoRA
            torch.testing.assert_close(y, module(x), atol=1e-5, rtol=1e-5)
        assert update.a.dtype == torch.float32


def test_size_and_digest_describe_the_weights_file(base_model, tmp_path):
    path = save_adapter(base_model, tmp_path / "a", **ADAPTERS["lora"])
    loaded = validate_adapter_dir(path, model_info(base_model), MAX_RANK)
    data = (path / WEIGHTS_FILE).read_bytes()
    assert loaded.size_bytes == len(data)
    assert loaded.sha256 == hashlib.sha256(data).hexdigest()
    assert loaded.num_bytes == 2 * 4 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8)  # 2 layers of fp32 q and v


def test_updates_follow_model_dtype_and_fold_the_scale(base_model, tmp_path):
    path = save_adapter(base_model, tmp_path / "a", **ADAPTERS["lora"])
    info = model_info(base_model)
    half = replace(info, dtype=torch.bfloat16)
    update = validate_adapter_dir(path, half, MAX_RANK).updates[(0, "q_proj")]
    saved = load_file(path / WEIGHTS_FILE)["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert update.b.dtype == torch.bfloat16
    torch.testing.assert_close(update.b, (2.0 * saved).to(torch.bfloat16))


@pytest.fixture
def lora_dir(base_model, tmp_path) -> Path:
    return save_adapter(base_model, tmp_path / "adapter", **ADAPTERS["lora"])


A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(path / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, path / WEIGHTS_FILE)


@pytest.mark.parametrize(
    ("edit", "param", "message"),
    [
        (lambda t: t[A0].view(-1).__setitem__(3, float("nan")), A0, "NaN or infinite"),
        (lambda t: t[A0].view(-1).__setitem__(0, float("inf")), A0, "NaN or infinite"),
        (lambda t: t.__setitem__(A0, torch.zeros(8, 65)), A0, r"shape \[8, 65\]"),
        (lambda t: t.__setitem__(A0, torch.zeros(4, 64)), A0, r"call for \[8, 64\]"),
        (lambda t: t.__setitem__(A0, t[A0].double()), A0, "dtype F64"),
        (lambda t: t.__setitem__(A0, t[A0].to(torch.int32)), A0, "dtype I32"),
        (lambda t: t.pop(A0), A0, "lacks tensor"),
        (
            lambda t: t.__setitem__(A0.replace("q_proj", "k_proj"), t[A0].clone()),
            A0.replace("q_proj", "k_proj"),
            "unexpected",
        ),
        (lambda t: t.__setitem__("lm_head.weight", torch.zeros(2, 2)), "lm_head.weight", "unexpected"),
    ],
    ids=["nan", "inf", "wrong-in", "wrong-rank", "float64", "int32", "missing", "extra", "foreign"],
)
def test_corrupt_tensors_are_refused(base_model, lora_dir, edit, param, message):
    _rewrite(lora_dir, edit)
    with pytest.raises(AdapterError, match=message) as info:
        validate_adapter_dir(lora_dir, model_info(base_model), MAX_RANK)
    assert info.value.param == param


@pytest.mark.parametrize("keep", [10, 7, 0])
def test_truncated_file_is_refused(base_model, lora_dir, keep):
    data = (lora_dir / WEIGHTS_FILE).read_bytes()
    (lora_dir / WEIGHTS_FILE).write_bytes(data[:keep] if keep else data[:-16])
    with pytest.raises(AdapterError, match="not a valid safetensors file") as info:
        validate_adapter_dir(lora_dir, model_info(base_model), MAX_RANK)
    assert info.value.param == WEIGHTS_FILE


def test_pickled_weights_are_refused_unread(base_model, lora_dir):
    (lora_dir / WEIGHTS_FILE).unlink()
    (lora_dir / "adapter_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(AdapterError, match=r"pickled weights are refused.*safetensors") as info:
        validate_adapter_dir(lora_dir, model_info(base_model), MAX_RANK)
    assert info.value.param == "adapter_model.bin"


def test_missing_pieces_are_refused(base_model, lora_dir, tmp_path):
    info = model_info(base_model)
    with pytest.raises(AdapterError, match="does not exist"):
        validate_adapter_dir(tmp_path / "nowhere", info, MAX_RANK)
    (lora_dir / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterError, match=f"{WEIGHTS_FILE} is missing"):
        validate_adapter_dir(lora_dir, info, MAX_RANK)
    shutil.rmtree(lora_dir)
    lora_dir.mkdir()
    with pytest.raises(AdapterError, match=r"adapter_config\.json is missing"):
        validate_adapter_dir(lora_dir, info, MAX_RANK)


def test_rank_above_limit_is_refused(base_model, lora_dir):
    with pytest.raises(AdapterError, match="exceeds max_lora_rank 4") as info:
        validate_adapter_dir(lora_dir, model_info(base_model), max_lora_rank=4)
    assert info.value.param == "r"


def test_dora_on_a_zero_row_is_refused(base_model, tmp_path):
    path = save_adapter(base_model, tmp_path / "dora", **ADAPTERS["dora"])
    _rewrite(path, lambda t: t.update({k: torch.zeros_like(v) for k, v in t.items() if "lora_B" in k}))
    info = model_info(base_model)
    zero_base = replace(info, base_weight=lambda i, p: torch.zeros_like(info.base_weight(i, p)))
    with pytest.raises(AdapterError, match="non-finite DoRA scale") as error:
        validate_adapter_dir(path, zero_base, MAX_RANK)
    assert error.value.param.endswith("lora_magnitude_vector")

"""Random-weight checkpoints with the published shapes of real bases, and LoRA stores for them, for benchmarks.

No weights can be downloaded here, so real-size benchmarks run on random weights with the published configs of
Qwen3-0.6B and Llama-3.2-1B (bf16 safetensors as transformers saves them) and the default model's tokenizer. The
configs' vocabularies are larger than that tokenizer's; the embedding rows past it are zeroed (the heads are tied,
so those logits are 0 while every real token's logit spreads around 0 and the largest is well above it): greedy
decoding stays within the tokenizer's ids. Adapters are written straight in PEFT's format (A and B random, so every
delta is non-zero), without loading the base into PEFT.

Usage: .venv/bin/python -m bench.real_shapes SHAPE OUT_DIR  (SHAPE: qwen3-0.6b, llama3.2-1b)
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from server.model.default_model import default_model_dir
from server.model.module_names import LLAMA

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
SHAPES = {
    "qwen3-0.6b": lambda: Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=1, eos_token_id=2,
    ),
    "llama3.2-1b": lambda: LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
}  # fmt: skip


def make_checkpoint(shape: str, out: Path) -> Path:
    """A bf16 random-weight checkpoint of `shape` with the default model's tokenizer; kept if already there."""
    if (out / "config.json").is_file():
        return out
    config = SHAPES[shape]()
    config.architectures = [{"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[config.model_type]]
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    tokenizer_dir = default_model_dir()
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.02)
        model.get_input_embeddings().weight[vocab:] = 0
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def make_lora_store(model_dir: Path, root: Path, count: int, rank: int, targets: tuple[str, ...] = LLAMA.targets):
    """`count` random LoRA adapters of `rank` on `targets` of every layer, named `a0`, `a1`, ...; returns the names."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}  # fmt: skip
    names = [f"a{i}" for i in range(count)]
    for i, name in enumerate(names):
        generator = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(layers):
            for target in targets:
                fan_in, fan_out = shapes[target]
                prefix = f"base_model.model.{LLAMA.projection(layer, target)}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.01
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors"
        )
        adapter_config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets),
                          "base_model_name_or_path": str(model_dir), "task_type": "CAUSAL_LM"}  # fmt: skip
        (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(make_checkpoint(args.shape, args.out))


if __name__ == "__main__":
    main()

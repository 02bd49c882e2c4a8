"""Test helpers that build real checkpoints and reference outputs; no network."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from tests.tokenizer import save_tiny_tokenizer

TINY_CONFIG = dict(
    vocab_size=259,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def ray_ingress_port() -> int:
    """A free loopback port for a Ray Serve direct ingress started later: between Ray's worker ports (10002-19999)
    and Linux's ephemeral range (32768+), so no process Ray starts meanwhile can take it."""
    for port in random.sample(range(30000, 32768), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 30000-32767")


def make_tiny_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """Save a random-weight LlamaForCausalLM (safetensors) plus a byte-level tokenizer to `path`."""
    return save_random_checkpoint(path, LlamaConfig(**{**TINY_CONFIG, **overrides}), seed)


def save_random_checkpoint(path: Path, config, seed: int = 0) -> Path:
    """Save a random-weight model of `config` (any causal LM transformers knows) with the byte-level tokenizer."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the default init make logits distinct
            p.normal_(0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    save_tiny_tokenizer(path, config.vocab_size)
    return path


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Reference greedy continuations from transformers `generate`, one prompt at a time (no padding effects)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens)
        outs.append(gen[0, len(prompt) :].tolist())
    return outs


def make_peft_adapter(model_dir: Path, path: Path, seed: int = 0, b_scale: float = 10.0, **lora_kwargs) -> Path:
    """A random (untrained) PEFT adapter for the checkpoint at `model_dir`, DoRA magnitudes moved off their init."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif "lora_B" in name:
                p.mul_(b_scale)  # make every adapter move the logits well past the tolerance
    model.save_pretrained(path)
    return path


def peft_greedy(model_dir: Path, adapter: Path | None, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by transformers + PEFT with one adapter (or none), EOS suppressed like min_tokens."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        out = model.eval().generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
            do_sample=False,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def peft_logits(model_dir: Path, adapter: Path | None, token_ids: list[int]) -> torch.Tensor:
    """Logits `[len, vocab]` of transformers + PEFT with one adapter (or none) over `token_ids`."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(torch.tensor([token_ids])).logits[0]


def make_adapter_store(model_dir: Path, root: Path, specs: dict[str, dict]) -> Path:
    """A store folder with one random PEFT adapter per entry of `specs` (name -> LoraConfig arguments)."""
    for seed, (name, kwargs) in enumerate(specs.items()):
        make_peft_adapter(model_dir, root / name, seed=seed, **kwargs)
    return root


def make_fault_store(model_dir: Path, root: Path) -> Path:
    """Two well-behaved adapters (`a`: r=4 q,v; `b`: r=8 all-linear) and `overflow`, whose finite weights give a
    delta that overflows float32: the residual stream turns infinite, then NaN."""
    make_adapter_store(model_dir, root, {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    })  # fmt: skip
    make_peft_adapter(model_dir, root / "overflow", seed=7, b_scale=1e38, r=4, lora_alpha=8,
                      target_modules=["v_proj", "o_proj"])  # fmt: skip
    return root

"""Test helpers that build real checkpoints and reference outputs; no network."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

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


def make_tiny_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """Save a random-weight LlamaForCausalLM (safetensors) plus a byte-level tokenizer to `path`."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_CONFIG, **overrides})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the default init make logits distinct
            p.normal_(0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    save_tiny_tokenizer(path, config.vocab_size)
    return path


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Reference greedy continuations from transformers `generate`, one prompt at a time (no padding effects)."""
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens)
        outs.append(gen[0, len(prompt) :].tolist())
    return outs

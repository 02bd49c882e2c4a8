"""Tiny random-weight checkpoints of every served family, built from each family's transformers config class."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from server.engine.batch_builder import build_forward_batch
from server.engine.sequence import SamplingParams, Sequence
from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel
from tests.helpers import TINY_CONFIG, save_random_checkpoint

WINDOW = 8  # sliding windows are shorter than the test prompts, so every windowed layer masks something
BASE = {k: v for k, v in TINY_CONFIG.items() if k != "tie_word_embeddings"}
# Short original contexts, so the test prompts reach the scaled part of every rotary type.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.3, 1.7, 2.2], "long_factor": [1.1, 1.9, 3.0, 4.5],
            "original_max_position_embeddings": 64}  # fmt: skip

# name -> (config class, options): each exercises what its family adds to the forward.
FAMILIES = {
    "llama": (LlamaConfig, dict(tie_word_embeddings=False)),  # the tiny Llama of most tests
    "llama3": (
        LlamaConfig,
        dict(rope_parameters=LLAMA3_ROPE, head_dim=24, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    ),
    "llama-linear": (LlamaConfig, dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})),
    # transformers rescales dynamic NTK for the whole batch past max_position_embeddings; within it, it is exact
    # (`server.model.rope` says what we do past it; tests/model/test_rope.py checks that)
    "llama-dynamic": (LlamaConfig, dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})),
    "llama-yarn": (
        LlamaConfig,
        dict(
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 1e4,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        ),
    ),
    "qwen2": (Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (Qwen3Config, dict(head_dim=32, tie_word_embeddings=True)),
    "mistral": (MistralConfig, dict(sliding_window=WINDOW, head_dim=16)),
    "gemma": (GemmaConfig, dict(head_dim=16)),
    "gemma2": (
        Gemma2Config,
        dict(
            head_dim=16,
            sliding_window=WINDOW,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3": (
        Gemma3TextConfig,
        dict(
            head_dim=16,
            sliding_window=WINDOW,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0},
            },
        ),
    ),
    "phi3": (
        Phi3Config,
        dict(rope_parameters=LONGROPE, max_position_embeddings=256, sliding_window=None, pad_token_id=0),
    ),
}


def make_family_checkpoint(path: Path, family: str, seed: int = 0) -> Path:
    """Save a random-weight checkpoint of `family` (safetensors) plus the byte-level tokenizer to `path`."""
    config_class, options = FAMILIES[family]
    return save_random_checkpoint(path, config_class(**{**BASE, **options}), seed)


def lockstep_logits(models: list[LoadedModel], prompts: list[list[int]], steps: int) -> Iterator[list[torch.Tensor]]:
    """Each step's logits `[rows, vocab]` of every model over the same prompts (prefill chunks of 16, then decode);
    all models continue with the first model's greedy tokens, so their logits stay comparable step by step."""
    runs = []
    for loaded in models:
        seqs = [Sequence(str(i), p, SamplingParams()) for i, p in enumerate(prompts)]
        for i, seq in enumerate(seqs):
            seq.block_table.extend(range(16 * i, 16 * i + 16))
        runs.append((loaded, seqs, KVCache(loaded.spec, 16 * len(seqs), 4, loaded.dtype, torch.device("cpu"))))
    for _ in range(steps):
        step = []
        for loaded, seqs, cache in runs:
            work = [(s, min(s.num_uncomputed_tokens, 16)) for s in seqs]
            batch = build_forward_batch(work, 4, torch.device("cpu"))
            with torch.inference_mode():
                step.append(loaded.model.compute_logits(loaded.model(batch, cache)[batch.logits_indices]))
            for s, n in work:
                s.num_computed_tokens += n
        yield step
        tokens = step[0].argmax(-1).tolist()
        for _, seqs, _ in runs:
            for token, s in zip(tokens, [s for s in seqs if s.num_uncomputed_tokens == 0], strict=True):
                s.output_token_ids.append(token)


def near_tie_margins(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Where the greedy tokens differ: how far the reference prefers its token over the other's (logits)."""
    want, got = reference.argmax(-1), other.argmax(-1)
    margin = reference.gather(1, want[:, None]) - reference.gather(1, got[:, None])
    return margin[got != want].flatten()

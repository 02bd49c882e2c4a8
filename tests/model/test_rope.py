"""Rotary tables of the sequence-length dependent types, decided per position (`server.model.rope`)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, Phi3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from server.model.rope import rope_specs
from tests.families import LONGROPE


def test_dynamic_ntk_rotates_each_position_with_the_frequencies_of_its_own_length():
    config = LlamaConfig(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
                         max_position_embeddings=32, hidden_size=64, num_attention_heads=4)  # fmt: skip
    spec = rope_specs(config, ("full_attention",))["full_attention"]
    positions = torch.tensor([0, 5, 31, 32, 47, 200])
    angles = spec.freqs(positions)
    for row, p in enumerate(positions.tolist()):
        inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, torch.device("cpu"), seq_len=p + 1)
        torch.testing.assert_close(angles[row], p * inv_freq, rtol=1e-6, atol=0)
    assert not angles[-1].equal(200 * spec.inv_freq)  # past the context the base really changes


def test_longrope_switches_to_the_long_factors_past_the_original_context():
    config = Phi3Config(rope_parameters=LONGROPE, max_position_embeddings=256, hidden_size=64, num_attention_heads=4,
                        pad_token_id=0)  # fmt: skip
    spec = rope_specs(config, ("full_attention",))["full_attention"]
    short, scaling = ROPE_INIT_FUNCTIONS["longrope"](config, torch.device("cpu"))
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, torch.device("cpu"), seq_len=65)
    angles = spec.freqs(torch.tensor([63, 64]))
    assert angles[0].equal(63 * short) and angles[1].equal(64 * long)
    assert spec.attention_scaling == scaling and spec.rotary_dim == 8  # partial rotary: half of head_dim 16

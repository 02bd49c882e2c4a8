"""The model's one map from (layer, HF projection) to the fused layer computing it."""

from __future__ import annotations

import pytest
import torch

from server.model.loader import load_model

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_the_model_maps_every_projection_to_its_fused_layer(tiny_model_dir):
    model = load_model(tiny_model_dir, torch.device("cpu"), torch.float32).model
    projections = model.projections
    spec = model.spec
    assert set(projections) == {(i, p) for i in range(spec.num_layers) for p in PROJECTIONS}
    assert projections.num_layers == spec.num_layers and len(projections.linears) == 4 * spec.num_layers
    attn, mlp = model.layers[1].self_attn, model.layers[1].mlp
    assert projections[(1, "k_proj")] is attn.qkv_proj and projections[(1, "up_proj")] is mlp.gate_up_proj
    assert projections.fused[(1, "gate_up_proj")] is mlp.gate_up_proj
    k = projections.base_weight(1, "k_proj")
    assert k.data_ptr() == attn.qkv_proj.weight[spec.q_size].data_ptr() and k.shape == (spec.kv_size, spec.hidden_size)
    assert projections.shapes()["down_proj"] == (spec.intermediate_size, spec.hidden_size)
    grouped = projections.group({(1, "q_proj"): "a", (1, "v_proj"): "b", (0, "down_proj"): "c"})
    assert grouped == {attn.qkv_proj: {"q_proj": "a", "v_proj": "b"}, model.layers[0].mlp.down_proj: {"down_proj": "c"}}
    with pytest.raises(ValueError, match="no projections"):
        projections.group({(spec.num_layers, "q_proj"): "a"})

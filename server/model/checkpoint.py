"""One decoder layer's tensors, taken out of a Hugging Face checkpoint's state dict by the family's names.

Checkpoints store q, k, v and gate, up as separate projections (Llama, Qwen, Gemma, Mistral) or already fused as
`qkv_proj` and `gate_up_proj` (Phi-3); either way the forward runs one GEMM each, and the `TargetLinear` records
which output columns each Hugging Face projection (the names adapters target) owns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.model.architecture import ModelSpec, UnsupportedModelError
from server.model.linear import TargetLinear


@dataclass
class LayerWeights:
    """A layer's projections (as adapter-targetable linears) and norm weights; None where the family has none."""

    qkv: TargetLinear
    o: TargetLinear
    gate_up: TargetLinear
    down: TargetLinear
    input_norm: torch.Tensor
    mlp_norm: torch.Tensor  # before the MLP
    attn_out_norm: torch.Tensor | None  # on the attention output (Gemma 2/3)
    mlp_out_norm: torch.Tensor | None  # on the MLP output (Gemma 2/3)
    q_norm: torch.Tensor | None  # per head (Qwen3, Gemma 3)
    k_norm: torch.Tensor | None


def layer_weights(spec: ModelSpec, w: dict[str, torch.Tensor], i: int) -> LayerWeights:
    """Pop layer `i`'s tensors from the state dict `w` (so the dict holds one copy of each at a time)."""
    p = f"model.layers.{i}."
    q, kv, inter = spec.q_size, spec.kv_size, spec.intermediate_size
    if "qkv_proj" in spec.family.modules.targets:  # stored fused: adapters target the fused names
        qkv_slices = {"qkv_proj": (0, q + 2 * kv)}
        gate_up_slices = {"gate_up_proj": (0, 2 * inter)}
    else:
        qkv_slices = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
        gate_up_slices = {"gate_proj": (0, inter), "up_proj": (inter, 2 * inter)}
    attn, mlp = f"{p}self_attn.", f"{p}mlp."
    sandwich, hidden = spec.family.sandwich_norms, spec.hidden_size
    return LayerWeights(
        qkv=_linear(w, attn, qkv_slices, spec.qkv_bias, hidden),
        o=_linear(w, attn, {"o_proj": (0, hidden)}, spec.o_bias, q),
        gate_up=_linear(w, mlp, gate_up_slices, spec.mlp_bias, hidden),
        down=_linear(w, mlp, {"down_proj": (0, hidden)}, spec.mlp_bias, inter),
        input_norm=w.pop(f"{p}input_layernorm.weight"),
        mlp_norm=w.pop(f"{p}pre_feedforward_layernorm.weight" if sandwich else f"{p}post_attention_layernorm.weight"),
        attn_out_norm=w.pop(f"{p}post_attention_layernorm.weight") if sandwich else None,
        mlp_out_norm=w.pop(f"{p}post_feedforward_layernorm.weight") if sandwich else None,
        q_norm=w.pop(f"{attn}q_norm.weight") if spec.family.qk_norm else None,
        k_norm=w.pop(f"{attn}k_norm.weight") if spec.family.qk_norm else None,
    )


def _linear(
    w: dict[str, torch.Tensor], prefix: str, slices: dict[str, tuple[int, int]], bias: bool, in_features: int
) -> TargetLinear:
    """One GEMM over the projections in `slices` (stored separately or as one tensor named like the only one)."""
    weights, biases = [], []
    for name, (start, end) in slices.items():
        weights.append(_take(w, f"{prefix}{name}.weight", (end - start, in_features)))
        if bias:
            biases.append(_take(w, f"{prefix}{name}.bias", (end - start,)))
    return TargetLinear(_cat(weights), slices, _cat(biases) if bias else None)


def _take(w: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    tensor = w.pop(name)
    if tuple(tensor.shape) != shape:
        raise UnsupportedModelError(
            f"tensor {name!r} has shape {list(tensor.shape)} where config.json implies {list(shape)}"
        )
    return tensor


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)

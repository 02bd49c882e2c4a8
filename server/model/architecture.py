"""The architecture table: which Hugging Face model families the forward serves, and each model's spec.

A family is data, not code: `Family` says what a model type changes in the decoder (norm style, q/k norms, extra
norms, embedding scale, module names), `ModelSpec` adds what the checkpoint's config sets (dimensions, activation,
biases, rotary scaling, soft-capping, sliding windows). The forward reads the spec and never the model type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from server.errors import ConfigurationError
from server.model import module_names
from server.model.module_names import ModuleNames
from server.model.rope import RopeSpec, rope_specs


class UnsupportedModelError(ConfigurationError):
    """The checkpoint's architecture or options are outside what the forward implements."""


@dataclass(frozen=True)
class Family:
    """What a model type changes in the decoder beyond what its config states."""

    modules: ModuleNames  # Hugging Face module names: what adapters target
    norm_offset: float = 0.0  # RMSNorm scales by (offset + w), in float32 where nonzero (Gemma stores w - 1)
    qk_norm: bool = False  # per-head RMSNorm of q and k before rotary (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # norms on the attention and MLP outputs too (Gemma 2 and 3)
    embed_scale: bool = False  # embeddings times √hidden, rounded to the dtype (Gemma)
    qkv_bias: bool | None = None  # q, k, v carry a bias and o does not (Qwen2); None: the config's attention_bias


_GEMMA = {"norm_offset": 1.0, "embed_scale": True}
FAMILIES: dict[str, Family] = {
    "llama": Family(module_names.LLAMA),
    "mistral": Family(module_names.LLAMA),
    "qwen2": Family(module_names.LLAMA, qkv_bias=True),
    "qwen3": Family(module_names.QK_NORMED, qk_norm=True),
    "gemma": Family(module_names.LLAMA, **_GEMMA),
    "gemma2": Family(module_names.GEMMA2, sandwich_norms=True, **_GEMMA),
    "gemma3_text": Family(module_names.GEMMA3, sandwich_norms=True, qk_norm=True, **_GEMMA),
    "phi3": Family(module_names.PHI3),
}
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # config name -> ours (see `layers.gated_act`)
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class ModelSpec:
    """Dimensions and per-family options of a decoder-only transformer, read from a transformers config."""

    model_type: str
    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    activation: str = "silu"  # of the gated MLP: "silu" or "gelu_tanh"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    attn_scale: float | None = None  # None: head_dim ** -0.5; Gemma: query_pre_attn_scalar ** -0.5
    attn_softcap: float | None = None  # scores -> cap · tanh(scores / cap) before the softmax (Gemma 2)
    final_softcap: float | None = None  # the same on the logits
    layer_windows: tuple[int | None, ...] = ()  # per layer: keys a query sees (itself included), None = all
    layer_rope: tuple[str, ...] = ()  # per layer: which of `rope` it rotates with
    rope: Mapping[str, RopeSpec] | None = None

    @classmethod
    def from_hf_config(cls, config) -> ModelSpec:
        family = FAMILIES.get(config.model_type)
        if family is None:
            raise UnsupportedModelError(
                f"model_type {config.model_type!r} is not supported; supported: {sorted(FAMILIES)}"
            )
        num_heads = config.num_attention_heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        layer_types = _layer_types(config)
        query_scalar = getattr(config, "query_pre_attn_scalar", None)
        return cls(
            model_type=config.model_type,
            family=family,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            eos_token_ids=_eos_ids(config.eos_token_id),
            activation=_activation(config),
            qkv_bias=attention_bias if family.qkv_bias is None else family.qkv_bias,
            o_bias=attention_bias and family.qkv_bias is None,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            attn_scale=float(query_scalar) ** -0.5 if query_scalar else None,
            attn_softcap=getattr(config, "attn_logit_softcapping", None),
            final_softcap=getattr(config, "final_logit_softcapping", None),
            layer_windows=tuple(config.sliding_window if t == SLIDING else None for t in layer_types),
            layer_rope=layer_types,
            rope=rope_specs(config, layer_types),
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def scale(self) -> float:
        """What attention scores q·k are multiplied by."""
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def unfused_reason(self) -> str | None:
        """Why the fused bf16 kernels cannot run this model (it runs torch ops), or None where they can."""
        reasons = []
        if self.family.norm_offset:
            reasons.append("RMSNorm scaled by (1 + w) in float32")
        if self.activation != "silu":
            reasons.append(f"{self.activation} MLP activation")
        if self.attn_softcap is not None:
            reasons.append("attention-logit soft-capping")
        if any(spec.rotary_dim != self.head_dim for spec in (self.rope or {}).values()):
            reasons.append("partial rotary embeddings")
        return ", ".join(reasons) or None

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.kv_size * torch.finfo(dtype).bits // 8


def _layer_types(config) -> tuple[str, ...]:
    """Each layer's attention type: the config's `layer_types`, else sliding everywhere where it sets a window."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types is None:
        types = [SLIDING if window else FULL] * config.num_hidden_layers
    if len(types) != config.num_hidden_layers or not set(types) <= {FULL, SLIDING}:
        raise UnsupportedModelError(f"layer_types {types!r}: one of {FULL!r}, {SLIDING!r} per layer is supported")
    if SLIDING in types and not (isinstance(window, int) and window > 0):
        raise UnsupportedModelError(f"sliding_window {window!r}: sliding layers need a positive window")
    return tuple(types)


def _activation(config) -> str:
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _eos_ids(eos) -> tuple[int, ...]:
    return tuple(eos) if isinstance(eos, list | tuple) else ((eos,) if eos is not None else ())

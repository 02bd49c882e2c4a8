"""Our compact Llama-family forward over packed batches and the paged KV cache (Llama, Mistral, Qwen2, SmolLM)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.model.architecture import ModelSpec
from server.model.attention import AttentionPlan, paged_attention, write_kv
from server.model.batch import ForwardBatch
from server.model.kv_cache import KVCache
from server.model.layers import RMSNorm, RotaryEmbedding, apply_rotary, silu_and_mul
from server.model.linear import TargetLinear, linear, prepack
from server.model.projections import ProjectionMap
from server.model.routing import LoraBatch


class Attention(nn.Module):
    """Grouped-query self-attention with fused q,k,v projection."""

    def __init__(self, spec: ModelSpec, qkv: TargetLinear, o_proj: TargetLinear, qkv_bias: torch.Tensor | None):
        super().__init__()
        self.spec = spec
        self.qkv_proj = qkv
        self.o_proj = o_proj
        self.qkv_bias = nn.Parameter(qkv_bias, requires_grad=False) if qkv_bias is not None else None

    def forward(self, x, cos, sin, plan: AttentionPlan, cache, lora: LoraBatch | None) -> torch.Tensor:
        s = self.spec
        qkv = self.qkv_proj(x, lora)  # [T, q_size + 2 * kv_size]
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        qk, v = qkv.split([s.q_size + s.kv_size, s.kv_size], dim=-1)
        # q and k heads rotate in one call: [T, heads + kv_heads, head_dim]
        qk = apply_rotary(qk.view(-1, s.num_heads + s.num_kv_heads, s.head_dim), cos, sin)
        q, k = qk.split([s.num_heads, s.num_kv_heads], dim=1)
        v = v.view(-1, s.num_kv_heads, s.head_dim)
        k_cache, v_cache = cache
        write_kv(k_cache, v_cache, plan, k, v)
        return self.o_proj(paged_attention(q, k, v, k_cache, v_cache, plan), lora)


class MLP(nn.Module):
    """SwiGLU feed-forward with fused gate/up projection."""

    def __init__(self, gate_up: TargetLinear, down: TargetLinear) -> None:
        super().__init__()
        self.gate_up_proj = gate_up
        self.down_proj = down

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x, lora)), lora)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, attn: Attention, mlp: MLP, input_norm: RMSNorm, post_norm: RMSNorm) -> None:
        super().__init__()
        self.self_attn = attn
        self.mlp = mlp
        self.input_layernorm = input_norm
        self.post_attention_layernorm = post_norm

    def forward(self, h, cos, sin, plan, cache, lora) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, plan, cache, lora)
        return h + self.mlp(self.post_attention_layernorm(h), lora)


class LlamaModel(nn.Module):
    """Embeddings, decoder stack, final norm and LM head; weights come from `server.model.loader`."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], device: torch.device) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Parameter(weights["model.embed_tokens.weight"], requires_grad=False)  # [V, hidden]
        self.layers = nn.ModuleList(_build_layer(spec, weights, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(weights["model.norm.weight"], spec.rms_norm_eps)
        lm_head = weights.get("lm_head.weight")
        self.lm_head = self.embed_tokens if spec.tie_word_embeddings or lm_head is None else nn.Parameter(lm_head)
        self.lm_head_packed = prepack(self.lm_head.data)
        self.rotary = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope_theta, device)
        self.projections = ProjectionMap(_fused_linears(self.layers))  # what adapters can target

    def forward(self, batch: ForwardBatch, kv_cache: KVCache, lora: LoraBatch | None = None) -> torch.Tensor:
        """Hidden states `[T, hidden]` after the final norm; K/V of every token are written to the cache."""
        plan = AttentionPlan.build(batch, kv_cache.block_size, self.spec)
        h = F.embedding(batch.input_ids, self.embed_tokens)  # [T, hidden]
        cos, sin = self.rotary.tables(batch.positions, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, plan, kv_cache.layer(i), lora)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [L, hidden] -> logits: [L, vocab] in float32
        return linear(hidden, self.lm_head, self.lm_head_packed).float()

    def enable_adapters(self, max_loras: int) -> None:
        """Give every adapter-targetable layer empty slot storage for `max_loras` adapters."""
        for target in self.projections.linears:
            target.enable_adapters(max_loras)


def _fused_linears(layers: nn.ModuleList) -> dict[tuple[int, str], TargetLinear]:
    """Every adapter-targetable layer, keyed by (layer index, fused module name)."""
    out = {}
    for i, layer in enumerate(layers):
        out[(i, "qkv_proj")] = layer.self_attn.qkv_proj
        out[(i, "o_proj")] = layer.self_attn.o_proj
        out[(i, "gate_up_proj")] = layer.mlp.gate_up_proj
        out[(i, "down_proj")] = layer.mlp.down_proj
    return out


def _build_layer(spec: ModelSpec, w: dict[str, torch.Tensor], i: int) -> DecoderLayer:
    p = f"model.layers.{i}."
    q, k, v = (w.pop(f"{p}self_attn.{n}_proj.weight") for n in "qkv")
    qkv = TargetLinear(
        torch.cat([q, k, v]),
        {"q_proj": (0, spec.q_size), "k_proj": (spec.q_size, spec.q_size + spec.kv_size),
         "v_proj": (spec.q_size + spec.kv_size, spec.q_size + 2 * spec.kv_size)},
    )  # fmt: skip
    qkv_bias = None
    if spec.qkv_bias:
        qkv_bias = torch.cat([w.pop(f"{p}self_attn.{n}_proj.bias") for n in "qkv"])
    o_proj = TargetLinear(w.pop(f"{p}self_attn.o_proj.weight"), {"o_proj": (0, spec.hidden_size)})
    gate, up = w.pop(f"{p}mlp.gate_proj.weight"), w.pop(f"{p}mlp.up_proj.weight")
    n = spec.intermediate_size
    gate_up = TargetLinear(torch.cat([gate, up]), {"gate_proj": (0, n), "up_proj": (n, 2 * n)})
    down = TargetLinear(w.pop(f"{p}mlp.down_proj.weight"), {"down_proj": (0, spec.hidden_size)})
    return DecoderLayer(
        Attention(spec, qkv, o_proj, qkv_bias),
        MLP(gate_up, down),
        RMSNorm(w.pop(f"{p}input_layernorm.weight"), spec.rms_norm_eps),
        RMSNorm(w.pop(f"{p}post_attention_layernorm.weight"), spec.rms_norm_eps),
    )

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

    def __init__(
        self, spec: ModelSpec, qkv: TargetLinear, o_proj: TargetLinear, qkv_bias: torch.Tensor | None, fused: bool
    ) -> None:
        super().__init__()
        self.spec = spec
        self.fused = fused
        self.qkv_proj = qkv
        self.o_proj = o_proj
        self.qkv_bias = nn.Parameter(qkv_bias, requires_grad=False) if qkv_bias is not None else None

    def forward(self, x, cos, sin, plan: AttentionPlan, cache, lora: LoraBatch | None) -> torch.Tensor:
        s = self.spec
        qkv = self.qkv_proj(x, lora)  # [T, q_size + 2 * kv_size]
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        k_cache, v_cache = cache
        if self.fused:  # rotates q and k in place in qkv and writes k, v to the cache, in one kernel
            torch.ops.loraplex.rope_and_cache(qkv, cos, sin, k_cache, v_cache, plan.slots, s.num_heads, s.num_kv_heads)
            heads = qkv.view(-1, s.num_heads + 2 * s.num_kv_heads, s.head_dim)
            q, k, v = heads.split([s.num_heads, s.num_kv_heads, s.num_kv_heads], dim=1)
        else:
            qk, v = qkv.split([s.q_size + s.kv_size, s.kv_size], dim=-1)
            # q and k heads rotate in one call: [T, heads + kv_heads, head_dim]
            qk = apply_rotary(qk.view(-1, s.num_heads + s.num_kv_heads, s.head_dim), cos, sin)
            q, k = qk.split([s.num_heads, s.num_kv_heads], dim=1)
            v = v.view(-1, s.num_kv_heads, s.head_dim)
            write_kv(k_cache, v_cache, plan, k, v)
        return self.o_proj(paged_attention(q, k, v, k_cache, v_cache, plan), lora)


class MLP(nn.Module):
    """SwiGLU feed-forward with fused gate/up projection."""

    def __init__(self, gate_up: TargetLinear, down: TargetLinear, fused: bool) -> None:
        super().__init__()
        self.gate_up_proj = gate_up
        self.down_proj = down
        self.fused = fused

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x, lora), self.fused), lora)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block. The residual add of each sub-block runs inside the next norm (as one kernel where
    fused), so a layer returns its MLP output and the residual stream separately."""

    def __init__(self, attn: Attention, mlp: MLP, input_norm: RMSNorm, post_norm: RMSNorm) -> None:
        super().__init__()
        self.self_attn = attn
        self.mlp = mlp
        self.input_layernorm = input_norm
        self.post_attention_layernorm = post_norm

    def forward(self, h, residual, cos, sin, plan, cache, lora) -> tuple[torch.Tensor, torch.Tensor]:
        # h: the previous layer's MLP output, or the embeddings (then residual is None); residual is added to in place
        if residual is None:
            residual, x = h, self.input_layernorm(h)
        else:
            x = self.input_layernorm(h, residual)
        x = self.post_attention_layernorm(self.self_attn(x, cos, sin, plan, cache, lora), residual)
        return self.mlp(x, lora), residual


class LlamaModel(nn.Module):
    """Embeddings, decoder stack, final norm and LM head; weights come from `server.model.loader`."""

    def __init__(
        self, spec: ModelSpec, weights: dict[str, torch.Tensor], device: torch.device, fused: bool = False
    ) -> None:
        super().__init__()
        self.spec = spec
        self.fused = fused  # runs the fused bf16 kernels of `server.model.kernels`
        self.embed_tokens = nn.Parameter(weights["model.embed_tokens.weight"], requires_grad=False)  # [V, hidden]
        self.layers = nn.ModuleList(_build_layer(spec, weights, i, fused) for i in range(spec.num_layers))
        self.norm = RMSNorm(weights["model.norm.weight"], spec.rms_norm_eps, fused)
        lm_head = weights.get("lm_head.weight")
        self.lm_head = self.embed_tokens if spec.tie_word_embeddings or lm_head is None else nn.Parameter(lm_head)
        self.lm_head_packed = prepack(self.lm_head.data)
        self.rotary = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope_theta, device)
        self.projections = ProjectionMap(_fused_linears(self.layers))  # what adapters can target

    def forward(self, batch: ForwardBatch, kv_cache: KVCache, lora: LoraBatch | None = None) -> torch.Tensor:
        """Hidden states `[T, hidden]` after the final norm; K/V of every token are written to the cache."""
        plan = AttentionPlan.build(batch, kv_cache.block_size, self.spec, self.fused)
        h = F.embedding(batch.input_ids, self.embed_tokens)  # [T, hidden]
        cos, sin = self.rotary.tables(batch.positions, h.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, cos, sin, plan, kv_cache.layer(i), lora)
        return self.norm(h, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [L, hidden] -> logits: [L, vocab] in float32
        return linear(hidden, self.lm_head, self.lm_head_packed).float()

    def enable_adapters(self, max_loras: int) -> None:
        """Give every adapter-targetable layer empty slot storage for `max_loras` adapters."""
        for target in self.projections.linears:
            target.enable_adapters(max_loras, self.fused)


def _fused_linears(layers: nn.ModuleList) -> dict[tuple[int, str], TargetLinear]:
    """Every adapter-targetable layer, keyed by (layer index, fused module name)."""
    out = {}
    for i, layer in enumerate(layers):
        out[(i, "qkv_proj")] = layer.self_attn.qkv_proj
        out[(i, "o_proj")] = layer.self_attn.o_proj
        out[(i, "gate_up_proj")] = layer.mlp.gate_up_proj
        out[(i, "down_proj")] = layer.mlp.down_proj
    return out


def _build_layer(spec: ModelSpec, w: dict[str, torch.Tensor], i: int, fused: bool) -> DecoderLayer:
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
        Attention(spec, qkv, o_proj, qkv_bias, fused),
        MLP(gate_up, down, fused),
        RMSNorm(w.pop(f"{p}input_layernorm.weight"), spec.rms_norm_eps, fused),
        RMSNorm(w.pop(f"{p}post_attention_layernorm.weight"), spec.rms_norm_eps, fused),
    )

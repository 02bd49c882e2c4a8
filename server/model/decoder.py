"""Our compact decoder forward over packed batches and the paged KV cache, for every family of the architecture table.

Llama, Mistral, Qwen2/3, Gemma 1-3 and Phi-3 differ only in what `ModelSpec` states (norm style, activation, q/k
norms, extra norms, biases, rotary tables, soft-capping, sliding windows) and in their checkpoints' tensor names
(`server.model.checkpoint`); this module reads the spec, never the model type.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.model.architecture import ModelSpec
from server.model.attention import AttentionOptions, AttentionPlan, paged_attention, write_kv
from server.model.batch import ForwardBatch
from server.model.checkpoint import LayerWeights, layer_weights
from server.model.kv_cache import KVCache
from server.model.layers import RMSNorm, apply_rotary, gated_act
from server.model.linear import TargetLinear, linear, prepack
from server.model.projections import ProjectionMap
from server.model.rope import RotaryEmbedding
from server.model.routing import LoraBatch


class Attention(nn.Module):
    """Grouped-query self-attention with fused q,k,v projection, optional q/k norms and per-layer options."""

    def __init__(self, spec: ModelSpec, w: LayerWeights, layer: int, fused: bool) -> None:
        super().__init__()
        self.spec = spec
        self.fused = fused
        self.qkv_proj, self.o_proj = w.qkv, w.o
        offset = spec.family.norm_offset
        self.q_norm = RMSNorm(w.q_norm, spec.rms_norm_eps, offset=offset) if w.q_norm is not None else None
        self.k_norm = RMSNorm(w.k_norm, spec.rms_norm_eps, offset=offset) if w.k_norm is not None else None
        self.rope = spec.layer_rope[layer]
        self.options = AttentionOptions(spec.attn_scale, spec.layer_windows[layer], spec.attn_softcap)

    def forward(self, x, rotary, plan: AttentionPlan, cache, lora: LoraBatch | None) -> torch.Tensor:
        s = self.spec
        qkv = self.qkv_proj(x, lora)  # [T, q_size + 2 * kv_size]
        heads = qkv.view(-1, s.num_heads + 2 * s.num_kv_heads, s.head_dim)
        if self.q_norm is not None:  # per head, before rotary, in place so the fused kernel below sees it
            q_heads, k_heads = slice(0, s.num_heads), slice(s.num_heads, s.num_heads + s.num_kv_heads)
            heads[:, q_heads] = self.q_norm(heads[:, q_heads])
            heads[:, k_heads] = self.k_norm(heads[:, k_heads])
        cos, sin = rotary[self.rope]
        k_cache, v_cache = cache
        if self.fused:  # rotates q and k in place in qkv and writes k, v to the cache, in one kernel
            torch.ops.loraplex.rope_and_cache(qkv, cos, sin, k_cache, v_cache, plan.slots, s.num_heads, s.num_kv_heads)
            q, k, v = heads.split([s.num_heads, s.num_kv_heads, s.num_kv_heads], dim=1)
        else:
            qk, v = heads.split([s.num_heads + s.num_kv_heads, s.num_kv_heads], dim=1)
            qk = apply_rotary(qk, cos, sin)  # q and k heads rotate in one call: [T, heads + kv_heads, head_dim]
            q, k = qk.split([s.num_heads, s.num_kv_heads], dim=1)
            write_kv(k_cache, v_cache, plan, k, v)
        return self.o_proj(paged_attention(q, k, v, k_cache, v_cache, plan, self.options), lora)


class MLP(nn.Module):
    """Gated feed-forward (SwiGLU, or GeGLU with tanh GELU) with fused gate/up projection."""

    def __init__(self, gate_up: TargetLinear, down: TargetLinear, activation: str, fused: bool) -> None:
        super().__init__()
        self.gate_up_proj = gate_up
        self.down_proj = down
        self.activation = activation
        self.fused = fused

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        return self.down_proj(gated_act(self.gate_up_proj(x, lora), self.activation, self.fused), lora)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block. The residual add of each sub-block runs inside the next norm (as one kernel where
    fused), so a layer returns its MLP output and the residual stream separately. Gemma 2/3 also norm each
    sub-block's output before it joins the residual (`attn_out_norm`, `mlp_out_norm`)."""

    def __init__(self, spec: ModelSpec, w: LayerWeights, layer: int, fused: bool) -> None:
        super().__init__()
        eps, offset = spec.rms_norm_eps, spec.family.norm_offset
        self.self_attn = Attention(spec, w, layer, fused)
        self.mlp = MLP(w.gate_up, w.down, spec.activation, fused)
        self.input_layernorm = RMSNorm(w.input_norm, eps, fused, offset)
        self.mlp_norm = RMSNorm(w.mlp_norm, eps, fused, offset)
        self.attn_out_norm = RMSNorm(w.attn_out_norm, eps, offset=offset) if w.attn_out_norm is not None else None
        self.mlp_out_norm = RMSNorm(w.mlp_out_norm, eps, offset=offset) if w.mlp_out_norm is not None else None

    def forward(self, h, residual, rotary, plan, cache, lora) -> tuple[torch.Tensor, torch.Tensor]:
        # h: the previous layer's MLP output, or the embeddings (then residual is None); residual is added to in place
        if residual is None:
            residual, x = h, self.input_layernorm(h)
        else:
            x = self.input_layernorm(h, residual)
        a = self.self_attn(x, rotary, plan, cache, lora)
        if self.attn_out_norm is not None:
            a = self.attn_out_norm(a)
        m = self.mlp(self.mlp_norm(a, residual), lora)
        if self.mlp_out_norm is not None:
            m = self.mlp_out_norm(m)
        return m, residual


class DecoderModel(nn.Module):
    """Embeddings, decoder stack, final norm and LM head; weights come from `server.model.loader`."""

    def __init__(
        self, spec: ModelSpec, weights: dict[str, torch.Tensor], device: torch.device, fused: bool = False
    ) -> None:
        super().__init__()
        self.spec = spec
        self.fused = fused  # runs the fused bf16 kernels of `server.model.kernels`
        self.embed_tokens = nn.Parameter(weights["model.embed_tokens.weight"], requires_grad=False)  # [V, hidden]
        # Gemma scales embeddings by √hidden rounded to the dtype first, as transformers does
        self.embed_scale = spec.hidden_size**0.5 if spec.family.embed_scale else None
        self.layers = nn.ModuleList(
            DecoderLayer(spec, layer_weights(spec, weights, i), i, fused) for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(weights["model.norm.weight"], spec.rms_norm_eps, fused, spec.family.norm_offset)
        lm_head = weights.get("lm_head.weight")
        self.lm_head = self.embed_tokens if spec.tie_word_embeddings or lm_head is None else nn.Parameter(lm_head)
        self.lm_head_packed = prepack(self.lm_head.data)
        self.rotary = RotaryEmbedding(spec.rope, device)
        self.projections = ProjectionMap(_fused_linears(self.layers))  # what adapters can target

    def forward(self, batch: ForwardBatch, kv_cache: KVCache, lora: LoraBatch | None = None) -> torch.Tensor:
        """Hidden states `[T, hidden]` after the final norm; K/V of every token are written to the cache."""
        plan = AttentionPlan.build(batch, kv_cache.block_size, self.spec, self.fused)
        h = F.embedding(batch.input_ids, self.embed_tokens)  # [T, hidden]
        if self.embed_scale is not None:
            h = h * torch.tensor(self.embed_scale, dtype=h.dtype)
        rotary = self.rotary.tables(batch.positions, h.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, rotary, plan, kv_cache.layer(i), lora)
        return self.norm(h, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [L, hidden] -> logits: [L, vocab] in float32
        logits = linear(hidden, self.lm_head, self.lm_head_packed).float()
        cap = self.spec.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

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

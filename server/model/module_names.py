"""A family's Hugging Face module names: what PEFT adapters can target and what they must not.

PEFT matches `target_modules`, patterns and saved tensor names against the module names of the model it wrapped
(`model.layers.3.self_attn.k_proj`); a family's names are data here, declared once, and read by the adapter
config parser, the regex vetting and the weight loader.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModuleNames:
    """The adapter-targetable projections of one decoder layer (name -> parent module) and its other modules."""

    projections: tuple[tuple[str, str], ...]  # (projection, parent) in model order, e.g. ("q_proj", "self_attn")
    layer_modules: tuple[str, ...]  # every other module of a layer, relative to it (norms, activations, ...)

    @property
    def targets(self) -> tuple[str, ...]:
        """Projection names in model order, e.g. ("q_proj", ..., "down_proj")."""
        return tuple(name for name, _ in self.projections)

    def projection(self, layer: int, name: str) -> str:
        """Full module name of a projection, e.g. `model.layers.3.self_attn.k_proj`."""
        return f"model.layers.{layer}.{dict(self.projections)[name]}.{name}"

    def all_projections(self, num_layers: int) -> list[str]:
        return [self.projection(i, name) for i in range(num_layers) for name in self.targets]

    def others(self, num_layers: int) -> list[str]:
        """Every module name that is not a projection (embeddings, norms, LM head, containers, ...)."""
        names = ["", "model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head"]
        for i in range(num_layers):
            names += [f"model.layers.{i}", *(f"model.layers.{i}.{m}" for m in self.layer_modules)]
        return names


_ATTENTION = (("q_proj", "self_attn"), ("k_proj", "self_attn"), ("v_proj", "self_attn"), ("o_proj", "self_attn"))
_MLP = (("gate_proj", "mlp"), ("up_proj", "mlp"), ("down_proj", "mlp"))
_NORMS = ("input_layernorm", "post_attention_layernorm")
_CONTAINERS = ("self_attn", "mlp", "mlp.act_fn", *_NORMS)

LLAMA = ModuleNames(_ATTENTION + _MLP, _CONTAINERS)
QK_NORMED = ModuleNames(_ATTENTION + _MLP, (*_CONTAINERS, "self_attn.q_norm", "self_attn.k_norm"))
GEMMA2 = ModuleNames(_ATTENTION + _MLP, (*_CONTAINERS, "pre_feedforward_layernorm", "post_feedforward_layernorm"))
GEMMA3 = ModuleNames(_ATTENTION + _MLP, (*GEMMA2.layer_modules, "self_attn.q_norm", "self_attn.k_norm"))
# Phi-3 stores q, k, v as one `qkv_proj` and gate, up as one `gate_up_proj`; adapters trained on it target those.
PHI3 = ModuleNames(
    (("qkv_proj", "self_attn"), ("o_proj", "self_attn"), ("gate_up_proj", "mlp"), ("down_proj", "mlp")),
    ("self_attn", "mlp", "mlp.activation_fn", *_NORMS, "resid_attn_dropout", "resid_mlp_dropout"),
)

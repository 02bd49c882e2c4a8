"""Rotary position embeddings of every scaling type transformers implements, as per-position cos/sin tables.

The inverse frequencies come from transformers' own `ROPE_INIT_FUNCTIONS` (default, linear, llama3, yarn, dynamic,
longrope), so each family rotates exactly as transformers does. Two types change with the sequence length, which
transformers decides per forward from the longest position in the batch; a server batching many sequences decides
per position instead, so a cached key never depends on what else was batched with it:
- `dynamic` (NTK): position p rotates with the frequencies transformers computes for a sequence of p + 1 tokens;
  below `max_position_embeddings` those are the unscaled ones, as in transformers;
- `longrope`: positions below `original_max_position_embeddings` use the short factors, the rest the long ones.
Within the original context both equal transformers' output token for token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from server.errors import ConfigurationError

GROW = 4096  # tables grow in steps of this many positions, on demand


@dataclass(frozen=True, eq=False)
class RopeSpec:
    """One rotary embedding: frequencies by position range and the factor cos and sin are scaled by."""

    rope_type: str
    inv_freq: torch.Tensor  # [rotary_dim / 2] float32, positions below `long_from`
    attention_scaling: float  # cos and sin are multiplied by it (yarn, longrope)
    long_from: int | None = None  # first position that uses `long_inv_freq` (longrope)
    long_inv_freq: torch.Tensor | None = None
    ntk: tuple[float, float, int] | None = None  # dynamic: (base, factor, max_position_embeddings)

    @classmethod
    def plain(cls, rotary_dim: int, theta: float) -> RopeSpec:
        """Unscaled rotary embedding (transformers' "default" type)."""
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        return cls("default", 1.0 / (theta**exponents), 1.0)

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def freqs(self, positions: torch.Tensor) -> torch.Tensor:
        """Rotation angles: positions [P] -> [P, rotary_dim / 2], as transformers' `inv_freq @ position_ids`."""
        pos = positions.float()[:, None]
        angles = pos * self.inv_freq[None, :]
        if self.long_from is not None:
            angles = torch.where(pos >= self.long_from, pos * self.long_inv_freq[None, :], angles)
        if self.ntk is not None:
            angles = torch.where(pos >= self.ntk[2], pos * self._ntk_inv_freq(positions), angles)
        return angles

    def _ntk_inv_freq(self, positions: torch.Tensor) -> torch.Tensor:
        # transformers' `_compute_dynamic_ntk_parameters` for seq_len = p + 1, one row per position
        base, factor, max_len = self.ntk
        dim = self.rotary_dim
        seq_len = (positions.double() + 1).clamp(min=max_len)[:, None]
        scaled = base * ((factor * seq_len / max_len) - (factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return (1.0 / (scaled.float() ** exponents[None, :])).to(self.inv_freq.device)


def rope_specs(config, layer_types: tuple[str, ...]) -> dict[str, RopeSpec]:
    """Each rotary embedding the model uses, keyed by layer type (Gemma 3 has one per type, others one for all)."""
    params = config.rope_parameters or {}
    if "rope_type" in params or not params:  # one embedding for every type: one spec, so its tables are made once
        return dict.fromkeys(set(layer_types), _spec(config, None))
    return {kind: _spec(config, kind) for kind in set(layer_types)}


def _spec(config, layer_type: str | None) -> RopeSpec:
    params = config.rope_parameters if layer_type is None else config.rope_parameters[layer_type]
    rope_type = params.get("rope_type", "default")
    init = ROPE_INIT_FUNCTIONS.get(rope_type) if rope_type != "default" else _default_init
    if init is None:
        raise ConfigurationError(f"rope_type {rope_type!r} is not supported; supported: {sorted(ROPE_INIT_FUNCTIONS)}")
    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    inv_freq, scaling = init(config, torch.device("cpu"), **kwargs)
    spec = RopeSpec(rope_type, inv_freq.float(), float(scaling))
    if rope_type == "longrope":
        original = params["original_max_position_embeddings"]
        long_inv, _ = init(config, torch.device("cpu"), seq_len=original + 1, **kwargs)
        spec = RopeSpec(rope_type, spec.inv_freq, spec.attention_scaling, original, long_inv.float())
    elif rope_type == "dynamic":
        ntk = (float(params["rope_theta"]), float(params["factor"]), int(config.max_position_embeddings))
        spec = RopeSpec(rope_type, spec.inv_freq, spec.attention_scaling, ntk=ntk)
    return spec


def _default_init(config, device: torch.device, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """transformers' default rotary frequencies (each model class defines its own copy of this function)."""
    params = config.rope_parameters if layer_type is None else config.rope_parameters[layer_type]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    return RopeSpec.plain(dim, params["rope_theta"]).inv_freq.to(device), 1.0


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary embedding: cos/sin tables per position, grown on demand, for each `RopeSpec`."""

    def __init__(self, specs: Mapping[str, RopeSpec], device: torch.device | None = None) -> None:
        super().__init__()
        self.specs = dict(specs)  # kind -> spec; kinds that share one spec object share its tables
        self.device = device
        self._cos: dict[int, torch.Tensor] = {}  # id(spec) -> [length, rotary_dim]
        self._sin: dict[int, torch.Tensor] = {}
        self._grow(GROW)

    def _grow(self, length: int) -> None:
        positions = torch.arange(length)
        for spec in {id(spec): spec for spec in self.specs.values()}.values():
            angles = spec.freqs(positions)
            emb = torch.cat((angles, angles), dim=-1)  # [length, rotary_dim]
            self._cos[id(spec)] = (emb.cos() * spec.attention_scaling).to(self.device)
            self._sin[id(spec)] = (emb.sin() * spec.attention_scaling).to(self.device)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """kind -> (cos, sin), each [T, 1, rotary_dim] in `dtype`, for positions [T]; shared by the layers of a step."""
        needed = int(positions.max()) + 1 if positions.numel() else 0
        length = next(iter(self._cos.values())).shape[0]
        if needed > length:
            self._grow(-(-needed // GROW) * GROW)
        rows = {
            key: (self._cos[key][positions].unsqueeze(1).to(dtype), self._sin[key][positions].unsqueeze(1).to(dtype))
            for key in self._cos
        }
        return {kind: rows[id(spec)] for kind, spec in self.specs.items()}

"""The model's map from (layer, Hugging Face projection) to the fused layer computing it, declared once by the model.

Adapters name projections as PEFT does (`k_proj` of layer 3); the model fuses some of them into one GEMM (q, k, v
into `qkv_proj`, gate and up into `gate_up_proj`). Loading adapters into slots, describing the model to the adapter
loader and merging all go through this one map.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import TypeVar

import torch

from server.model.linear import TargetLinear

T = TypeVar("T")
Key = tuple[int, str]  # (layer index, HF projection name), e.g. (3, "k_proj")


class ProjectionMap(Mapping[Key, TargetLinear]):
    """(layer, HF projection) -> the `TargetLinear` holding it, e.g. (3, "k_proj") -> layer 3's `qkv_proj`."""

    def __init__(self, fused: Mapping[tuple[int, str], TargetLinear]) -> None:
        self.fused = MappingProxyType(dict(fused))  # (layer, fused module name) -> layer, in model order
        self._targets = {(layer, proj): linear for (layer, _), linear in self.fused.items() for proj in linear.slices}

    def __getitem__(self, key: Key) -> TargetLinear:
        return self._targets[key]

    def __iter__(self) -> Iterator[Key]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    @property
    def linears(self) -> tuple[TargetLinear, ...]:
        """Every adapter-aware layer, once each, in model order."""
        return tuple(self.fused.values())

    @property
    def num_layers(self) -> int:
        return 1 + max(layer for layer, _ in self._targets)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """HF projection name -> (in_features, out_features)."""
        shapes = {}
        for (_, proj), linear in self._targets.items():
            start, end = linear.slices[proj]
            shapes[proj] = (linear.in_features, end - start)
        return shapes

    def base_weight(self, layer: int, proj: str) -> torch.Tensor:
        """The frozen base weight of one projection, [out, in], a view of its fused layer's rows."""
        linear = self._targets[(layer, proj)]
        start, end = linear.slices[proj]
        return linear.weight[start:end]

    def group(self, updates: Mapping[Key, T]) -> dict[TargetLinear, dict[str, T]]:
        """(layer, projection) -> value, regrouped per fused layer: layer -> {projection -> value}.

        `ValueError` names the keys the model does not have.
        """
        unknown = set(updates) - set(self._targets)
        if unknown:
            raise ValueError(f"the model has no projections {sorted(unknown)}")
        grouped: dict[TargetLinear, dict[str, T]] = {}
        for (layer, proj), value in updates.items():
            grouped.setdefault(self._targets[(layer, proj)], {})[proj] = value
        return grouped

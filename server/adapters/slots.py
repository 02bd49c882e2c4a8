"""Device slots across a whole model: give every adapter-aware layer its slot storage, put an adapter in a slot.

The registry calls these with the updates `server.adapters.weights.validate_adapter_dir` produced; a slot then serves
every token whose `LoraBatch` slot index names it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import nn

from server.model.linear import TargetLinear
from server.model.lora import LoraSlots, LoraWeights


def attach_lora_slots(model: nn.Module, max_loras: int) -> None:
    """Give every `TargetLinear` of `model` empty slot storage for `max_loras` adapters."""
    for module in model.modules():
        if isinstance(module, TargetLinear):
            module.lora = LoraSlots(module, max_loras)


def lora_targets(model: nn.Module) -> dict[tuple[int, str], TargetLinear]:
    """Every adapter-targetable projection, keyed (layer index, HF projection name), e.g. (3, "k_proj") -> qkv_proj."""
    targets = {}
    for name, module in model.named_modules():
        if isinstance(module, TargetLinear):
            match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
            if match is None:
                raise ValueError(f"cannot tell the layer index of {name!r}")
            targets.update({(int(match.group(1)), proj): module for proj in module.slices})
    return targets


def load_adapter_slot(model: nn.Module, slot: int, weights: Mapping[tuple[int, str], LoraWeights]) -> None:
    """Put one adapter into `slot` of every layer: (layer, projection) -> update; untargeted projections are cleared."""
    targets = lora_targets(model)
    unknown = set(weights) - set(targets)
    if unknown:
        raise ValueError(f"the model has no projections {sorted(unknown)}")
    per_linear: dict[TargetLinear, dict[str, LoraWeights]] = {linear: {} for linear in targets.values()}
    for (layer, proj), linear in targets.items():
        if (layer, proj) in weights:
            per_linear[linear][proj] = weights[(layer, proj)]
    for linear, pieces in per_linear.items():  # check everything first, so a bad update leaves the slot as it was
        if linear.lora is None:
            raise ValueError("call attach_lora_slots before loading adapters")
        linear.lora.check_slot(slot, pieces)
    for linear, pieces in per_linear.items():
        linear.lora.load_slot(slot, pieces)


def clear_adapter_slot(model: nn.Module, slot: int) -> None:
    """Remove whatever adapter `slot` holds from every layer."""
    load_adapter_slot(model, slot, {})

"""Device slots across a whole model: give every adapter-aware layer its slot storage, put an adapter in a slot.

The registry calls these with the updates `server.adapters.weights.validate_adapter_dir` produced; a slot then serves
every token whose `LoraBatch` slot index names it. Layers are found through the model's one `ProjectionMap`.
"""

from __future__ import annotations

from collections.abc import Mapping

from server.model.decoder import DecoderModel
from server.model.lora_weights import LoraWeights


def attach_lora_slots(model: DecoderModel, max_loras: int) -> None:
    """Give every adapter-aware layer of `model` empty slot storage for `max_loras` adapters."""
    model.enable_adapters(max_loras)


def load_adapter_slot(model: DecoderModel, slot: int, weights: Mapping[tuple[int, str], LoraWeights]) -> None:
    """Put one adapter into `slot` of every layer: (layer, projection) -> update; untargeted projections are cleared."""
    projections = model.projections
    per_linear = {linear: {} for linear in projections.linears} | projections.group(weights)
    for linear, pieces in per_linear.items():  # check everything first, so a bad update leaves the slot as it was
        if linear.lora is None:
            raise ValueError("call attach_lora_slots before loading adapters")
        linear.lora.check_slot(slot, pieces)
    for linear, pieces in per_linear.items():
        linear.lora.write_slot(slot, pieces)


def clear_adapter_slot(model: DecoderModel, slot: int) -> None:
    """Remove whatever adapter `slot` holds from every layer."""
    load_adapter_slot(model, slot, {})

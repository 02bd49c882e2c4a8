"""The draft model's own adapters: `--draft-adapters-store`, read once at start, every one resident in a device slot.

A request's adapter applies to the target only, unless the draft store holds an adapter of the same name: then the
draft proposes with it, which brings its proposals closer to what the adapted target samples. The set is small and
fixed (one slot per adapter, no eviction, no versions): a draft adapter added or changed later takes a restart.
"""

from __future__ import annotations

from pathlib import Path

from server.adapters.slots import attach_lora_slots, load_adapter_slot
from server.adapters.store import AdapterStore
from server.adapters.versions import adapter_name
from server.adapters.weights import ModelInfo, validate_adapter_dir
from server.errors import AdapterError, ConfigurationError
from server.model.decoder import DecoderModel
from server.model.routing import BASE_SLOT

_PARAM = "draft_adapters_store"


class DraftAdapters:
    """Which device slot of the draft model serves each adapter name; the base model for every other name."""

    def __init__(self, slots: dict[str, int]) -> None:
        self.slots = slots  # adapter name -> slot of the draft model

    @classmethod
    def load(cls, root: Path | None, model: DecoderModel, max_lora_rank: int) -> DraftAdapters:
        """Every adapter of the store at `root` (none for None) in a slot of `model`; a ConfigurationError naming the
        adapter that does not fit the draft."""
        if root is None:
            return cls({})
        if not Path(root).is_dir():
            raise ConfigurationError(f"--draft-adapters-store {str(root)!r} is not a folder", param=_PARAM)
        store = AdapterStore(root)
        names = store.names()
        if not names:
            return cls({})
        attach_lora_slots(model, len(names))
        info = ModelInfo.from_model(model)
        for slot, name in enumerate(names):
            try:
                weights = validate_adapter_dir(store.path(name), info, max_lora_rank)
            except AdapterError as exc:
                raise ConfigurationError(
                    f"draft adapter {name!r} does not fit the draft model: {exc.message}", param=_PARAM
                ) from None
            load_adapter_slot(model, slot, weights.updates)
        return cls({name: slot for slot, name in enumerate(names)})

    def slot_of(self, adapter: str | None) -> int:
        """The draft's slot for a request's adapter key (`name@version`, or None for the base model)."""
        if adapter is None:
            return BASE_SLOT
        return self.slots.get(adapter_name(adapter), BASE_SLOT)

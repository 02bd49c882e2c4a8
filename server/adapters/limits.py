"""The bounds the adapter registry works within, from the server's settings."""

from __future__ import annotations

from dataclasses import dataclass

from server.settings import Settings


@dataclass(frozen=True)
class AdapterLimits:
    """How many adapters each tier holds, and what an upload may be."""

    max_loras: int  # device slots
    max_cpu_loras: int  # host-memory entries (at least max_loras)
    max_cpu_lora_bytes: int  # host-memory bytes of idle entries
    max_lora_rank: int
    max_adapter_bytes: int  # an uploaded weights file
    max_concurrent_uploads: int

    @classmethod
    def from_settings(cls, settings: Settings) -> AdapterLimits:
        return cls(
            max_loras=settings.max_loras,
            max_cpu_loras=settings.max_cpu_loras,
            max_cpu_lora_bytes=settings.max_cpu_lora_bytes,
            max_lora_rank=settings.max_lora_rank,
            max_adapter_bytes=settings.max_adapter_bytes,
            max_concurrent_uploads=settings.max_concurrent_uploads,
        )

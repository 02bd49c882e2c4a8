"""Which implementation each op of the forward runs, per device and dtype: the one place kernels are picked.

- CPU, bfloat16: the fused C++ kernels (`server.model.kernels`) where they build, else torch ops.
- CUDA: the Triton kernels (`server.model.triton`) for mixed-adapter LoRA and paged decode attention, where Triton
  imports; norms, rotary and GEMMs are torch ops (cuBLAS), prefill attention is SDPA (flash).
- Anything else, and float32 on CPU (the exact mode): torch ops, the reference every other path is tested against.
"""

from __future__ import annotations

import enum
import functools
import logging
from dataclasses import dataclass

import torch

from server.model.kernels import use_fused_kernels

log = logging.getLogger(__name__)


class Impl(enum.Enum):
    """An implementation of an op."""

    TORCH = "torch ops"
    FUSED_CPU = "fused C++ kernels"
    TRITON = "Triton kernels"


@dataclass(frozen=True)
class Kernels:
    """The forward's choice for one model: `layers` (norms, rotary, activation, cache writes), `lora`, `decode`."""

    layers: Impl
    lora: Impl
    decode: Impl

    @property
    def fused_cpu(self) -> bool:
        return self.layers is Impl.FUSED_CPU


def pick_kernels(
    dtype: torch.dtype, device: torch.device, fused: bool = True, unfused_reason: str | None = None
) -> Kernels:
    """The kernels a model in `dtype` on `device` runs; `fused` and `unfused_reason` as in `use_fused_kernels`."""
    if use_fused_kernels(dtype, device, fused, unfused_reason):
        return Kernels(Impl.FUSED_CPU, Impl.FUSED_CPU, Impl.FUSED_CPU)
    gpu = Impl.TRITON if triton_kernels(device) else Impl.TORCH
    if device.type == "cuda":
        log.info("CUDA forward: adapters and decode attention run %s", gpu.value)
    return Kernels(Impl.TORCH, gpu, gpu)


def triton_kernels(device: torch.device) -> bool:
    """Whether tensors on `device` go through the Triton kernels (CUDA, with Triton importable)."""
    return device.type == "cuda" and _triton_missing() is None


@functools.cache
def _triton_missing() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        log.warning("Triton is not importable, the CUDA forward runs torch ops (slower): %s", exc)
        return str(exc)
    return None

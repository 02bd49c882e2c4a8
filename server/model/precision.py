"""The serving dtype `--dtype auto` picks: bfloat16 where the hardware computes it natively, float32 elsewhere.

bf16 halves the bytes every GEMM and the KV cache read, which is most of a CPU decode step, but only pays where
the CPU has bf16 dot products (avx512_bf16 or AMX); elsewhere oneDNN emulates bf16 through float32 and is slower
than float32 itself. `--dtype float32` is the exact mode, the one the fidelity tests against transformers and PEFT
run in.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of the bf16 dot-product instructions
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class DtypeChoice:
    """The serving dtype and, for the log line at start, why it was chosen."""

    dtype: torch.dtype
    reason: str


def cpuinfo_flags(path: Path = CPUINFO) -> frozenset[str]:
    """The CPU feature flags Linux reports (empty where there is no /proc/cpuinfo, e.g. macOS or Windows)."""
    try:
        text = path.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":  # every core lists the same flags; the first is enough
            return frozenset(value.split())
    return frozenset()


def torch_native_bf16() -> list[str]:
    """The bf16 features torch's own CPU probe (cpuinfo) reports; its private probes may vanish in a later torch."""
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
    found = []
    for name, probe in probes.items():
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            found.append(name)
    return found


def native_cpu_bf16(flags: frozenset[str] | None = None) -> list[str]:
    """The features that make this CPU compute bf16 natively: torch's probe, or Linux's flags on x86."""
    found = torch_native_bf16()
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags = cpuinfo_flags() if flags is None else flags
        found += [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
    return sorted(set(found))


def choose_dtype(requested: str, device: torch.device, cpu_features: list[str] | None = None) -> DtypeChoice:
    """`--dtype` resolved: an explicit dtype as given; `auto` is bf16 on CUDA and on native-bf16 CPUs, else fp32."""
    if requested != "auto":
        return DtypeChoice(getattr(torch, requested), f"--dtype {requested}")
    if device.type == "cuda":
        return DtypeChoice(torch.bfloat16, "auto: CUDA computes bfloat16 natively")
    features = native_cpu_bf16() if cpu_features is None else cpu_features
    if device.type == "cpu" and features:
        return DtypeChoice(torch.bfloat16, f"auto: the CPU computes bfloat16 natively ({', '.join(features)})")
    return DtypeChoice(torch.float32, "auto: no native bfloat16 on this CPU (no avx512_bf16 or AMX)")


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The serving dtype for `--dtype requested` on `device`, logged with the reason."""
    choice = choose_dtype(requested, device)
    log.info("serving dtype %s (%s)", str(choice.dtype).removeprefix("torch."), choice.reason)
    return choice.dtype

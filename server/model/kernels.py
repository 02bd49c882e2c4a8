"""Fused C++ kernels for the bfloat16 CPU forward (`csrc/fused_cpu.cpp`): which forward runs them, and their build.

A decoder layer in torch ops is ~35 small ops (norms, residual adds, rotary, K/V writes, decode attention, SiLU x
up), each a dispatch and a pass over memory that converts bf16 to float32 and back. The fused kernels do the same
maths in 5 ops per layer: RMSNorm with the residual add, rotary with the K/V cache write, SiLU x up, and decode
attention straight out of the paged cache. They round to bf16 wherever the torch ops do, through ATen's own vector
code (the same conversions and exp), so only summation order differs (the RMSNorm sum of squares and attention).
Two more serve the adapters (`server.model.lora`): the per-token LoRA deltas of a decode step, and filling a slot.

They are built on first use on each machine with the C++ compiler torch's extension builder finds (c++, and
ninja), for the vector width torch itself uses here (AVX-512 or AVX2), and cached by torch (TORCH_EXTENSIONS_DIR,
default ~/.cache/torch_extensions); `loraplex prepare-model` builds them ahead. Where they cannot be built the
forward runs the torch ops, and the log says why. float32 (the exact mode) always runs the torch ops.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "fused_cpu.cpp"
# What torch compiles its own kernels of each CPU capability with (ATen's vector code selects on these).
CAPABILITY_FLAGS = {
    "AVX512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"),
    "AVX2": ("-mavx2", "-mfma", "-mf16c"),
}


def use_fused_kernels(
    dtype: torch.dtype, device: torch.device, enabled: bool = True, unfused_reason: str | None = None
) -> bool:
    """Whether a forward in `dtype` on `device` runs the fused kernels (building them if need be); logged.

    `unfused_reason`: what the model's family needs that the kernels do not do (`ModelSpec.unfused_reason`).
    """
    if not enabled:
        log.info("fused kernels off (--no-fused-kernels): the forward runs torch ops")
        return False
    if dtype != torch.bfloat16 or device.type != "cpu":
        return False
    if unfused_reason is not None:
        log.info("fused kernels off for this model (%s): the forward runs torch ops", unfused_reason)
        return False
    missing = load_fused_kernels()
    if missing is not None:
        log.warning("fused kernels unavailable, the forward runs torch ops (slower): %s", missing)
        return False
    log.info("fused kernels loaded for the bf16 forward (%s)", torch.backends.cpu.get_cpu_capability())
    return True


@functools.cache
def load_fused_kernels() -> str | None:
    """Build (once per machine) and load the kernels into `torch.ops.loraplex`; None on success, else why not."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = CAPABILITY_FLAGS.get(capability)
    if flags is None:
        return f"torch runs {capability} kernels here; the fused kernels are built for AVX2 and AVX512"
    compiler = os.environ.get("CXX", "c++")
    for tool in (compiler, "ninja"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not on PATH (install a C++ compiler and ninja, e.g. apt-get install g++ ninja-build)"
    from torch.utils import cpp_extension  # imports setuptools; only needed here

    defines = [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
    try:
        cpp_extension.load(
            name=f"loraplex_fused_{capability.lower()}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", *defines, *flags, "-fopenmp"],  # torch's own libgomp serves the parallel loops
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        return f"building {SOURCE.name} failed: {exc}"
    return None

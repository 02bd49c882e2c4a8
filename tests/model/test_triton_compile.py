"""Every Triton kernel compiles for the GPUs we target (Hopper, sm_90) with the ptxas Triton ships, on a CPU machine.

The interpreter runs kernels as Python, so it cannot catch what only the compiler refuses (loop-carried types, early
returns, dot shapes); this does, in a child process without TRITON_INTERPRET (read as Triton is imported).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# kernel -> (pointer dtypes by argument, float arguments, constexpr variants)
SHRINK = (
    {"x": "*bf16", "a": "*bf16", "xa": "*fp32", "ranks": "*i64"},
    (),
    [{"BLOCK_M": m, "BLOCK_R": 16, "BLOCK_K": 64, "PRECISION": None, "UPCAST": False} for m in (16, 64)],
)
EXPAND = (
    {"xa": "*fp32", "b": "*bf16", "y": "*bf16", "g": "*bf16", "ranks": "*i64"},
    (),
    [
        {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_R": 16, "HAS_G": g, "REMOVE": r, "PRECISION": None, "UPCAST": False}
        for g in (False, True)
        for r in (False, True)
    ],
)
DECODE = ({"q": "*bf16", "k_cache": "*bf16", "v_cache": "*bf16", "out": "*bf16", "tokens": "*i64", "tables": "*i64",
           "lens": "*i64"}, ("scale", "softcap"),
          [{"GROUP": 4, "BLOCK_P": 16, "HEAD": 64, "SOFTCAP": s} for s in (False, True)])  # fmt: skip
INDEX_POINTERS = ("order", "seg_starts", "seg_counts", "seg_rows")


def compile_all(arch: int = 90) -> None:
    """Compile each kernel variant for `arch`; raises on the first that does not compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from server.model.triton import attention, lora

    target = GPUTarget("cuda", arch, 32)
    kernels = ((lora._shrink_kernel, SHRINK), (lora._expand_kernel, EXPAND), (attention._decode_kernel, DECODE))
    for kernel, (pointers, floats, variants) in kernels:
        for constexprs in variants:
            signature = {
                name: "constexpr"
                if name in constexprs
                else pointers.get(name) or ("*i32" if name in INDEX_POINTERS else "fp32" if name in floats else "i32")
                for name in kernel.arg_names
            }
            triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target)


def test_triton_kernels_compile_for_hopper():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    code = "from tests.model.test_triton_compile import compile_all; compile_all()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

"""The row counts CPU GEMMs run at, so that oneDNN meets a small fixed set of shapes.

oneDNN JIT-compiles a kernel and builds a primitive for each GEMM shape it meets and keeps them in caches of about
a thousand entries each, 0.65-1.4 MB per shape in bfloat16 on this CPU: a server stepping 1 to 2048 tokens at a time,
with adapter runs of every length, grew by a gigabyte or more as new shapes came (a bf16 GEMM over 600 row counts:
+387 MiB; at multiples of 16: +43 MiB; a LoRA GEMM pair over 400 run lengths: +515 MiB). Rounding the row count
keeps the set of shapes small and fixed. float32 matmuls that are not prepacked run MKL's GEMM, which keeps nothing
per shape (+6 MiB over 400 run lengths), and GPUs compile nothing per row count here.

Both caches hold each primitive (oneDNN's primitive cache and torch's ideep cache, 1024 entries each by default), so
memory comes back only once both drop it: `bound_kernel_caches` keeps each to KERNEL_CACHE_ENTRIES. Over 400 shapes
that cost +56 MiB at 64 entries and +256 MiB at 256 against +511 MiB unbounded; a shape rebuilt after eviction costs
about 0.8 ms, once for all layers of a step (they share it), against tens to hundreds of ms for a step that size.
"""

from __future__ import annotations

import os

import torch

EXACT_ROWS = 32  # GEMMs of up to this many rows (decode batches) run at their own row count
BUCKETS_PER_OCTAVE = 16  # above it, row counts round up to one of this many sizes per power of two
KERNEL_CACHE_ENTRIES = 256  # GEMM primitives each of oneDNN's and torch's caches keeps (~1 MB each in bf16)
KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # read once, at first use


def padded_rows(rows: int) -> int:
    """The row count a GEMM of `rows` rows runs at: itself up to EXACT_ROWS, else rounded up to a multiple of
    1/BUCKETS_PER_OCTAVE of its power of two (at most 1/16 more rows, 2 % more on average over prefill sizes; 128
    sizes up to 2048 rows).
    """
    if rows <= EXACT_ROWS:
        return rows
    octave = 1 << ((rows - 1).bit_length() - 1)  # the largest power of two below `rows`
    step = max(1, octave // BUCKETS_PER_OCTAVE)
    return -(-rows // step) * step


def runs_onednn(x: torch.Tensor) -> bool:
    """Whether torch's matmul on `x` runs oneDNN, which compiles per shape: 16-bit floats on a CPU."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def bound_kernel_caches(entries: int = KERNEL_CACHE_ENTRIES) -> None:
    """Keep oneDNN's and torch's caches of compiled GEMMs to `entries` each, unless the environment already sets them.

    Both read their variable once, at the process's first oneDNN op: call this before loading a model.
    """
    for name in KERNEL_CACHE_VARIABLES:
        os.environ.setdefault(name, str(entries))

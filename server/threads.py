"""Which threads compute with how many cores: the engine thread with all of them, every other thread with one.

torch's CPU kernels run on OpenMP (libgomp), which keeps a pool of worker threads for each thread that ever ran a
parallel op, for as long as that thread lives. Once the pools together hold more threads than there are cores,
libgomp stops spinning between parallel regions, and every op then pays for waking its workers, even while the
other pools sit idle. Measured on this 2-core machine (bench/bench_threads.py): one idle pool left behind by the
thread that loaded the model cost the engine 1.3-1.5x of its batch-32 throughput and 1.5-1.8x on each batch-1 token.

So the engine thread loads the model and runs every step with `engine_threads()` threads, and any other thread
that touches tensors (adapter loads, uploads, tools) does so through `single_threaded`, which creates no pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

_P = ParamSpec("_P")
_T = TypeVar("_T")

_DEFAULT_THREADS = torch.get_num_threads()  # torch's choice (OMP_NUM_THREADS, else the cores), before any pinning


def engine_threads() -> int:
    """How many threads the engine thread computes with."""
    return _DEFAULT_THREADS


def use_engine_threads() -> None:
    """Make the calling thread compute with `engine_threads()` threads; for the engine thread and tools."""
    torch.set_num_threads(_DEFAULT_THREADS)


def pin_single_thread() -> None:
    """Make the calling thread compute on one core (torch's setting is per thread under OpenMP)."""
    torch.set_num_threads(1)


def single_threaded(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Call `fn` after pinning the calling thread to one core: the way helper threads touch tensors."""
    pin_single_thread()
    return fn(*args, **kwargs)

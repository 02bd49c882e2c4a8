"""What filling a device slot costs the engine thread (`server.model.lora`, `server.adapters.packing`), one run.

A slot fill copies one adapter from host memory into the slot buffers of every layer, on the engine thread between
two steps: under traffic over many adapters, one request in two brings an adapter to fill (issue #28). Timed here
on the default model in bf16, for generated LoRA adapters of ranks 8 to 64 on q, k, v, o (as
`bench.bench_many_adapters` makes them), each rank's adapters cycled through the slots of a full set:
  packed      host weights as the server keeps them (A and B transposed, the slot buffers' layout)
  as read     the same weights in the layout they are read in, so the fill transposes them
each alone, and while a second thread reads and checks adapters without pause (`check_adapter`, the server's load,
on one core like its loaders), as the engine meets it under cold traffic. Printed: median milliseconds per fill.

Usage: OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_slot_fill [--fills 40]
(one thread for the engine, as in the many-adapter benchmark: the loads then have the other core)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.bench_many_adapters import RANKS, TARGETS
from bench.real_shapes import make_lora_store
from server.adapters.slots import attach_lora_slots, load_adapter_slot
from server.adapters.validation import check_adapter
from server.adapters.weights import ModelInfo
from server.model.default_model import default_model_dir
from server.model.loader import load_model
from server.model.lora_weights import LoraWeights
from server.threads import pin_single_thread, use_engine_threads

SLOTS, PER_RANK = 32, 4


class Loads:
    """A thread reading and checking the adapters in turn, without pause, while `on` is set."""

    def __init__(self, folders: list[Path], info: ModelInfo) -> None:
        self.folders, self.info = folders, info
        self.on, self.done = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, name="loads")
        self.thread.start()

    def _run(self) -> None:
        pin_single_thread()
        i = 0
        while not self.done.is_set():
            if self.on.wait(0.05):
                check_adapter(self.folders[i % len(self.folders)], self.info, max(RANKS))
                i += 1

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def as_read(updates: dict) -> dict:
    """The same updates with A and B contiguous, as `safetensors` hands them over."""
    return {key: LoraWeights(u.a.contiguous(), u.b.contiguous(), u.g) for key, u in updates.items()}


def median_fill_ms(model, adapters: list[dict], fills: int) -> float:
    spent = []
    for i in range(fills):
        began = time.perf_counter()
        load_adapter_slot(model, i % SLOTS, adapters[i % len(adapters)])
        spent.append(time.perf_counter() - began)
    return 1e3 * statistics.median(spent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fills", type=int, default=40, help="fills per case")
    args = parser.parse_args()
    use_engine_threads()
    model_dir = default_model_dir()
    loaded = load_model(model_dir, torch.device("cpu"), torch.bfloat16)
    attach_lora_slots(loaded.model, SLOTS)
    info = ModelInfo.from_model(loaded.model)
    with tempfile.TemporaryDirectory() as tmp:
        folders: dict[int, list[Path]] = {}
        for rank in RANKS:
            root = Path(tmp) / f"r{rank}"
            folders[rank] = [root / name for name in make_lora_store(model_dir, root, PER_RANK, rank, TARGETS)]
        packed = {rank: [check_adapter(f, info, max(RANKS))[0].updates for f in fs] for rank, fs in folders.items()}
        layouts = {"packed": packed, "as read": {rank: list(map(as_read, ups)) for rank, ups in packed.items()}}
        for slot in range(SLOTS):  # every slot filled once at the largest rank: buffers at their final size
            load_adapter_slot(loaded.model, slot, packed[max(RANKS)][slot % PER_RANK])
        loads = Loads([f for fs in folders.values() for f in fs], info)
        spent: dict[tuple[int, str, bool], float] = {}
        try:
            for loading in (False, True):
                (loads.on.set if loading else loads.on.clear)()
                for rank in RANKS:
                    for layout, adapters in layouts.items():
                        spent[rank, layout, loading] = median_fill_ms(loaded.model, adapters[rank], args.fills)
        finally:
            loads.stop()
    print("median ms per slot fill (default model, bf16, q, k, v, o)")
    print(f"{'rank':>5} {'packed':>8} {'as read':>8} {'packed, loads':>14} {'as read, loads':>15}")
    for rank in RANKS:
        row = [spent[rank, layout, loading] for loading in (False, True) for layout in layouts]
        print(f"{rank:>5} {row[0]:>8.2f} {row[1]:>8.2f} {row[2]:>14.2f} {row[3]:>15.2f}")


if __name__ == "__main__":
    main()

"""The merge controller: swaps the policy asks for, the swap log and metrics callback, refusals."""

from __future__ import annotations

import dataclasses
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from server.adapters.slots import attach_lora_slots
from server.adapters.weights import AdapterWeights, ModelInfo, validate_adapter_dir
from server.engine.merge_controller import MergeController
from server.engine.merge_policy import MergePolicy, MergePolicyConfig
from server.model.loader import load_model
from tests.helpers import make_peft_adapter


@pytest.fixture(scope="module")
def weights(tiny_model_dir, tmp_path_factory) -> dict[str, AdapterWeights]:
    root = tmp_path_factory.mktemp("controller-store")
    make_peft_adapter(tiny_model_dir, root / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    make_peft_adapter(tiny_model_dir, root / "d", seed=1, r=4, lora_alpha=8, use_dora=True, target_modules=["o_proj"])
    loaded = load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
    info = ModelInfo.from_model(loaded.model)
    found = {name: validate_adapter_dir(root / name, info, max_lora_rank=8) for name in ("a", "d")}
    update = found["d"].updates[(0, "o_proj")]
    zero = {**found["d"].updates, (0, "o_proj"): dataclasses.replace(update, g=torch.zeros_like(update.g))}
    return {"a@1": found["a"], "d@1": found["d"], "broken@1": dataclasses.replace(found["d"], updates=zero)}


@pytest.fixture
def controller(tiny_model_dir, weights):
    loaded = load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
    attach_lora_slots(loaded.model, max_loras=2)
    policy = MergePolicy(MergePolicyConfig(window_s=0), lambda name: "auto")
    recorded = []
    merger = MergeController(loaded.model, policy, weights.get, record=lambda *args: recorded.append(args))
    return merger, recorded


def _scheduler(running: dict[str, int], base: int = 0) -> SimpleNamespace:
    counts = Counter(running)
    return SimpleNamespace(running_adapters=counts, waiting_adapters=Counter(), num_running=counts.total() + base,
                           num_waiting=0)  # fmt: skip


def test_swaps_follow_the_policy_and_are_logged_and_recorded(controller):
    merger, recorded = controller
    merger.update(_scheduler({"a@1": 3}, base=1))
    assert merger.merged == "a@1" and merger.buffer_bytes > 0
    merger.update(_scheduler({"a@1": 1, "d@1": 9}))  # switch: unmerge a, merge d
    merger.update(_scheduler({}, base=4))
    assert merger.merged is None and merger.buffer_bytes > 0  # buffers stay for the next merge
    assert [(s.op, s.adapter) for s in merger.swaps] == [
        ("merge", "a@1"), ("unmerge", "a@1"), ("merge", "d@1"), ("unmerge", "d@1")
    ]  # fmt: skip
    assert [(op, name) for op, _, name in recorded] == [("merge", "a"), ("unmerge", "a"), ("merge", "d"),
                                                        ("unmerge", "d")]  # fmt: skip
    assert merger.num_swaps == {"merge": 2, "unmerge": 2}


def test_an_adapter_that_cannot_be_merged_is_served_unmerged_from_then_on(controller):
    merger, recorded = controller
    assert not merger.merge("broken@1")
    assert "broken@1" in merger.policy.refused
    merger.update(_scheduler({"broken@1": 5}))
    assert merger.merged is None and not merger.swaps and not recorded


def test_merging_needs_the_weights_in_host_memory_and_is_idempotent(controller):
    merger, _ = controller
    assert not merger.merge("cold@1")
    assert merger.merge("a@1") and merger.merge("a@1")  # merging the merged one again is a no-op
    assert [s.op for s in merger.swaps] == ["merge"]


def test_while_the_choice_holds_each_step_packs_one_more_merged_layer(controller):
    merger, _ = controller
    merger.update(_scheduler({"a@1": 3}))
    layers = merger.weight_merger.merged_layers
    if layers[0].packed is None:
        pytest.skip("oneDNN is not available: nothing is packed")
    for step in range(1, len(layers) + 1):
        merger.update(_scheduler({"a@1": 3}))
        assert sum(lin.merged_packed is not None for lin in layers) == step
    assert not merger.weight_merger.needs_packing
    merger.update(_scheduler({"a@1": 3}))  # nothing left to do
    assert [s.op for s in merger.swaps] == ["merge"]

"""Check a PEFT adapter folder against the base model and turn it into serving-ready updates.

Only `adapter_model.safetensors` is read (never a pickle). Each targeted projection becomes a `LoraWeights`: A as
saved, B with the scale folded in, and for DoRA the constant factor `g = m / ‖W + s·B·A‖_row` computed once here
(`LoraWeights.with_dora`, exactly as PEFT's `DoraLinearLayer.get_weight_norm`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from server.adapters.config import AdapterConfig, TargetSpec, read_adapter_config
from server.adapters.digests import Digest, file_digest
from server.adapters.packing import packed
from server.errors import AdapterError
from server.model.decoder import DecoderModel
from server.model.lora_weights import LoraWeights
from server.model.module_names import ModuleNames

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
PREFIX = "base_model.model."  # PEFT's prefix before the wrapped model's module names


@dataclass(frozen=True)
class ModelInfo:
    """What checking and loading an adapter needs to know about the base model."""

    num_layers: int
    shapes: Mapping[str, tuple[int, int]]  # HF projection name -> (in_features, out_features)
    dtype: torch.dtype  # dtype of the loaded updates
    device: torch.device  # where the loaded updates live (host memory for the registry's cache)
    base_weight: Callable[[int, str], torch.Tensor]  # (layer, projection) -> frozen W [out, in], for DoRA
    modules: ModuleNames  # the Hugging Face module names adapters of this model are saved under

    def tensor_prefix(self, layer: int, proj: str) -> str:
        """What PEFT's saved tensor names of one projection start with."""
        return PREFIX + self.modules.projection(layer, proj)

    @classmethod
    def from_model(cls, model: DecoderModel, device: torch.device | str = "cpu") -> ModelInfo:
        """Describe a model through its projection map; updates are placed on `device`."""
        projections = model.projections
        dtype = projections.linears[0].weight.dtype
        shapes = MappingProxyType(projections.shapes())
        modules = model.spec.family.modules
        return cls(projections.num_layers, shapes, dtype, torch.device(device), projections.base_weight, modules)


@dataclass(frozen=True)
class AdapterWeights:
    """A checked adapter, ready for `server.adapters.slots.load_adapter_slot`."""

    config: AdapterConfig
    updates: Mapping[tuple[int, str], LoraWeights]  # (layer, HF projection name) -> update
    size_bytes: int  # size of adapter_model.safetensors
    sha256: str  # hex digest of adapter_model.safetensors

    @cached_property
    def num_bytes(self) -> int:
        """Memory the loaded updates take (asked after every slot fill, for each adapter in a slot: computed once)."""
        tensors = [t for u in self.updates.values() for t in (u.a, u.b, u.g) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def validate_adapter_dir(
    path: Path | str, info: ModelInfo, max_lora_rank: int, digest: Digest = file_digest
) -> AdapterWeights:
    """Check a PEFT adapter folder against the base model and load it; `AdapterError` names the field or tensor."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter folder {path.name!r} does not exist", param="path")
    config = read_adapter_config(path / "adapter_config.json", info.num_layers, max_lora_rank, info.modules)
    file = _weights_file(path)
    size, sha256 = digest(file)
    tensors = _read_tensors(file, _expected_shapes(config, info))
    updates = {key: _update(key, spec, tensors, config.use_dora, info) for key, spec in config.targets.items()}
    updates = packed(updates, info.dtype, info.device)  # on the CPU one map, freed whole
    return AdapterWeights(config, MappingProxyType(updates), size, sha256)


def _weights_file(path: Path) -> Path:
    file = path / WEIGHTS_FILE
    if file.is_file():
        return file
    pickled = next((name for name in PICKLED_FILES if (path / name).exists()), None)
    if pickled is not None:
        raise AdapterError(
            f"{pickled}: pickled weights are refused because loading them can run code; convert the "
            f"adapter to safetensors (save_pretrained(..., safe_serialization=True))",
            param=pickled,
        )
    raise AdapterError(f"{WEIGHTS_FILE} is missing", param=WEIGHTS_FILE)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of `tensor` is finite: its minimum and maximum, found in one pass, are (NaN propagates
    into both). In bf16 a twentieth of `isfinite(t).all()`'s time, which had made the check most of a load."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(low.item()) and math.isfinite(high.item())


def _tensor_names(info: ModelInfo, layer: int, proj: str) -> tuple[str, str, str]:
    """PEFT's saved names of A, B and the DoRA magnitude of one projection."""
    base = info.tensor_prefix(layer, proj)
    return f"{base}.lora_A.weight", f"{base}.lora_B.weight", f"{base}.lora_magnitude_vector"


def _expected_shapes(config: AdapterConfig, info: ModelInfo) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for (layer, proj), spec in config.targets.items():
        if proj not in info.shapes:
            raise AdapterError(f"target_modules: the model has no {proj}", param="target_modules")
        in_features, out_features = info.shapes[proj]
        a, b, m = _tensor_names(info, layer, proj)
        shapes[a] = (spec.rank, in_features)
        shapes[b] = (out_features, spec.rank)
        if config.use_dora:
            shapes[m] = (out_features,)
    return shapes


def _read_tensors(file: Path, expected: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Exactly the expected tensors, with the expected shapes, a float dtype and finite values."""
    try:
        with safe_open(file, framework="pt") as f:
            names = set(f.keys())
            missing = sorted(set(expected) - names)
            if missing:
                raise AdapterError(
                    f"{WEIGHTS_FILE} lacks tensor {missing[0]} ({len(missing)} missing in all), "
                    "which adapter_config.json calls for",
                    param=missing[0],
                )
            extra = sorted(names - set(expected))
            if extra:
                raise AdapterError(
                    f"{WEIGHTS_FILE} holds unexpected tensor {extra[0]} ({len(extra)} in all); "
                    "adapter_config.json does not target it",
                    param=extra[0],
                )
            return {name: _read_tensor(f, name, shape) for name, shape in expected.items()}
    except SafetensorError as e:
        raise AdapterError(f"{WEIGHTS_FILE} is not a valid safetensors file: {e}", param=WEIGHTS_FILE) from None


def _read_tensor(f: Any, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    header = f.get_slice(name)
    if header.get_dtype() not in DTYPES:
        raise AdapterError(
            f"tensor {name} has dtype {header.get_dtype()}; only F32, F16 and BF16 are accepted", param=name
        )
    if tuple(header.get_shape()) != shape:
        raise AdapterError(
            f"tensor {name} has shape {list(header.get_shape())}; this model and adapter_config.json "
            f"call for {list(shape)}",
            param=name,
        )
    tensor = f.get_tensor(name)
    if not all_finite(tensor):
        raise AdapterError(f"tensor {name} holds NaN or infinite values", param=name)
    return tensor


def _update(
    key: tuple[int, str], spec: TargetSpec, tensors: Mapping[str, torch.Tensor], dora: bool, info: ModelInfo
) -> LoraWeights:
    """A as saved, s·B and the DoRA factor (computed in float32) of one projection; `packed` casts them to the
    model's dtype as it copies them into the adapter's memory map."""
    a_name, b_name, m_name = _tensor_names(info, *key)
    a, b = tensors[a_name], tensors[b_name].float() * spec.scale  # [r, in], [out, r]
    update = LoraWeights(a, b)  # A is only cast to the model's dtype: via float32 would give the same values
    if dora:
        update = LoraWeights(a.float(), b).with_dora(info.base_weight(*key), tensors[m_name])
        if not all_finite(update.g):
            raise AdapterError(
                f"tensor {m_name} gives a non-finite DoRA scale (a row of W + s·B·A has zero norm)", param=m_name
            )
    return update

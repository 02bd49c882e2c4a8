"""Load a local Hugging Face checkpoint directory (safetensors only) into our forward."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from server.model.architecture import ModelSpec, UnsupportedModelError
from server.model.backend import pick_kernels
from server.model.decoder import DecoderModel


@dataclass
class LoadedModel:
    """The base model ready to run, with its tokenizer and the facts the engine needs."""

    name: str
    spec: ModelSpec
    model: DecoderModel
    tokenizer: PreTrainedTokenizerBase
    dtype: torch.dtype
    device: torch.device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UnsupportedModelError("--device cuda was requested but CUDA is not available")
    return torch.device(device)


def load_model(path: Path, device: torch.device, dtype: torch.dtype, fused_kernels: bool = True) -> LoadedModel:
    """Read config, tokenizer and safetensors weights from `path`; never unpickles anything.

    `fused_kernels`: run the fused bf16 kernels where they apply; `server.model.backend` picks every kernel.
    """
    path = Path(path)
    spec = read_spec(path)
    weights = {k: t.to(device=device, dtype=dtype) for k, t in read_safetensors(path).items()}
    kernels = pick_kernels(dtype, device, fused_kernels, spec.unfused_reason())
    model = _build(path, spec, weights, device, kernels.fused_cpu).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return LoadedModel(path.name, spec, model, tokenizer, dtype, device)


def read_spec(path: Path) -> ModelSpec:
    """The checkpoint's spec from its config.json; `UnsupportedModelError` says why a model cannot be served."""
    if not (path / "config.json").is_file():
        raise UnsupportedModelError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UnsupportedModelError(f"{path}/config.json cannot be read by transformers: {e}") from None
    return ModelSpec.from_hf_config(config)


def check_checkpoint(path: Path) -> ModelSpec:
    """Everything `load_model` checks, without reading weights: config, family and every tensor's name and shape
    (the model is built on the meta device from the safetensors headers). Takes well under a second."""
    path = Path(path)
    spec = read_spec(path)
    meta = torch.device("meta")
    weights = {name: torch.empty(shape, device=meta) for name, shape in _tensor_shapes(path).items()}
    _build(path, spec, weights, meta, fused=False)
    return spec


def _build(path: Path, spec: ModelSpec, weights: dict, device: torch.device, fused: bool) -> DecoderModel:
    try:
        return DecoderModel(spec, weights, device, fused)
    except KeyError as e:
        raise UnsupportedModelError(
            f"{path} has no tensor {e.args[0]!r}, which a {spec.model_type} model needs"
        ) from None
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{path}: {e}") from None


def _safetensors_files(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{path} holds no .safetensors weights (pickled .bin/.pt files are never loaded)")
    return files


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    shapes = {}
    for name in _safetensors_files(path):
        with safe_open(path / name, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[key] = f.get_slice(key).get_shape()
    return shapes


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name in _safetensors_files(path):
        with safe_open(path / name, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[key] = f.get_tensor(key)
    return tensors

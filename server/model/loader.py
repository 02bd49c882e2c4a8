"""Load a local Hugging Face checkpoint directory (safetensors only) into our forward."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from server.model.architecture import ModelSpec, UnsupportedModelError
from server.model.decoder import DecoderModel
from server.model.kernels import use_fused_kernels


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

    `fused_kernels`: run the fused bf16 kernels where they apply (`server.model.kernels`).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UnsupportedModelError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    spec = ModelSpec.from_hf_config(config)
    weights = {k: t.to(device=device, dtype=dtype) for k, t in read_safetensors(path).items()}
    fused = use_fused_kernels(dtype, device, fused_kernels, spec.unfused_reason())
    try:
        model = DecoderModel(spec, weights, device, fused).eval()
    except KeyError as e:
        raise UnsupportedModelError(
            f"{path} has no tensor {e.args[0]!r}, which a {spec.model_type} checkpoint needs"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return LoadedModel(path.name, spec, model, tokenizer, dtype, device)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{path} holds no .safetensors weights (pickled .bin/.pt files are never loaded)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(path / name, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[key] = f.get_tensor(key)
    return tensors

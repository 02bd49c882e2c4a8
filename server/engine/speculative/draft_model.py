"""The draft model of the `draft_model` method: loaded next to the target, refused at start where it cannot serve.

A draft proposes token ids the target verifies, so both must read ids the same way: the same vocabulary size and the
same tokenizer. It is there to be cheaper than the target, so a draft with a larger transformer body is refused too
(the same size is allowed: the target as its own draft is a useful check that every proposal is accepted).
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from server.errors import ConfigurationError
from server.model.architecture import ModelSpec
from server.model.loader import LoadedModel, load_model, read_spec

_PARAM = "speculative_config"


def load_draft_model(path: Path | str, target: LoadedModel, fused_kernels: bool) -> LoadedModel:
    """The draft checkpoint at `path` on the target's device and dtype; a ConfigurationError naming what to fix."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigurationError(f"draft model folder {str(path)!r} does not exist", param=_PARAM)
    try:
        spec = read_spec(path)
    except ConfigurationError as exc:
        raise ConfigurationError(f"draft model {str(path)!r} cannot be served: {exc.message}", param=_PARAM) from None
    if spec.vocab_size != target.spec.vocab_size:
        raise ConfigurationError(
            f"draft model {str(path)!r} has a vocabulary of {spec.vocab_size} tokens, the target "
            f"{target.spec.vocab_size}; a draft must share the target's tokenizer",
            param=_PARAM,
        )
    if body_parameters(spec) > body_parameters(target.spec):
        raise ConfigurationError(
            f"draft model {str(path)!r} is larger than the target ({body_parameters(spec):,} against "
            f"{body_parameters(target.spec):,} parameters outside the embeddings); use a smaller draft",
            param=_PARAM,
        )
    _check_tokenizer(path, target)
    try:
        return load_model(path, target.device, target.dtype, fused_kernels)
    except ConfigurationError as exc:
        raise ConfigurationError(f"draft model {str(path)!r} cannot be served: {exc.message}", param=_PARAM) from None


def body_parameters(spec: ModelSpec) -> int:
    """Weights of the attention and MLP projections: what a forward costs per token, embeddings aside."""
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    attention = spec.hidden_size * (q + 2 * kv) + q * spec.hidden_size
    mlp = 3 * spec.hidden_size * spec.intermediate_size
    return spec.num_layers * (attention + mlp)


def _check_tokenizer(path: Path, target: LoadedModel) -> None:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"draft model {str(path)!r} has no readable tokenizer: {exc}", param=_PARAM) from None
    if tokenizer.get_vocab() != target.tokenizer.get_vocab():
        raise ConfigurationError(
            f"draft model {str(path)!r} has a different tokenizer from the target's; a draft must share it",
            param=_PARAM,
        )

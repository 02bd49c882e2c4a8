"""The one settings object: every option is a CLI flag and a LORAPLEX_* environment variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Server configuration; field descriptions are the `loraplex serve --help` text."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore")

    model: Path | None = Field(
        None, description="Local Hugging Face Llama-family checkpoint directory (default: SmolLM2-135M-Instruct)"
    )
    served_model_name: str | None = Field(None, description="Name of the base model in the API (default: model's name)")
    host: str = Field("127.0.0.1", description="Interface to bind")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind")
    adapters_store: Path = Field(Path("adapters_store"), description="Directory of PEFT adapters, one folder each")
    kv_cache_bytes: int = Field(512 * 2**20, gt=0, description="Byte budget of the paged KV cache")
    block_size: int = Field(16, gt=0, description="Tokens per KV-cache block")
    max_num_batched_tokens: int = Field(2048, gt=0, description="Most tokens (prefill + decode) in one engine step")
    max_num_seqs: int = Field(64, gt=0, description="Most sequences running at once")
    max_model_len: int | None = Field(None, gt=0, description="Context length limit (default: the model's)")
    max_queue: int = Field(256, ge=0, description="Waiting requests allowed before answering 429")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device for the model")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weight dtype (auto: float32 on CPU, bfloat16 on CUDA)"
    )
    max_loras: int = Field(32, gt=0, description="Adapters resident on the device at once")
    max_cpu_loras: int = Field(64, gt=0, description="Adapters cached in host memory (at least --max-loras)")
    max_lora_rank: int = Field(64, gt=0, description="Largest adapter rank accepted")
    max_request_bytes: int = Field(4 * 2**20, gt=0, description="Largest JSON request body accepted")
    seed: int = Field(0, description="Seed for requests that give none")

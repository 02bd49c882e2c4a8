"""The one settings object: every option is a CLI flag and a LORAPLEX_* environment variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.errors import ConfigurationError


class Settings(BaseSettings):
    """Server configuration; field descriptions are the `loraplex serve --help` text."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore")

    model: Path | None = Field(
        None, description="Local Hugging Face checkpoint directory of a served family (default: SmolLM2-135M-Instruct)"
    )
    served_model_name: str | None = Field(None, description="Name of the base model in the API (default: model's name)")
    host: str = Field("127.0.0.1", description="Interface to bind")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind")
    adapters_store: Path = Field(Path("adapters_store"), description="Directory of PEFT adapters, one folder each")
    kv_cache_bytes: int = Field(512 * 2**20, gt=0, description="Byte budget of the paged KV cache")
    block_size: int = Field(16, gt=0, description="Tokens per KV-cache block")
    max_num_batched_tokens: int = Field(2048, gt=0, description="Most tokens (prefill + decode) in one engine step")
    max_num_seqs: int = Field(128, gt=0, description="Most sequences running at once (vLLM's CPU default)")
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV cache of full blocks a prompt shares with earlier ones on the same adapter"
    )
    schedule_policy: Literal["fcfs", "cached-first"] = Field(
        "cached-first",
        description="Admission order of waiting requests: fcfs, or cached-first (requests whose prompt is mostly in "
        "the prefix cache go first, with at most half of a step's token budget; the rest stay first come, first "
        "served)",
    )
    max_model_len: int | None = Field(None, gt=0, description="Context length limit (default: the model's)")
    generation_config: str = Field(
        "auto",
        description="Default sampling parameters (temperature, top_p, top_k, min_p, repetition_penalty) for requests "
        "that leave them out: auto reads the model folder's generation_config.json, vllm ignores it (the server's "
        "own defaults), a folder path reads that folder's generation_config.json",
    )
    override_generation_config: str | None = Field(
        None,
        description="JSON object of default sampling parameters that wins over --generation-config, e.g. "
        "'{\"temperature\": 0.5}'",
    )
    speculative_config: str | None = Field(
        None,
        description='Speculative decoding, vLLM\'s JSON: \'{"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_min": 2, "prompt_lookup_max": 4}\' proposes up to 4 tokens per row and step by prompt '
        "lookup and verifies them in one forward under each row's adapter; off without it",
    )
    draft_adapters_store: Path | None = Field(
        None,
        description="Directory of PEFT adapters for the draft model of --speculative-config's draft_model method, one "
        "folder each, read at start: a request for adapter X is proposed for with the draft adapter X if there is "
        "one, else by the plain draft (adapters always apply to the target)",
    )
    max_queue: int = Field(256, ge=0, description="Waiting requests allowed before answering 429")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device for the model")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="Serving dtype of weights, adapters and KV cache (auto: bfloat16 on CUDA and on CPUs with "
        "avx512_bf16 or AMX, float32 elsewhere; float32 is the exact mode)",
    )
    fused_kernels: bool = Field(
        True,
        description="Run the bf16 CPU forward with the fused C++ kernels (built on first start; needs a C++ compiler "
        "and ninja, else torch ops run, as they always do in float32)",
    )
    max_loras: int = Field(32, gt=0, description="Adapters resident on the device at once")
    max_cpu_loras: int = Field(64, gt=0, description="Adapters cached in host memory (at least --max-loras)")
    max_cpu_lora_bytes: int = Field(
        4 * 2**30, gt=0, description="Bytes of adapter weights cached in host memory beyond those in use"
    )
    max_lora_rank: int = Field(64, gt=0, description="Largest adapter rank accepted")
    merged: list[str] = Field(
        default_factory=list,
        description="Latency-critical adapter to serve merged into the base weights; repeat for several (one is "
        "merged at a time)",
    )
    auto_merge: list[str] = Field(
        default_factory=list,
        description="Adapter to merge while it dominates traffic (see --merge-share); repeat for several",
    )
    merge_share: float = Field(
        0.6, gt=0, le=1, description="Share of running and waiting requests at which an auto adapter is merged"
    )
    unmerge_share: float = Field(
        0.4, ge=0, le=1, description="Share below which a merged auto adapter is unmerged (at most --merge-share)"
    )
    merge_window_s: float = Field(1.0, ge=0, description="Seconds a new merge choice must hold before the swap")
    max_request_bytes: int = Field(4 * 2**20, gt=0, description="Largest JSON request body accepted")
    max_json_depth: int = Field(32, ge=2, le=500, description="Deepest nesting of arrays and objects in a JSON body")
    max_text_chars: int = Field(
        256 * 1024, gt=0, description="Longest prompt string or chat message content, in characters"
    )
    max_prompts: int = Field(64, gt=0, description="Most prompts in one completions request")
    max_n: int = Field(128, gt=0, le=1024, description="Most choices (n) per prompt")
    max_messages: int = Field(512, gt=0, description="Most messages in one chat completions request")
    max_stop_strings: int = Field(16, gt=0, description="Most stop strings in one request")
    max_stop_chars: int = Field(256, gt=0, description="Longest stop string, in characters")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token of the /admin API; the admin API is off without one (prefer the env var)"
    )
    max_adapter_bytes: int = Field(256 * 2**20, gt=0, description="Largest adapter weights file an upload may send")
    max_concurrent_uploads: int = Field(
        2, gt=0, description="Adapter uploads checked at once; further ones get 429 with Retry-After"
    )
    lora_path_root: Path | None = Field(
        None,
        description="Folder whose adapter subfolders POST /v1/load_lora_adapter (vLLM's route, admin token) may "
        "load by path; loading by path is off without it",
    )
    seed: int = Field(0, description="Seed for requests that give none")
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = Field(
        "auto",
        description='How tool_choice "auto" reads calls out of an answer (vLLM\'s names): hermes (<tool_call> '
        "blocks: Qwen2.5, Qwen3, Hermes, SmolLM3), llama3_json (the answer is JSON calls: Llama 3.1+), mistral "
        "([TOOL_CALLS]); auto picks the one the chat template shows, else hermes",
    )
    reasoning_parser: Literal["qwen3", "deepseek_r1"] | None = Field(
        None,
        description="Read the <think>...</think> block that opens an answer into reasoning_content (vLLM's names: "
        "qwen3, deepseek_r1, whose answers always start inside the block); off by default",
    )
    health_stall_s: float = Field(
        60.0, gt=0, description="Seconds the engine may have work without finishing a step before /health answers 503"
    )
    health_max_step_failures: int = Field(
        3, gt=0, description="Engine steps failing in a row before /health answers 503"
    )
    metrics_max_adapters: int = Field(
        100, gt=0, description="Distinct adapter names in metric labels; further adapters are reported as 'other'"
    )
    api_keys_file: Path | None = Field(
        None,
        description="TOML or JSON file of tenants and their hashed API keys; with it, /v1 needs a tenant's key "
        "(re-read on SIGHUP and by POST /admin/keys/reload)",
    )
    metrics_max_tenants: int = Field(
        100, gt=0, description="Distinct tenant names in metric labels; further tenants are reported as 'other'"
    )

    @field_validator("generation_config")
    @classmethod
    def _generation_config_source(cls, value: str) -> str:
        if value not in ("auto", "vllm") and not (Path(value) / "generation_config.json").is_file():
            raise ValueError(f"must be auto, vllm or a folder holding a generation_config.json; got {value!r}")
        return value

    @field_validator("override_generation_config")
    @classmethod
    def _overrides_checked(cls, value: str | None) -> str | None:
        if value is not None:
            # Imported here: the engine's checks import torch, which commands that never serve need not wait for.
            from server.engine.generation_defaults import parse_overrides

            try:
                parse_overrides(value)
            except ConfigurationError as exc:
                raise ValueError(exc.message) from exc
        return value

    @field_validator("speculative_config")
    @classmethod
    def _speculation_checked(cls, value: str | None) -> str | None:
        if value is not None:
            from server.engine.speculative.config import parse_speculative_config

            try:
                parse_speculative_config(value)
            except ConfigurationError as exc:
                raise ValueError(exc.message) from exc
        return value

    @model_validator(mode="after")
    def _merge_shares_ordered(self) -> Settings:
        if self.unmerge_share > self.merge_share:
            raise ValueError(f"unmerge_share {self.unmerge_share} is above merge_share {self.merge_share}")
        return self


class ClusterSettings(BaseSettings):
    """Options of `loraplex serve-ray` beyond `serve`'s, which apply to every replica."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore")

    replicas: int = Field(1, gt=0, description="Engine replicas, each a whole loraplex engine with its own device")
    num_cpus_per_replica: float = Field(1.0, ge=0, description="CPUs Ray reserves for each replica")
    num_gpus_per_replica: float = Field(0.0, ge=0, description="GPUs Ray reserves for each replica")
    max_ongoing_requests: int | None = Field(
        None, gt=0, description="Requests Ray Serve sends one replica at once (default: --max-num-seqs)"
    )
    affinity_slack: int = Field(
        8,
        ge=0,
        description="Requests a replica holding an adapter may have in flight beyond the least loaded replica and "
        "still get that adapter's requests; past it the least loaded replica gets them and loads the adapter",
    )
    app_name: str = Field("loraplex", description="Name of the Ray Serve application")
    direct_ingress: bool = Field(
        True,
        description="On a local Ray head, the ingress replica serves HTTP itself (Ray Serve's throughput-optimized "
        "mode) instead of behind Ray's HTTP proxy; a cluster joined through RAY_ADDRESS keeps its own setting",
    )

"""Assemble a running engine from settings: model, KV cache, scheduler, core and facade."""

from __future__ import annotations

import logging

from server.adapters.limits import AdapterLimits
from server.adapters.registry import AdapterRegistry
from server.adapters.slots import attach_lora_slots
from server.adapters.store import AdapterStore
from server.adapters.weights import ModelInfo
from server.engine.async_engine import AsyncEngine
from server.engine.block_manager import BlockManager
from server.engine.generation_defaults import load_generation_defaults
from server.engine.llm_engine import LLMEngine
from server.engine.merge_controller import MergeController
from server.engine.merge_policy import MergePolicy, MergePolicyConfig, start_modes
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.speculative.config import parse_speculative_config
from server.engine.speculative.proposer import make_proposer
from server.errors import ConfigurationError
from server.metrics import Metrics
from server.model.default_model import DEFAULT_MODEL_NAME, default_model_dir
from server.model.gemm_shapes import bound_kernel_caches
from server.model.kv_cache import KVCache
from server.model.loader import load_model, resolve_device
from server.model.precision import resolve_dtype
from server.settings import Settings

log = logging.getLogger(__name__)


def build_engine(settings: Settings, metrics: Metrics | None = None) -> AsyncEngine:
    """Start the engine thread, which loads the base model; it records into `metrics` (the app's, or its own)."""
    metrics = metrics or Metrics(settings.metrics_max_adapters, settings.max_loras)
    return AsyncEngine(lambda: build_core(settings, metrics), settings, metrics)


def build_core(settings: Settings, metrics: Metrics) -> tuple[LLMEngine, AdapterRegistry, str]:
    """Load the model and assemble the engine core; returns it, the adapter registry and the base model's name."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if device.type == "cpu":
        bound_kernel_caches()  # before the first GEMM: cached compiled kernels are most of a CPU server's growth
    path = settings.model or default_model_dir()
    defaults = load_generation_defaults(path, settings.generation_config, settings.override_generation_config)
    loaded = load_model(path, device, dtype, settings.fused_kernels)
    spec = loaded.spec
    num_blocks = KVCache.blocks_for_budget(spec, settings.kv_cache_bytes, settings.block_size, dtype)
    capacity = num_blocks * settings.block_size
    max_model_len = min(settings.max_model_len or spec.max_position_embeddings, spec.max_position_embeddings)
    if capacity < max_model_len:
        if settings.max_model_len is not None:
            raise ConfigurationError(
                f"--kv-cache-bytes {settings.kv_cache_bytes} holds {capacity} tokens, fewer than --max-model-len "
                f"{max_model_len}; raise the cache budget or lower the length",
                param="kv_cache_bytes",
            )
        log.warning("KV cache holds %d tokens; limiting max_model_len from %d to that", capacity, max_model_len)
        max_model_len = capacity
    speculative = None if settings.speculative_config is None else parse_speculative_config(settings.speculative_config)
    proposer = None if speculative is None else make_proposer(speculative, loaded, settings)  # refuses a bad draft
    runner = ModelRunner(loaded, num_blocks, settings.block_size)
    attach_lora_slots(loaded.model, settings.max_loras)
    store = AdapterStore(settings.adapters_store)
    store.recover()  # a crash mid-upload leaves the store as it was
    info = ModelInfo.from_model(loaded.model)
    adapters = AdapterRegistry(store, loaded.model, info, AdapterLimits.from_settings(settings), metrics)
    scheduler = Scheduler(
        SchedulerConfig.from_settings(settings, max_model_len),
        BlockManager(num_blocks, settings.block_size, enable_caching=settings.enable_prefix_caching),
        adapter_fits=adapters.cache.fits,
    )
    policy = MergePolicy(MergePolicyConfig.from_settings(settings), start_modes(settings, adapters.mode))
    merger = MergeController(loaded.model, policy, adapters.cache.host_weights, record=metrics.record_merge)
    core = LLMEngine(
        runner, scheduler, loaded.tokenizer, settings.seed, adapters.cache, merger, defaults, speculative, proposer
    )
    name = settings.served_model_name or (DEFAULT_MODEL_NAME if settings.model is None else loaded.name)
    log.info("serving %s on %s (%s): %d KV blocks, max_model_len %d", name, device, dtype, num_blocks, max_model_len)
    return core, adapters, name

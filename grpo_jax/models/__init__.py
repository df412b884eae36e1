"""Flax NNX decoders (Llama 3.x, Qwen2/2.5, Qwen3) and HF checkpoint import/export."""

from grpo_jax.models.config import ConfigError, ModelConfig, PRESETS, from_hf_config, preset, to_hf_config
from grpo_jax.models.logprobs import token_logprobs
from grpo_jax.models.transformer import KVCache, Transformer, abstract_model, create_model, param_count
from grpo_jax.models.hf_io import CheckpointError, load_hf, save_hf

__all__ = [
    "CheckpointError", "ConfigError", "KVCache", "ModelConfig", "PRESETS", "Transformer",
    "abstract_model", "create_model", "from_hf_config", "load_hf", "param_count", "preset",
    "save_hf", "to_hf_config", "token_logprobs",
]

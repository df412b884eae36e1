"""The rollout engine: continuous batching over KV-cache slots kept across an episode's turns
(`engine.Engine`), and its compiled programs (`programs`)."""

from grpo_jax.engine.engine import Engine
from grpo_jax.engine.types import Completion, EngineConfig, EngineError, GenerationParams, Session

__all__ = ["Completion", "Engine", "EngineConfig", "EngineError", "GenerationParams", "Session"]

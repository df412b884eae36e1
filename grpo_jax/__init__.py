"""grpo_jax: group-relative policy optimisation for LLMs in JAX / Flax NNX.

Submodules are imported lazily by their users (``grpo_jax.models``,
``grpo_jax.sampling``, ``grpo_jax.grpo`` ...) so that ``import grpo_jax`` stays
cheap and the pure-math modules never pull in model code.
"""

__version__ = "0.1.0"

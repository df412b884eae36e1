"""Jittable rewards over token arrays: `(tokens_BT, mask_BT) -> rewards_B`, pure `jnp`.

`tokens_BT` are int token ids, `mask_BT` marks the completion tokens the model produced
(1) versus prompt, environment and padding tokens (0).  Each function works on a batch,
runs under `jax.jit`, and under `jax.vmap` over an extra leading axis (seeds, groups) or
over single rows (`vmap(lambda t, m: f(t[None], m[None])[0])`).

To reward on device, wrap a function in `TokenReward(fn, name, weight)` and give it to a
rubric: `Rubric(text_funcs, weights, token_funcs=[stop_token_reward((eos,))])`.  The
trainer then computes `jax.jit(rubric.token_rewards)(tokens_BT, mask_BT)` next to the host
scores and adds the totals; `Rubric.score(..., tokens_BT=..., mask_BT=...)` does both.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TokenReward:
    """A device reward: `fn(tokens_BT, mask_BT) -> [B]`, its metric name and its weight."""
    fn: Callable[[jax.Array, jax.Array], jax.Array]
    name: str
    weight: float = 1.0


def completion_lengths(mask_BT: jax.Array) -> jax.Array:
    """[B] int32: number of completion (mask = 1) tokens in each row."""
    return jnp.sum(mask_BT.astype(jnp.int32), axis=-1)


def last_completion_token(tokens_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """[B]: the last token with mask = 1 in each row, or -1 for a row with no such token."""
    mask = mask_BT.astype(bool)
    T = mask.shape[-1]
    last_index = T - 1 - jnp.argmax(mask[..., ::-1], axis=-1)
    last = jnp.take_along_axis(tokens_BT, last_index[..., None], axis=-1)[..., 0]
    return jnp.where(mask.any(axis=-1), last, -1)


def contains_pattern(tokens_BT: jax.Array, mask_BT: jax.Array, pattern: Sequence[int]) -> jax.Array:
    """[B] bool: the token sequence `pattern` occurs contiguously inside the completion tokens.

    Position t matches when tokens[t + k] == pattern[k] and mask[t + k] = 1 for all k.
    """
    pattern = tuple(int(p) for p in pattern)
    if not pattern:
        raise ValueError("empty pattern")
    T = tokens_BT.shape[-1]
    mask = mask_BT.astype(bool)
    match_BT = jnp.ones(tokens_BT.shape, bool)
    for k, token in enumerate(pattern):
        if k >= T:
            return jnp.zeros(tokens_BT.shape[:-1], bool)
        pad = [(0, 0)] * (tokens_BT.ndim - 1) + [(0, k)]
        shifted_tokens = jnp.pad(tokens_BT[..., k:], pad, constant_values=-1)
        shifted_mask = jnp.pad(mask[..., k:], pad, constant_values=False)
        match_BT = match_BT & (shifted_tokens == token) & shifted_mask
    return match_BT.any(axis=-1)


def ends_with_stop(tokens_BT: jax.Array, mask_BT: jax.Array, stop_ids: Sequence[int]) -> jax.Array:
    """[B] bool: the last completion token is one of `stop_ids` (the model stopped, not truncated)."""
    last = last_completion_token(tokens_BT, mask_BT)
    return jnp.isin(last, jnp.asarray(tuple(stop_ids), last.dtype))


def soft_overlong_penalty(lengths_B: jax.Array, max_length: int, cache_length: int) -> jax.Array:
    """DAPO soft overlong punishment (Yu et al. 2025, eq. 13), [B] float32 in [-1, 0]:

        R(L) = 0                                  if L <= L_max - L_cache
             = ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
             = -1                                 if L > L_max
    """
    if not 0 < cache_length <= max_length:
        raise ValueError("need 0 < cache_length <= max_length")
    lengths = lengths_B.astype(jnp.float32)
    soft_start = max_length - cache_length
    ramp = (soft_start - lengths) / cache_length
    return jnp.where(lengths <= soft_start, 0.0, jnp.where(lengths <= max_length, ramp, -1.0))


# -- TokenReward factories ---------------------------------------------------------------------
def pattern_reward(pattern: Sequence[int], name: str = "token_pattern", weight: float = 1.0) -> TokenReward:
    """1.0 where the completion contains the token sequence `pattern`, else 0.0."""
    pattern = tuple(int(p) for p in pattern)
    return TokenReward(lambda t, m: contains_pattern(t, m, pattern).astype(jnp.float32), name, weight)


def stop_token_reward(stop_ids: Sequence[int], name: str = "ended_with_stop", weight: float = 1.0) -> TokenReward:
    """1.0 where the completion ended with a stop token, else 0.0."""
    stop_ids = tuple(int(s) for s in stop_ids)
    return TokenReward(lambda t, m: ends_with_stop(t, m, stop_ids).astype(jnp.float32), name, weight)


def length_metric(name: str = "completion_tokens", weight: float = 0.0) -> TokenReward:
    """Completion length in tokens; weight 0 by default (logged, not rewarded)."""
    return TokenReward(lambda t, m: completion_lengths(m).astype(jnp.float32), name, weight)


def overlong_reward(max_length: int, cache_length: int, name: str = "overlong_penalty",
                    weight: float = 1.0) -> TokenReward:
    """`soft_overlong_penalty` of the completion length in tokens."""
    return TokenReward(lambda t, m: soft_overlong_penalty(completion_lengths(m), max_length, cache_length),
                       name, weight)

"""Token selection, pure: filtering (top-k, top-p, min-p) and one categorical draw per row keyed
by the row's id, so a row draws the same numbers whatever batch it lands in."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def filter_logits(z_NV, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """Logits with every token outside the top-k / top-p (nucleus) / min-p set set to -inf.

    top-p keeps the smallest prefix of the descending-probability order whose mass reaches p
    (the most likely token is always kept); min-p keeps tokens with p >= min_p * p_max.
    """
    neg = jnp.finfo(z_NV.dtype).min
    if top_k and top_k < z_NV.shape[-1]:
        kth = jax.lax.top_k(z_NV, top_k)[0][:, -1:]
        z_NV = jnp.where(z_NV >= kth, z_NV, neg)
    if min_p > 0:
        probs = jax.nn.softmax(z_NV, axis=-1)
        z_NV = jnp.where(probs >= min_p * probs.max(-1, keepdims=True), z_NV, neg)
    if top_p < 1:
        order = jnp.argsort(-z_NV, axis=-1)
        sorted_probs = jnp.take_along_axis(jax.nn.softmax(z_NV, axis=-1), order, -1)
        mass_before = jnp.cumsum(sorted_probs, -1) - sorted_probs
        keep_sorted = mass_before < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(z_NV.shape[0])[:, None], order].set(keep_sorted)
        z_NV = jnp.where(keep, z_NV, neg)
    return z_NV


def row_uniforms(key, row_ids_N):
    """One uniform in (0, 1) per row, a function of (key, row id) only: a row draws the same
    numbers whatever batch it is in (padding, batch buckets, its share of a multi-host batch)."""
    draw = lambda i: jax.random.uniform(jax.random.fold_in(key, i), (), minval=jnp.finfo(jnp.float32).tiny)
    return jax.vmap(draw)(row_ids_N)


def categorical(key, logits_NV, row_ids_N=None, block: int = 128, *, uniforms_N=None):
    """One draw per row from softmax(logits), by inverting the CDF with one uniform per row.

    `jax.random.categorical` (Gumbel-max) needs N x V random numbers per step, which costs more
    than the model's own decode step on CPU; this needs N. The CDF is inverted in two levels
    (the block of `block` tokens first, then the token inside it) because a scan over the whole
    vocabulary is a log-depth chain of passes over [N, V] on CPU. Tokens of probability 0
    (filtered to -inf / the dtype minimum) are never drawn: u > 0 and their CDF step is flat.
    `uniforms_N`: the rows' uniforms, drawn by the caller (then `key` and `row_ids_N` are unused).
    """
    n, v = logits_NV.shape
    if row_ids_N is None:
        row_ids_N = jnp.arange(n)
    probs = jax.nn.softmax(logits_NV, axis=-1)
    n_blocks = -(-v // block)
    probs = jnp.pad(probs, ((0, 0), (0, n_blocks * block - v))).reshape(n, n_blocks, block)
    block_cdf = jnp.cumsum(probs.sum(-1), axis=-1)                               # [N, nb]
    if uniforms_N is None:
        uniforms_N = row_uniforms(key, row_ids_N)
    target = uniforms_N[:, None] * block_cdf[:, -1:]           # in (0, total)
    b = jnp.minimum(jnp.sum(block_cdf < target, axis=-1), n_blocks - 1)          # cdf[b] >= target
    before = jnp.where(b > 0, jnp.take_along_axis(block_cdf, jnp.maximum(b - 1, 0)[:, None], -1)[:, 0], 0.0)
    within = jnp.take_along_axis(probs, b[:, None, None], axis=1)[:, 0]          # [N, block]
    # rest > 0 (target > cdf[b - 1]); the first token whose inner CDF reaches it has p > 0.
    rest = target[:, 0] - before
    j = jnp.sum(jnp.cumsum(within, axis=-1) < rest[:, None], axis=-1)
    # Rounding can leave rest just above the block's own sum: take its last token of p > 0.
    last_nonzero = block - 1 - jnp.argmax(within[:, ::-1] > 0, axis=-1)
    return b * block + jnp.minimum(j, last_nonzero)


def select_tokens(logits_NV, key, cfg, row_ids_N=None):
    """Draws one token per row by `cfg`'s temperature / top_k / top_p / min_p (a
    `sampling.SamplingConfig`); returns (tokens [N] int32, log-probs [N] float32 of
    log softmax(z / tau) over the full vocabulary)."""
    logits_NV = logits_NV.astype(jnp.float32)
    if cfg.temperature == 0:
        tokens = jnp.argmax(logits_NV, axis=-1)
        scaled = logits_NV
    else:
        scaled = logits_NV / cfg.temperature
        filtered = filter_logits(scaled, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p)
        tokens = categorical(key, filtered, row_ids_N)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(scaled, -1), tokens[:, None], -1)[:, 0]
    return tokens.astype(jnp.int32), logprobs


# -- per-row parameters (the rollout engine: each slot holds its own request) -----------------
class RowSampling(NamedTuple):
    """Per-row sampling parameters, [N] arrays: temperature (0 = greedy), top_k (0 = off), top_p
    (1 = off), min_p (0 = off)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array


def keyed_uniforms(key_data_N2, turn_N, index_N, row_ids_N):
    """Row i's uniform for token `index_N[i]` of turn `turn_N[i]` under its own key: the number
    `sampling.generate` draws for that row with key `fold_in(key, turn)` (a rollout's turn key),
    so a row draws the same tokens in the engine's slots as in a lockstep batch."""
    def one(key_data, turn, index, row):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(key_data), turn), index)
        return jax.random.uniform(jax.random.fold_in(key, row), (), minval=jnp.finfo(jnp.float32).tiny)
    return jax.vmap(one)(key_data_N2, turn_N, index_N, row_ids_N)


def filter_logits_rows(z_NV, params: RowSampling, *, top_k: bool, top_p: bool, min_p: bool):
    """`filter_logits` with per-row values; the static flags say which filters any row uses
    (a row at its filter's off value keeps every token)."""
    neg = jnp.finfo(z_NV.dtype).min
    v = z_NV.shape[-1]
    if top_k:
        k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, v), v)
        kth = jnp.take_along_axis(-jnp.sort(-z_NV, axis=-1), (k - 1)[:, None], -1)
        z_NV = jnp.where(z_NV >= kth, z_NV, neg)
    if min_p:
        probs = jax.nn.softmax(z_NV, axis=-1)
        z_NV = jnp.where(probs >= params.min_p[:, None] * probs.max(-1, keepdims=True), z_NV, neg)
    if top_p:
        order = jnp.argsort(-z_NV, axis=-1)
        sorted_probs = jnp.take_along_axis(jax.nn.softmax(z_NV, axis=-1), order, -1)
        mass_before = jnp.cumsum(sorted_probs, -1) - sorted_probs
        keep_sorted = (mass_before < params.top_p[:, None]) | (params.top_p[:, None] >= 1)
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(z_NV.shape[0])[:, None], order].set(keep_sorted)
        z_NV = jnp.where(keep, z_NV, neg)
    return z_NV


def select_tokens_rows(logits_NV, uniforms_N, params: RowSampling, *, filters: tuple[bool, bool, bool]):
    """`select_tokens` with per-row parameters and the rows' uniforms (`keyed_uniforms`);
    `filters`: whether any row uses top-k, top-p, min-p. Returns (tokens [N], log-probs [N])."""
    logits_NV = logits_NV.astype(jnp.float32)
    greedy = params.temperature <= 0
    scaled = logits_NV / jnp.where(greedy, 1.0, params.temperature)[:, None]
    top_k, top_p, min_p = filters
    filtered = filter_logits_rows(scaled, params, top_k=top_k, top_p=top_p, min_p=min_p)
    drawn = categorical(None, filtered, uniforms_N=uniforms_N)
    tokens = jnp.where(greedy, jnp.argmax(logits_NV, axis=-1), drawn)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(scaled, -1), tokens[:, None], -1)[:, 0]
    return tokens.astype(jnp.int32), logprobs

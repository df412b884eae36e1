"""Log-probabilities (and entropy) of given next tokens, computed in vocabulary chunks.

The float32 logits [B, T, V] of a 150k-token vocabulary are the largest tensor of an RL step
(a 32 x 1024 batch would take 20 GB). Instead we scan over vocabulary chunks of C columns with an
online log-sum-exp, so at most [B, T, C] logits exist at a time. The backward pass is written by
hand: it recomputes each chunk's logits and forms d(loss)/dz in one elementwise pass from the
saved [B, T] log-sum-exp (and E_p[z]), instead of differentiating the online statistics through
a rematerialised scan (several passes over every [B, T, C] chunk).

With logits z (already divided by the temperature tau) and target token y:

    log p(y) = z_y - logsumexp(z)
    H        = logsumexp(z) - sum_v p_v z_v

Running statistics per chunk: m = max z, s = sum exp(z - m), u = sum exp(z - m) z; when the max
grows from m to m', s and u are rescaled by exp(m - m'). At the end logsumexp = m + log s and
sum_v p_v z_v = u / s.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


# Vocabulary columns per chunk when none is given: the accelerators' choice. Runs pick theirs in
# `grpo_jax.platform` (1024 on CPU: a [N, 1024] float32 chunk stays in cache while it is
# exponentiated and reduced: docs/performance.md, "Log-prob chunks").
DEFAULT_CHUNK_SIZE = 8192


def token_logprobs(hidden_BTD, unembed_VD, targets_BT, *, temperature: float = 1.0,
                   chunk_size: int | None = None, return_entropy: bool = False):
    """log softmax(hidden @ unembed.T / temperature)[targets], float32 [B, T] (and entropy [B, T]).

    `unembed_VD` is the output projection [V, D] (`Transformer.unembedding()`).

    `temperature` is the sampling temperature: the sampler draws from softmax(z / tau) and
    reports these same log-probs, so the ratio new/old is exactly 1 on-policy.
    Chunks are `chunk_size` columns (None: `DEFAULT_CHUNK_SIZE`); the last chunk is shifted
    left to stay inside the vocabulary (its overlap with the previous chunk is masked), so no
    weight padding or copy is needed.

    Differentiable in `hidden_BTD` and `unembed_VD` through a hand-written backward pass (module
    docstring): per chunk one recomputed logits matmul, one fused elementwise pass and the two
    gradient matmuls.
    """
    vocab = unembed_VD.shape[0]
    chunk = min(int(chunk_size or DEFAULT_CHUNK_SIZE), vocab)
    logps, entropy = _chunked_logprobs(hidden_BTD, unembed_VD, targets_BT.astype(jnp.int32),
                                       1.0 / float(temperature), chunk, bool(return_entropy))
    return (logps, entropy) if return_entropy else logps


def _chunk_weights(unembed_VD, k, chunk: int, dtype):
    """Chunk k's rows of the output projection [C, D] and their vocabulary ids [C]. The last
    chunk is shifted left to end at the vocabulary's end; its ids below k * chunk were already
    counted by the previous chunk (`vocab % chunk != 0` only)."""
    vocab = unembed_VD.shape[0]
    start = jnp.minimum(k * chunk, vocab - chunk)
    w_CD = jax.lax.dynamic_slice_in_dim(unembed_VD, start, chunk, axis=0).astype(dtype)
    return w_CD, start + jnp.arange(chunk)


def _chunk_logits(hidden_BTD, unembed_VD, k, chunk: int, inv_tau: float):
    """Chunk k's logits z / tau [B, T, C] (float32), its vocabulary ids and which of them are new
    (None when every column is)."""
    w_CD, cols = _chunk_weights(unembed_VD, k, chunk, hidden_BTD.dtype)
    z = jnp.einsum("btd,cd->btc", hidden_BTD, w_CD, preferred_element_type=jnp.float32) * inv_tau
    fresh = None if unembed_VD.shape[0] % chunk == 0 else cols >= k * chunk
    return z, cols, fresh


def _forward_stats(hidden_BTD, unembed_VD, targets_BT, inv_tau, chunk, with_entropy):
    """(logps, entropy or zeros, lse, E_p[z] or zeros), each [B, T] float32, by an online
    log-sum-exp over the chunks."""
    vocab = unembed_VD.shape[0]

    def body(carry, k):
        m, s, u, target_logit = carry
        z, cols, fresh = _chunk_logits(hidden_BTD, unembed_VD, k, chunk, inv_tau)
        z_fresh = z if fresh is None else jnp.where(fresh, z, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(z_fresh, axis=-1))
        rescale = jnp.exp(m - m_new)
        e = jnp.exp(z_fresh - m_new[..., None])
        s = s * rescale + jnp.sum(e, axis=-1)
        if with_entropy:
            u = u * rescale + jnp.sum(e * (z if fresh is None else jnp.where(fresh, z, 0.0)), axis=-1)
        hit = cols == targets_BT[..., None]
        if fresh is not None:
            hit = hit & fresh
        target_logit = target_logit + jnp.sum(jnp.where(hit, z, 0.0), axis=-1)
        return (m_new, s, u, target_logit), None

    shape = targets_BT.shape
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
    num_chunks = -(-vocab // chunk)
    (m, s, u, target_logit), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
    lse = m + jnp.log(s)
    mean_z = u / s
    return target_logit - lse, lse - mean_z, lse, mean_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_logprobs(hidden_BTD, unembed_VD, targets_BT, inv_tau, chunk, with_entropy):
    logps, entropy, _, _ = _forward_stats(hidden_BTD, unembed_VD, targets_BT, inv_tau, chunk, with_entropy)
    return logps, entropy


def _chunked_logprobs_fwd(hidden_BTD, unembed_VD, targets_BT, inv_tau, chunk, with_entropy):
    logps, entropy, lse, mean_z = _forward_stats(hidden_BTD, unembed_VD, targets_BT, inv_tau, chunk,
                                                 with_entropy)
    return (logps, entropy), (hidden_BTD, unembed_VD, targets_BT, lse, mean_z)


def _chunked_logprobs_bwd(inv_tau, chunk, with_entropy, residuals, cotangents):
    """Per chunk, with p = softmax(z) over the full vocabulary and y the target:
    d log p(y) / dz_v = [v = y] - p_v and dH / dz_v = -p_v (z_v - E_p[z]); z = hidden @ W.T / tau."""
    hidden_BTD, unembed_VD, targets_BT, lse, mean_z = residuals
    g_logp, g_entropy = cotangents
    vocab, d = unembed_VD.shape
    num_chunks = -(-vocab // chunk)

    # Everything in [C, N] layout (N = B * T): dz.T feeds dW = dz.T @ h as is, and the cheaper
    # transposed operand is the one of dh (on CPU faster than [N, C], whose dW
    # product made XLA write a transposed copy of dz).
    h_ND = hidden_BTD.reshape(-1, d)
    targets_N, lse_N, g_logp_N = targets_BT.reshape(-1), lse.reshape(-1), g_logp.reshape(-1)

    def body(dh_ND, k):
        w_CD, cols = _chunk_weights(unembed_VD, k, chunk, h_ND.dtype)
        z_CN = jnp.einsum("cd,nd->cn", w_CD, h_ND, preferred_element_type=jnp.float32) * inv_tau
        cols_C1 = cols[:, None]
        p_CN = jnp.exp(z_CN - lse_N)
        dz_CN = jnp.where(cols_C1 == targets_N, g_logp_N, 0.0) - g_logp_N * p_CN
        if with_entropy:
            dz_CN = dz_CN - g_entropy.reshape(-1) * p_CN * (z_CN - mean_z.reshape(-1))
        if vocab % chunk:  # the shifted last chunk: columns an earlier chunk already counted
            dz_CN = jnp.where(cols_C1 >= k * chunk, dz_CN, 0.0)
        dz_CN = (dz_CN * inv_tau).astype(h_ND.dtype)
        dh_ND = dh_ND + jnp.einsum("cn,cd->nd", dz_CN, w_CD, preferred_element_type=jnp.float32)
        return dh_ND, jnp.einsum("cn,nd->cd", dz_CN, h_ND, preferred_element_type=jnp.float32)

    dh, dw_NCD = jax.lax.scan(body, jnp.zeros(h_ND.shape, jnp.float32), jnp.arange(num_chunks))
    dh = dh.reshape(hidden_BTD.shape)
    if vocab % chunk == 0:
        dw = dw_NCD.reshape(vocab, d)
    else:  # the last chunk's rows before column (num_chunks - 1) * chunk are the masked overlap
        tail = vocab - (num_chunks - 1) * chunk
        dw = jnp.concatenate([dw_NCD[:-1].reshape(-1, d), dw_NCD[-1, chunk - tail:]], axis=0)
    return dh.astype(hidden_BTD.dtype), dw.astype(unembed_VD.dtype), None


_chunked_logprobs.defvjp(_chunked_logprobs_fwd, _chunked_logprobs_bwd)


def loss_columns(mask_BT, width: int):
    """[B, width] int32: per row, the columns where `mask_BT` != 0 in order, then the other
    columns in order (a row with fewer than `width` such columns is filled up with others)."""
    return jnp.argsort(mask_BT == 0, axis=1, stable=True)[:, :width].astype(jnp.int32)


def token_logprobs_at(hidden_BTD, unembed_VD, targets_BT, columns_BK=None, **kwargs):
    """`token_logprobs` computed at `columns_BK` ([B, K] column indices) only, scattered back to
    [B, T] with 0 elsewhere; all columns when None.

    The output head is the widest matmul of a small model and RL trains on completion tokens
    only: with K = the completion budget, prompt positions cost no head work (for prompts as
    long as their completions, a third of the head's FLOPs).
    """
    if columns_BK is None:
        return token_logprobs(hidden_BTD, unembed_VD, targets_BT, **kwargs)
    take = lambda x: jnp.take_along_axis(  # noqa: E731
        x, columns_BK.reshape(columns_BK.shape + (1,) * (x.ndim - 2)), axis=1)
    out = token_logprobs(take(hidden_BTD), unembed_VD, take(targets_BT), **kwargs)
    rows = jnp.arange(targets_BT.shape[0])[:, None]
    put = lambda v: jnp.zeros(targets_BT.shape, v.dtype).at[rows, columns_BK].set(v)  # noqa: E731
    return tuple(map(put, out)) if isinstance(out, tuple) else put(out)


def sequence_logprobs(model, tokens_BT, positions_BT=None, segment_ids_BT=None, *,
                      temperature: float = 1.0, chunk_size: int | None = None, return_entropy: bool = False):
    """Log-prob of each next token under `model`: out[:, t] = log p(tokens[:, t + 1] | tokens[:, :t+1]).

    Returns [B, T - 1] (and entropy [B, T - 1]); index t scores token t + 1.
    """
    hidden = model.hidden_states(tokens_BT, positions_BT, segment_ids_BT)
    return token_logprobs(hidden[:, :-1], model.unembedding(), tokens_BT[:, 1:],
                          temperature=temperature, chunk_size=chunk_size,
                          return_entropy=return_entropy)

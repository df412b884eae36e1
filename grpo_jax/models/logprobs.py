"""Log-probabilities (and entropy) of given next tokens, computed in vocabulary chunks.

The float32 logits [B, T, V] of a 150k-token vocabulary are the largest tensor of an RL step
(a 32 x 1024 batch would take 20 GB). Instead we scan over vocabulary chunks of C columns with an
online log-sum-exp, so at most [B, T, C] logits exist at a time, and each chunk is rematerialised
in the backward pass (the scan body is under `jax.checkpoint`): only [B, T] running statistics are
saved per chunk.

With logits z (already divided by the temperature tau) and target token y:

    log p(y) = z_y - logsumexp(z)
    H        = logsumexp(z) - sum_v p_v z_v

Running statistics per chunk: m = max z, s = sum exp(z - m), u = sum exp(z - m) z; when the max
grows from m to m', s and u are rescaled by exp(m - m'). At the end logsumexp = m + log s and
sum_v p_v z_v = u / s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(hidden_BTD, unembed_VD, targets_BT, *, temperature: float = 1.0,
                   chunk_size: int = 8192, return_entropy: bool = False):
    """log softmax(hidden @ unembed.T / temperature)[targets], float32 [B, T] (and entropy [B, T]).

    `unembed_VD` is the output projection [V, D] (`Transformer.unembedding()`).

    `temperature` is the sampling temperature: the sampler draws from softmax(z / tau) and
    reports these same log-probs, so the ratio new/old is exactly 1 on-policy.
    Chunks are `chunk_size` columns; the last chunk is shifted left to stay inside the vocabulary
    (its overlap with the previous chunk is masked), so no weight padding or copy is needed.
    """
    vocab = unembed_VD.shape[0]
    chunk = min(int(chunk_size), vocab)
    num_chunks = -(-vocab // chunk)
    inv_tau = 1.0 / float(temperature)
    targets_BT = targets_BT.astype(jnp.int32)
    compute_dtype = hidden_BTD.dtype

    def body(carry, k):
        m, s, u, target_logit = carry
        start = jnp.minimum(k * chunk, vocab - chunk)
        w = jax.lax.dynamic_slice_in_dim(unembed_VD, start, chunk, axis=0).astype(compute_dtype)
        z = jnp.einsum("btd,cd->btc", hidden_BTD, w, preferred_element_type=jnp.float32) * inv_tau
        cols = start + jnp.arange(chunk)
        fresh = cols >= k * chunk  # columns no earlier chunk has counted
        z_fresh = jnp.where(fresh, z, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(z_fresh, axis=-1))
        rescale = jnp.exp(m - m_new)
        e = jnp.exp(z_fresh - m_new[..., None])
        s = s * rescale + jnp.sum(e, axis=-1)
        if return_entropy:
            u = u * rescale + jnp.sum(e * jnp.where(fresh, z, 0.0), axis=-1)
        hit = fresh & (cols == targets_BT[..., None])
        target_logit = target_logit + jnp.sum(jnp.where(hit, z, 0.0), axis=-1)
        return (m_new, s, u, target_logit), None

    shape = targets_BT.shape
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
    (m, s, u, target_logit), _ = jax.lax.scan(jax.checkpoint(body), init, jnp.arange(num_chunks))
    lse = m + jnp.log(s)
    logps = target_logit - lse
    if return_entropy:
        return logps, lse - u / s
    return logps


def sequence_logprobs(model, tokens_BT, positions_BT=None, segment_ids_BT=None, *,
                      temperature: float = 1.0, chunk_size: int = 8192, return_entropy: bool = False):
    """Log-prob of each next token under `model`: out[:, t] = log p(tokens[:, t + 1] | tokens[:, :t+1]).

    Returns [B, T - 1] (and entropy [B, T - 1]); index t scores token t + 1.
    """
    hidden = model.hidden_states(tokens_BT, positions_BT, segment_ids_BT)
    return token_logprobs(hidden[:, :-1], model.unembedding(), tokens_BT[:, 1:],
                          temperature=temperature, chunk_size=chunk_size,
                          return_entropy=return_entropy)
